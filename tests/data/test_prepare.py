import filecmp
import gzip
import json
import os

import numpy as np
import pytest

from lub_fast import prepare
from lub_fast.data.clean import clean_line, split_sentences
from lub_fast.data.dataset import PretrainDataset
from lub_fast.data.shards import open_shards
from lub_fast.prepare import PrepareError, main, prepare_corpus


def _run(tmp_path, inputs, vocab_path, name="out", **kwargs):
    kwargs.setdefault("segmenter", "rjieba")
    return prepare_corpus(inputs, str(tmp_path / name), vocab=vocab_path, **kwargs)


def _same_files(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, f"differ: {mismatch + errors}"


def test_prepare_sentences_match_tokenizer(tmp_path, vocab_path, tokenizer, real_lines):
    docs = [real_lines[0:3], real_lines[3:4], real_lines[4:9]]
    path = tmp_path / "in.txt"
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    summary = _run(tmp_path, [path], vocab_path)
    shards = open_shards(summary.output_dir)
    (shard,) = shards.shards
    expected = [[s for line in d for s in split_sentences(clean_line(line)[0], 256)[0] if len(s) >= 2] for d in docs]
    assert summary.documents == 3 and summary.sentences == sum(map(len, expected))
    sent, doc = shard.sentence_offsets, shard.document_offsets
    np.testing.assert_array_equal(np.diff(doc), [len(d) for d in expected])
    flat = [s for d in expected for s in d]
    for i, sentence in enumerate(flat):
        np.testing.assert_array_equal(shard.ids[sent[i] : sent[i + 1]], tokenizer.encode(sentence)[0], err_msg=sentence)
    assert filecmp.cmp(os.path.join(summary.output_dir, "vocab.txt"), vocab_path, shallow=False)
    assert summary.counts["blank"] == 2 and summary.counts["lines_kept"] == 9


def test_prepare_output_identical_for_any_worker_count(tmp_path, vocab_path, corpus_path):
    one = _run(tmp_path, [corpus_path], vocab_path, "w1", shard_size_mb=0.05, chunk_kb=24)
    two = _run(tmp_path, [corpus_path], vocab_path, "w2", shard_size_mb=0.05, chunk_kb=24, workers=2)
    assert one.shards >= 3
    _same_files(one.output_dir, two.output_dir)


def test_prepare_dead_workers_are_an_error_not_a_hang(tmp_path, vocab_path, corpus_path):
    """spawn cannot re-import a __main__ read from stdin, so both workers die while starting."""
    import subprocess
    import sys

    script = (
        "from lub_fast.prepare import prepare_corpus\n"
        f"prepare_corpus([{str(corpus_path)!r}], {str(tmp_path / 'out')!r}, vocab={vocab_path!r}, "
        "segmenter='rjieba', chunk_kb=24, workers=2, progress=False)\n"
    )
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "PrepareError: a worker process died" in done.stderr and "--workers 1" in done.stderr


def test_prepare_jieba_and_rjieba_give_the_same_shards(tmp_path, vocab_path, prepared_dir, corpus_path):
    jieba = _run(tmp_path, [corpus_path], vocab_path, "jieba", segmenter="jieba", shard_size_mb=0.05, chunk_kb=32)
    a, b = open_shards(jieba.output_dir), open_shards(prepared_dir)
    for x, y in zip(a.shards, b.shards):
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_array_equal(np.asarray(x.word_start_bits), np.asarray(y.word_start_bits))


def test_prepare_resume_skips_complete_shards(tmp_path, vocab_path, prepared_dir, corpus_path):
    out = tmp_path / "resume"
    args = dict(segmenter="rjieba", shard_size_mb=0.05, chunk_kb=32)
    first = _run(tmp_path, [corpus_path], vocab_path, "resume", **args)
    assert _run(tmp_path, [corpus_path], vocab_path, "resume", **args).shards_skipped == first.shards
    # A run killed while writing shard 2: its header (the completion marker) and meta.json are missing.
    os.remove(out / "shard-00002.json")
    os.remove(out / "meta.json")
    os.rename(out / "shard-00002.ids", out / "shard-00002.ids.tmp")
    again = _run(tmp_path, [corpus_path], vocab_path, "resume", **args)
    assert again.shards_skipped == 2 and again.shards == first.shards
    assert again.counts == first.counts, "counts of skipped shards come from their headers"
    _same_files(str(out), prepared_dir)


def test_prepare_other_settings_need_overwrite(tmp_path, vocab_path, corpus_path):
    _run(tmp_path, [corpus_path], vocab_path, "o")
    with pytest.raises(PrepareError, match=r"other settings \(differs in: config, segmenter\)"):
        _run(tmp_path, [corpus_path], vocab_path, "o", segmenter="none")
    summary = _run(tmp_path, [corpus_path], vocab_path, "o", segmenter="none", overwrite=True)
    assert open_shards(summary.output_dir).meta["settings"]["segmenter"]["name"] == "none"


def test_prepare_build_vocab(tmp_path, corpus_path):
    summary = prepare_corpus([corpus_path], str(tmp_path / "bv"), build_vocab=3000, segmenter="rjieba")
    shards = open_shards(summary.output_dir)
    assert 1000 < shards.vocab_size <= 3000 + 200, shards.vocab_size
    unk = sum(int(np.count_nonzero(s.ids == 1)) for s in shards.shards)
    assert unk / summary.tokens < 0.001, f"{unk} [UNK] of {summary.tokens} tokens"
    again = prepare_corpus([corpus_path], str(tmp_path / "bv"), build_vocab=3000, segmenter="rjieba")
    assert again.shards_skipped == again.shards, "the built vocabulary is reused, so shards are complete"


def test_prepare_empty_and_blank_inputs(tmp_path, vocab_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n\u3000\n\t\n", encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    summary = _run(tmp_path, [tmp_path / "empty.txt", tmp_path / "blank.txt", tmp_path / "blank.jsonl"], vocab_path)
    assert (summary.documents, summary.shards) == (0, 0)
    assert summary.counts["blank"] == 6
    assert "warning: no documents were written" in summary.format()
    dataset = PretrainDataset(summary.output_dir)
    assert len(dataset) == 0


def test_prepare_binary_file_dropped_or_strict_error(tmp_path, vocab_path, real_lines, write_documents):
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 10)
    text = write_documents(tmp_path / "text.txt", real_lines[:5])
    summary = _run(tmp_path, [binary, text], vocab_path)
    assert summary.counts["binary_files"] == 1 and summary.documents == 1
    with pytest.raises(PrepareError, match=r"image\.txt: binary file"):
        _run(tmp_path, [binary, text], vocab_path, "strict", strict=True)


def test_prepare_ten_megabyte_line(tmp_path, vocab_path):
    tail = 2_450_000  # characters without any punctuation: cut every 256
    line = ("中华人民共和国成立了" * 5 + "。") * 20_000 + "无标点的长句子" * (tail // 7)
    (tmp_path / "long.txt").write_text(line + "\n", encoding="utf-8")
    assert os.path.getsize(tmp_path / "long.txt") > 10_000_000
    summary = _run(tmp_path, [tmp_path / "long.txt"], vocab_path)
    pieces = -(-tail // 256)
    assert summary.sentences == 20_000 + pieces
    assert (summary.counts["long_lines"], summary.counts["hard_cuts"]) == (1, pieces - 1)
    shards = open_shards(summary.output_dir)
    assert max(int(np.diff(s.sentence_offsets).max()) for s in shards.shards) <= 256


def test_prepare_gbk_text_replaced_and_counted_or_strict_error(tmp_path, vocab_path):
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("第一行是正常的。\n".encode() + "第二行是GBK编码的中文。\n".encode("gbk") + "第三行。\n".encode())
    summary = _run(tmp_path, [gbk], vocab_path)
    assert summary.counts["invalid_utf8"] == 1
    assert summary.invalid_utf8_by_file == {str(gbk): 1}
    assert f"invalid UTF-8 replaced in 1 lines of {gbk}" in summary.format()
    assert summary.sentences == 3, "the replaced line keeps its valid characters (GBK, ASCII)"
    with pytest.raises(PrepareError, match=r"gbk\.txt:2: invalid UTF-8 at byte 0"):
        _run(tmp_path, [gbk], vocab_path, "strict", strict=True)


def test_prepare_malformed_jsonl(tmp_path, vocab_path):
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"text": "第一篇文章。第二句话！\n第二段。"}, ensure_ascii=False),
        '{"text": "没有结尾',
        json.dumps({"title": "没有正文"}, ensure_ascii=False),
        "[1, 2]",
        json.dumps({"text": 5}),
        "",
        json.dumps({"text": "第二篇。", "id": 7}, ensure_ascii=False),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = _run(tmp_path, [path], vocab_path)
    assert (summary.documents, summary.sentences) == (2, 4)
    c = summary.counts
    assert (c["malformed_json"], c["no_text_field"], c["blank"], c["lines_kept"]) == (1, 3, 1, 2), c
    with pytest.raises(PrepareError, match=r"docs\.jsonl:2: malformed JSON"):
        _run(tmp_path, [path], vocab_path, "strict", strict=True)


def test_prepare_gzip_directories_and_globs(tmp_path, vocab_path, real_lines, write_documents):
    plain = tmp_path / "plain"
    plain.mkdir()
    write_documents(plain / "a.txt", real_lines[:40])
    (plain / "b.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in real_lines[40:60]), encoding="utf-8"
    )
    packed = tmp_path / "packed"
    (packed / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.jsonl"):
        with gzip.open(packed / "sub" / f"{name}.gz", "wb") as f:
            f.write((plain / name).read_bytes())
    (packed / "sub" / "notes.md").write_text("not an input", encoding="utf-8")
    a = _run(tmp_path, [plain / "a.txt", plain / "b.jsonl"], vocab_path, "a")
    b = _run(tmp_path, [packed], vocab_path, "b")
    c = _run(tmp_path, [str(packed / "**" / "*.gz")], vocab_path, "c")
    assert a.documents == 2 + 20 and a.files == b.files == c.files == 2
    for out in (b, c):
        for x, y in zip(open_shards(a.output_dir).shards, open_shards(out.output_dir).shards):
            np.testing.assert_array_equal(x.ids, y.ids)


def test_prepare_truncated_gzip(tmp_path, vocab_path, real_lines):
    data = gzip.compress(("\n".join(real_lines[:200]) + "\n").encode())
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    summary = _run(tmp_path, [tmp_path / "cut.txt.gz"], vocab_path)
    assert summary.counts["corrupt_files"] == 1
    assert 0 < summary.counts["lines_read"] < 200
    with pytest.raises(PrepareError, match=r"cut\.txt\.gz:\d+: corrupt or truncated compressed file"):
        _run(tmp_path, [tmp_path / "cut.txt.gz"], vocab_path, "strict", strict=True)


def test_prepare_line_longer_than_read_limit(tmp_path, vocab_path, monkeypatch):
    monkeypatch.setattr(prepare, "LINE_LIMIT", 100)
    text = "中华人民共和国" * 100  # 2,100 bytes: read in pieces cut between characters
    (tmp_path / "wide.txt").write_text(text + "\n第二行。\n", encoding="utf-8")
    summary = _run(tmp_path, [tmp_path / "wide.txt"], vocab_path)
    assert summary.counts.get("invalid_utf8", 0) == 0
    assert summary.tokens == len(text) + 4


def test_prepare_user_dict_and_t2s(tmp_path, vocab_path):
    pytest.importorskip("opencc")
    (tmp_path / "trad.txt").write_text("國家主席發表新年講話。\n", encoding="utf-8")
    (tmp_path / "user.txt").write_text("新年讲话 100000\n", encoding="utf-8")
    summary = _run(tmp_path, [tmp_path / "trad.txt"], vocab_path, t2s=True, user_dict=str(tmp_path / "user.txt"))
    (shard,) = open_shards(summary.output_dir).shards
    assert summary.counts["t2s"] == 1
    flags = shard.word_start(0, shard.num_tokens).tolist()
    # 国家 / 主席 / 发表 / 新年讲话 / 。
    assert flags == [1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1], flags


def test_prepare_input_errors(tmp_path, vocab_path, corpus_path):
    with pytest.raises(PrepareError, match=r"missing\.txt: no such file or directory"):
        _run(tmp_path, [tmp_path / "missing.txt"], vocab_path)
    with pytest.raises(PrepareError, match=r"\*\.nothing: no file matches"):
        _run(tmp_path, [str(tmp_path / "*.nothing")], vocab_path)
    with pytest.raises(PrepareError, match="exactly one of --vocab FILE and --build-vocab N"):
        prepare_corpus([corpus_path], str(tmp_path / "x"))
    with pytest.raises(PrepareError, match="--segmenter must be one of"):
        _run(tmp_path, [corpus_path], vocab_path, segmenter="ltp")


def test_prepare_cli(tmp_path, vocab_path, corpus_path, capsys):
    out = tmp_path / "cli"
    argv = [str(corpus_path), "--output", str(out), "--vocab", vocab_path, "--segmenter", "rjieba", "--workers", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "kept: 75 documents" in printed and "dropped:" in printed and "words:" in printed
    assert open_shards(out).num_documents == 75
    assert main([str(tmp_path / "missing.txt"), "--output", str(out), "--vocab", vocab_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lub_fast.prepare: error: ") and "missing.txt" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for option in (
        "--vocab",
        "--build-vocab",
        "--segmenter",
        "rjieba",
        "--user-dict",
        "--workers",
        "--shard-size",
        "--t2s",
        "--strict",
        "--chunk-size",
        "--min-chars",
        "--max-sentence-chars",
        "--overwrite",
    ):
        assert option in help_text, option
