"""``python -m lub_fast.prepare`` as a process among others: a second run into the same
``--output`` stops at once naming the first (which then finishes a valid corpus), and SIGTERM
stops a run with exit code 143, after which the same command completes the same shards."""

import filecmp
import os
import signal
import subprocess
import sys
import time

from lub_fast.data.shards import open_shards
from lub_fast.lock import LOCK_FILE
from lub_fast.data.pipeline import prepare_corpus
from lub_fast.prepare import main


def _start(inputs, out, vocab_path):
    command = [sys.executable, "-m", "lub_fast.prepare", *map(str, inputs), "--output", str(out),
               "--vocab", vocab_path, "--segmenter", "jieba", "--chunk-size", "8"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / LOCK_FILE).is_file() or not (out / LOCK_FILE).read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it held the lock"
        time.sleep(0.005)
    return proc


def test_prepare_second_run_into_one_output_stops_naming_the_first(tmp_path, vocab_path, corpus_path, real_lines,
                                                                   write_documents, capsys):  # fmt: skip
    other = write_documents(str(tmp_path / "other.txt"), real_lines[1500:1600])
    out = tmp_path / "out"
    first = _start([corpus_path], out, vocab_path)
    first.send_signal(signal.SIGSTOP)
    try:
        assert main([other, "--output", str(out), "--vocab", vocab_path, "--segmenter", "none"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lub_fast.prepare: error: {out} is in use by lub_fast.prepare, "
                                                   f"PID {first.pid} on host "), err  # fmt: skip
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    alone = prepare_corpus([corpus_path], str(tmp_path / "alone"), vocab=vocab_path, segmenter="jieba", chunk_kb=8)
    assert open_shards(out).num_documents == alone.documents > 0
    _same_files(out, tmp_path / "alone")


def test_prepare_sigterm_exits_143_and_the_same_command_completes(tmp_path, vocab_path, corpus_path):
    out = tmp_path / "out"
    stopped = _start([corpus_path], out, vocab_path)
    stopped.send_signal(signal.SIGTERM)
    _, stderr = stopped.communicate(timeout=300)
    assert stopped.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "lub_fast.prepare: stopped by SIGTERM; run the same command again to continue"
    ), stderr[-3000:]
    again = subprocess.run([sys.executable, "-m", "lub_fast.prepare", corpus_path, "--output", str(out), "--vocab",
                            vocab_path, "--segmenter", "jieba", "--chunk-size", "8"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    prepare_corpus([corpus_path], str(tmp_path / "whole"), vocab=vocab_path, segmenter="jieba", chunk_kb=8)
    _same_files(out, tmp_path / "whole")


def _same_files(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)), (names, sorted(os.listdir(b)))
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, f"differ: {mismatch + errors}"
