"""``python -m lub_fast.prepare``: the command line over ``lub_fast.data.pipeline``."""

import shutil

import numpy as np
import pytest

from lub_fast.data.shards import open_shards
from lub_fast.prepare import main


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


def test_prepare_verify_names_the_corrupt_shard_file(tmp_path, prepared_dir, capsys):

    copy = tmp_path / "shards"
    shutil.copytree(prepared_dir, copy)
    assert main(["--verify", str(copy)]) == 0
    assert "sha256 checksums good" in capsys.readouterr().out
    ids = np.memmap(copy / "shard-00002.ids", dtype="<u2", mode="r+")
    ids[7] ^= 1  # still a valid id: only the checksum sees it
    ids.flush()
    del ids
    assert main(["--verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lub_fast.prepare: error: "), err
    assert f"{copy / 'shard-00002.ids'}: sha256" in err[0], err
    with pytest.raises(SystemExit) as e:
        main(["--verify", str(copy), "--output", str(tmp_path / "o")])
    assert e.value.code == 2
