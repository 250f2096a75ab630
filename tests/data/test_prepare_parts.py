"""Many cores and many machines: the shards are byte-identical for any ``--workers`` (resumed or not)
and for any split into ``--part K/N`` runs, which ``lub_fast.data.parts.shard_dirs`` reads back as
the one-machine corpus."""

import filecmp
import gzip
import json
import os
import shutil

import numpy as np
import pytest

from lub_fast.data.dataset import PretrainDataset
from lub_fast.data.parts import shard_dirs
from lub_fast.data.pipeline import prepare_corpus
from lub_fast.data.shards import ShardError, open_shards
from lub_fast.prepare import main

SETTINGS = {"segmenter": "rjieba", "chunk_kb": 8, "shard_size_mb": 0.03}


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, real_lines, write_documents):
    """A .txt cut into many units, small files sharing units, a .gz read whole and a .jsonl."""
    root = tmp_path_factory.mktemp("mixed")
    files = [write_documents(str(root / "big.txt"), real_lines[:1200], lines_per_document=7)]
    files += [write_documents(str(root / f"small{i}.txt"), real_lines[1200 + 10 * i : 1210 + 10 * i]) for i in range(4)]
    with gzip.open(root / "packed.txt.gz", "wb") as f:
        f.write(("\n".join(real_lines[1300:1500]) + "\n").encode())
    (root / "docs.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in real_lines[1500:1700]), encoding="utf-8"
    )
    return files + [str(root / "packed.txt.gz"), str(root / "docs.jsonl")]


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory, mixed_inputs, vocab_path):
    out = str(tmp_path_factory.mktemp("one") / "shards")
    return prepare_corpus(mixed_inputs, out, vocab=vocab_path, **SETTINGS)


def _same_files(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)), (names, sorted(os.listdir(b)))
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, f"differ: {mismatch + errors}"


def test_prepare_shards_identical_for_1_2_3_workers_and_after_a_resume(tmp_path, mixed_inputs, vocab_path, one_machine):
    assert one_machine.shards >= 6 and one_machine.files == 7
    for workers in (2, 3):
        out = tmp_path / f"w{workers}"
        prepare_corpus(mixed_inputs, str(out), vocab=vocab_path, workers=workers, **SETTINGS)
        _same_files(one_machine.output_dir, out)
    # a run killed while writing shard 3: later shards, meta.json and a unit file half written
    out = tmp_path / "w3"
    for name in os.listdir(out):
        if name.startswith(("shard-00003", "shard-00004", "shard-00005")) or name == "meta.json":
            os.remove(out / name)
    (out / ".units").mkdir()
    (out / ".units" / "unit-00000020.npy.tmp").write_bytes(b"\x93NUMPY half")
    again = prepare_corpus(mixed_inputs, str(out), vocab=vocab_path, workers=3, **SETTINGS)
    assert again.shards_skipped == 3 and again.counts == one_machine.counts
    _same_files(one_machine.output_dir, out)


def _headers(directory):
    shards = open_shards(directory)
    return [shard.header for shard in shards.shards]


def test_prepare_parts_together_are_the_one_machine_corpus(tmp_path, mixed_inputs, vocab_path, one_machine, capsys):
    out = tmp_path / "parts"
    for k in (2, 3, 1):  # any order, any machine
        argv = [*mixed_inputs, "--output", str(out), "--vocab", vocab_path, "--part", f"{k}/3", "--segmenter", "rjieba",
                "--chunk-size", "8", "--shard-size", "0.03"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
    dirs = shard_dirs(out)
    assert [d.name for d in dirs] == ["part-1-of-3", "part-2-of-3", "part-3-of-3"]
    whole = _headers(one_machine.output_dir)
    parts = [h for d in dirs for h in _headers(d)]
    assert len(parts) == len(whole) >= 6 and min(len(_headers(d)) for d in dirs) >= 2
    shard = 0
    for d in dirs:
        for local, header in enumerate(_headers(d)):
            kinds = ("ids", "wstart", "sentences", "documents")
            for kind in kinds:
                assert filecmp.cmp(d / f"shard-{local:05d}.{kind}", os.path.join(one_machine.output_dir,
                                   f"shard-{shard:05d}.{kind}"), shallow=False), (d, local, kind)  # fmt: skip
            differ = {k for k in header if header[k] != whole[shard][k]}
            assert differ <= {"index", "name", "files"}, differ
            assert [f["sha256"] for f in header["files"].values()] == [f["sha256"] for f in whole[shard]["files"].values()]
            shard += 1
    counts = {}
    for d in dirs:
        with open(d / "meta.json", encoding="utf-8") as f:
            for key, value in json.load(f)["counts"].items():
                counts[key] = counts.get(key, 0) + value
    assert counts == one_machine.counts, "the parts' counts add up to the one-machine run's"
    a = PretrainDataset(dirs, max_seq_len=64, pair="sop", seed=3)
    b = PretrainDataset(one_machine.output_dir, max_seq_len=64, pair="sop", seed=3)
    assert len(a) == len(b) > 100
    for i in (0, 1, len(a) // 2, len(a) - 1):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=f"example {i} {key}")
    assert main(["--verify", str(out)]) == 0
    assert capsys.readouterr().out.count("sha256 checksums good") == 3

    shutil.rmtree(dirs[1])
    with pytest.raises(ShardError, match=r"part-2-of-3 is missing: run python -m lub_fast\.prepare .* --part 2/3"):
        shard_dirs(out)
    os.remove(dirs[2] / "meta.json")
    (dirs[1]).mkdir()
    with pytest.raises(ShardError, match=r"part-2-of-3 is not finished \(no meta\.json\)"):
        shard_dirs(out)


def test_prepare_part_errors_are_one_line(tmp_path, corpus_path, vocab_path, capsys):
    base = [str(corpus_path), "--output", str(tmp_path / "o")]
    for args, message in (
        (["--vocab", vocab_path, "--part", "4/3"], "--part '4/3': give K/N with 1 <= K <= N"),
        (["--vocab", vocab_path, "--part", "x"], "--part 'x': give K/N"),
        (["--build-vocab", "500", "--part", "1/2"], "--part needs --vocab"),
    ):
        assert main(base + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lub_fast.prepare: error: {message}"), err
    assert not os.path.exists(tmp_path / "o" / "part-1-of-2" / "meta.json")
    with pytest.raises(ShardError, match="neither a shard directory"):
        shard_dirs(tmp_path)
