"""``lub_fast.data.pipeline.prepare_corpus``: raw text to shards, every line accounted for, the same
shards for any worker count, resume, and every kind of bad input."""

import filecmp
import gzip
import json
import os

import numpy as np
import pytest

from lub_fast.data import inputs as inputs_module
from lub_fast.data.clean import clean_line, split_sentences
from lub_fast.data.dataset import PretrainDataset
from lub_fast.data.inputs import PrepareError
from lub_fast.data.pipeline import prepare_corpus
from lub_fast.data.shards import open_shards


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
        "from lub_fast.data.pipeline import prepare_corpus\n"
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
    # one shard, empty: every planned shard is written, so that a resume finds its counts
    assert (summary.documents, summary.shards, summary.tokens) == (0, 1, 0)
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


def test_prepare_ten_megabyte_line_is_one_line_read_in_pieces(tmp_path, vocab_path):
    tail = 2_450_000  # characters without any punctuation: cut every 256
    line = ("中华人民共和国成立了" * 5 + "。") * 20_000 + "无标点的长句子" * (tail // 7)
    (tmp_path / "long.txt").write_text(line + "\n", encoding="utf-8")
    assert os.path.getsize(tmp_path / "long.txt") > 10_000_000
    summary = _run(tmp_path, [tmp_path / "long.txt"], vocab_path)
    c = summary.counts
    assert (c["lines_read"], c["lines_kept"]) == (1, 1), c
    assert summary.tokens == len(line), "every character is one token: nothing is lost between the pieces"
    # The tail is read in 1 MiB pieces cut between characters, each then cut every 256 characters.
    assert -(-tail // 256) <= summary.sentences - 20_000 <= -(-tail // 256) + 8, summary.sentences
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
    assert c["lines_read"] == 7 and c.get("empty_documents", 0) == 0, "a JSON line without text is no empty document"
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
    report = _summary_json(summary)
    _assert_lines_add_up(report)
    (entry,) = report["named"]["corrupt_files"]["first"]
    assert entry.startswith(f"{tmp_path / 'cut.txt.gz'}:") and "ended before the end-of-stream marker" in entry, entry
    assert f"corrupt compressed files (rest of the file skipped) 1: {entry}" in summary.format()
    with pytest.raises(PrepareError, match=r"cut\.txt\.gz:\d+: corrupt or truncated compressed file"):
        _run(tmp_path, [tmp_path / "cut.txt.gz"], vocab_path, "strict", strict=True)


def test_prepare_line_longer_than_read_limit(tmp_path, vocab_path, monkeypatch):
    monkeypatch.setattr(inputs_module, "LINE_LIMIT", 100)
    text = "中华人民共和国" * 100  # 2,100 bytes: read in pieces cut between characters
    (tmp_path / "wide.txt").write_text(text + "\n第二行。\n", encoding="utf-8")
    summary = _run(tmp_path, [tmp_path / "wide.txt"], vocab_path)
    assert summary.counts.get("invalid_utf8", 0) == 0
    assert summary.tokens == len(text) + 4
    assert (summary.counts["lines_read"], summary.counts["lines_kept"]) == (2, 2), summary.counts


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


PRETRAIN_CORPUS = "/work/shared/data/pretrain_corpus"


def _summary_json(summary):
    with open(os.path.join(summary.output_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def _assert_lines_add_up(report):
    dropped = sum(report["lines_dropped"].values())
    assert report["lines_read"] == report["lines_kept"] + dropped, (
        f"{report['lines_read']} read != {report['lines_kept']} kept + {dropped} dropped {report['lines_dropped']}"
    )


def test_prepare_stray_nul_is_removed_and_counted_not_binary(tmp_path, vocab_path, real_lines):
    lines = real_lines[:1200]
    data = ("\n".join(lines) + "\n").encode()
    cut = data.index(b"\n", 2000)
    path = tmp_path / "nul.txt"
    path.write_bytes(data[:cut] + b"\x00" + data[cut:])
    summary = _run(tmp_path, [path], vocab_path)
    report = _summary_json(summary)
    assert report["named"]["binary_files"]["count"] == 0
    assert report["lines_read"] == 1200 and report["lines_kept"] >= 1190, report
    assert summary.counts["control_chars"] == 1
    _assert_lines_add_up(report)
    alone = prepare_corpus([path], str(tmp_path / "bv"), build_vocab=2000, segmenter="rjieba")
    assert alone.documents == 1 and alone.tokens > 30_000, "the file alone is a corpus with text"


def test_prepare_binary_file_named_in_summary(tmp_path, vocab_path, real_lines, write_documents):
    binary = tmp_path / "image.txt"
    binary.write_bytes(np.random.default_rng(0).bytes(20_000))
    text = write_documents(tmp_path / "text.txt", real_lines[:5])
    summary = _run(tmp_path, [binary, text], vocab_path)
    named = _summary_json(summary)["named"]["binary_files"]
    assert named["count"] == 1 and named["first"][0].startswith(f"{binary} (binary file: "), named
    assert f"binary files skipped 1: {binary} (binary file" in summary.format()


def test_prepare_utf16_files_decoded_and_named(tmp_path, vocab_path, real_lines):
    text = "\n".join(real_lines[:300]) + "\n"
    (tmp_path / "utf8.txt").write_bytes(text.encode())
    (tmp_path / "bom.txt").write_bytes(text.encode("utf-16"))
    (tmp_path / "le.txt").write_bytes(text.encode("utf-16-le"))
    (tmp_path / "be.txt").write_bytes(text.encode("utf-16-be"))
    reference = open_shards(_run(tmp_path, [tmp_path / "utf8.txt"], vocab_path, "utf8").output_dir)
    for name in ("bom", "le", "be"):
        summary = _run(tmp_path, [tmp_path / f"{name}.txt"], vocab_path, name)
        (shard,) = open_shards(summary.output_dir).shards
        np.testing.assert_array_equal(shard.ids, reference.shards[0].ids, err_msg=name)
        named = _summary_json(summary)["named"]["decoded_files"]
        assert named["count"] == 1 and "UTF-16" in named["first"][0], named
        assert summary.counts.get("invalid_utf8", 0) == 0
    good = "".join(line + "\n" for line in real_lines[:100]).encode("utf-16-le")
    broken = "第一行。\n".encode("utf-16-le") + b"\x00\xd8" + "坏的一行。\n".encode("utf-16-le") + good
    (tmp_path / "surrogate.txt").write_bytes(b"\xff\xfe" + broken)
    summary = _run(tmp_path, [tmp_path / "surrogate.txt"], vocab_path, "surrogate")
    assert summary.invalid_utf8_by_file == {str(tmp_path / "surrogate.txt"): 1}, "a lone surrogate is counted"
    assert summary.counts["lines_read"] == 102
    with pytest.raises(PrepareError, match=r"surrogate\.txt:2: invalid UTF-16 at byte"):
        _run(tmp_path, [tmp_path / "surrogate.txt"], vocab_path, "strict", strict=True)


def test_prepare_special_files_and_broken_links_in_directory_skipped_named(tmp_path, vocab_path, real_lines):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "good.txt").write_text("\n".join(real_lines[:20]) + "\n", encoding="utf-8")
    os.mkfifo(inputs / "pipe.txt")  # opening it for reading would wait for a writer forever
    os.symlink(inputs / "gone.txt", inputs / "dangling.txt")
    os.symlink(inputs / "loop.txt", inputs / "loop.txt")
    summary = _run(tmp_path, [inputs], vocab_path)
    assert summary.files == 1 and summary.counts["lines_read"] == 20
    named = _summary_json(summary)["named"]
    assert named["special_files"] == {"count": 1, "first": [f"{inputs / 'pipe.txt'} (a FIFO (named pipe))"]}
    assert named["broken_links"]["count"] == 2
    assert named["broken_links"]["first"] == [
        f"{inputs / 'dangling.txt'} (a dangling symbolic link (to {inputs / 'gone.txt'}))",
        f"{inputs / 'loop.txt'} (a symbolic link loop)",
    ]
    printed = summary.format()
    assert "special files skipped (FIFO, socket, device) 1:" in printed and "pipe.txt" in printed
    assert "dangling or looping symbolic links skipped 2:" in printed
    with pytest.raises(PrepareError, match=r"pipe\.txt: a FIFO \(named pipe\), not a file to read"):
        _run(tmp_path, [inputs / "pipe.txt"], vocab_path, "explicit")
    with pytest.raises(PrepareError, match=r"dangling\.txt: a dangling symbolic link"):
        _run(tmp_path, [inputs / "dangling.txt"], vocab_path, "explicit")


def test_prepare_json_line_over_the_limit_dropped_and_named(tmp_path, vocab_path, monkeypatch):
    monkeypatch.setattr(inputs_module, "LINE_LIMIT", 1000)
    path = tmp_path / "docs.jsonl"
    lines = [{"text": "第一篇。"}, {"text": "很长的文章。" * 200}, {"text": "第三篇。"}]
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    summary = _run(tmp_path, [path], vocab_path)
    report = _summary_json(summary)
    assert (report["lines_read"], report["lines_kept"], report["lines_dropped"]["long_json_lines"]) == (3, 2, 1)
    assert report["named"]["long_json_lines"]["first"] == [f"{path}:2"]
    with pytest.raises(PrepareError, match=r"docs\.jsonl:2: JSON line over"):
        _run(tmp_path, [path], vocab_path, "strict", strict=True)


def _bad_lines():
    """Crafted lines: each is dropped, for the reason named with it (None: kept, and fixed)."""
    return [
        ("\x00\x01\x02", "empty_after_cleaning"),
        ("\u200b\ufeff", "empty_after_cleaning"),
        ("。", "short_lines"),
        ("a", "short_lines"),
        ("\u0301\u0301\u0301", "no_token_lines"),
        ("  \u3000 ", "blank"),
        ("含有\x00空字符的一行。", None),
    ]


@pytest.mark.skipif(not os.path.isdir(PRETRAIN_CORPUS), reason="needs /work/shared/data/pretrain_corpus")
def test_prepare_lines_add_up_on_real_text_with_bad_lines(tmp_path, vocab_path, real_lines):
    with open(os.path.join(PRETRAIN_CORPUS, "zhwiki_bert_sampled.txt"), encoding="utf-8") as f:
        wiki = [next(f).rstrip("\n") for _ in range(600)]
    bad = _bad_lines()
    mixed = []
    for i, line in enumerate(wiki):
        mixed.append(line)
        if i % 50 == 7:
            mixed.append(bad[(i // 50) % len(bad)][0])
    long_line = "长的句子没有换行，一直写下去。" * 3000  # 135 KB: pieces of the 8 KB chunk size
    mixed[300:300] = [long_line, "\x01" * 20_000 + "前面只有控制字符的长行。"]
    (tmp_path / "wiki.txt").write_text("\n".join(mixed) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "wiki.txt.gz", "wb") as f:
        f.write(("\n".join(mixed[:400]) + "\n").encode())
    docs = [json.dumps({"text": t}, ensure_ascii=False) for t in real_lines[:200]]
    docs[10:10] = ['{"text": "没有结尾', json.dumps({"title": "x"}), json.dumps({"text": ""}), "",
                   json.dumps({"text": "。"}), json.dumps({"text": "\u0301\u0301"}), "[1]"]
    (tmp_path / "docs.jsonl").write_text("\n".join(docs) + "\n", encoding="utf-8")
    inputs = [tmp_path / "wiki.txt", tmp_path / "wiki.txt.gz", tmp_path / "docs.jsonl"]
    physical = len(mixed) + 400 + len(docs)
    one = _run(tmp_path, inputs, vocab_path, "w1", chunk_kb=8, shard_size_mb=0.02)
    two = _run(tmp_path, inputs, vocab_path, "w2", chunk_kb=8, shard_size_mb=0.02, workers=2)
    assert one.shards >= 2
    _same_files(one.output_dir, two.output_dir)
    report = _summary_json(one)
    _assert_lines_add_up(report)
    assert report["lines_read"] == physical, f"{report['lines_read']} lines read of {physical}"
    d = report["lines_dropped"]
    assert (d["malformed_json"], d["no_text_field"]) == (1, 2), d
    for reason in ("blank", "empty_after_cleaning", "short_lines", "no_token_lines"):
        assert d[reason] > 0, (reason, d)
    real = sum(1 for line in wiki if line.strip()) + sum(1 for line in mixed[:400] if line in wiki and line.strip())
    assert report["lines_kept"] >= 0.95 * real + 190, (report["lines_kept"], real)
    assert one.counts["control_chars"] >= 2
    printed = one.format().splitlines()
    assert printed[1].endswith(f"from {report['lines_kept']:,} of {physical:,} lines"), printed[1]
    assert printed[2].startswith("lines dropped: blank "), printed[2]


