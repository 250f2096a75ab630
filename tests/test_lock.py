"""``lub_fast.lock``: one writer per output directory, across processes; released by any exit
(SIGKILL included) and taken over with a note; reentrant and nestable in one process; rank 0's
alone under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lub_fast.errors import UsageError
from lub_fast.lock import LOCK_FILE, LockedError, holds, output_lock

HOLD = (
    "import sys, time\n"
    "from lub_fast.lock import output_lock\n"
    "with output_lock(sys.argv[1], 'pretrain'):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(60)\n"
)


def _holder(directory):
    """A process that holds ``directory``'s lock (as lub_fast.pretrain) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", proc.poll()
    return proc


def test_lock_second_writer_stops_at_once_naming_the_holder(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        started = time.perf_counter()
        with pytest.raises(LockedError) as caught, output_lock(tmp_path / "run", "prepare"):
            pytest.fail("entered a directory that another process holds")
        waited = time.perf_counter() - started
        message = str(caught.value)
        assert f"lub_fast.pretrain, PID {holder.pid} on host " in message and LOCK_FILE in message, message
        assert waited < 1.0, f"the second writer waited {waited:.2f} s"
        assert isinstance(caught.value, UsageError)
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["command"] == "lub_fast.pretrain", record
    finally:
        holder.kill()
        holder.wait()


def test_lock_released_by_sigkill_and_taken_over_with_a_note(tmp_path, capsys):
    holder = _holder(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    assert holder.wait() == -signal.SIGKILL
    assert (tmp_path / "run" / LOCK_FILE).exists()  # the dead holder's record stays behind
    with output_lock(tmp_path / "run", "convert"):
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["command"] == "lub_fast.convert", record
    err = capsys.readouterr().err
    lock_file = tmp_path / "run" / LOCK_FILE
    assert f"lub_fast.convert: note: took over {lock_file} from lub_fast.pretrain, PID {holder.pid}" in err, err
    assert "no longer runs" in err, err
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # a clean exit removes the file
    with output_lock(tmp_path / "run", "convert"):
        pass
    assert capsys.readouterr().err == ""  # nothing stale the second time


def test_lock_is_reentrant_and_nests_directories(tmp_path):
    run, shards = tmp_path / "run", tmp_path / "run" / "data" / "train"
    with output_lock(run, "pretrain"):
        with output_lock(run, "pretrain"):
            assert holds(run)
        assert holds(run) and not holds(shards)
        with output_lock(shards, "pretrain"):
            assert holds(shards)
            probe = subprocess.run(
                [sys.executable, "-c", HOLD, str(shards)], capture_output=True, text=True, timeout=60
            )
            assert probe.returncode == 1 and "LockedError" in probe.stderr, probe.stderr[-1000:]
        assert holds(run) and not holds(shards)
    assert not holds(run)


def test_lock_removes_the_directory_it_created_when_nothing_was_written(tmp_path):
    with output_lock(tmp_path / "empty", "convert"):
        assert (tmp_path / "empty" / LOCK_FILE).is_file()
    assert not (tmp_path / "empty").exists()
    with output_lock(tmp_path / "used", "convert"):
        (tmp_path / "used" / "model.safetensors").write_bytes(b"x")
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["model.safetensors"]


def test_lock_is_rank_0s_under_torchrun(tmp_path, monkeypatch):
    holder = _holder(tmp_path / "run")
    try:
        monkeypatch.setenv("RANK", "1")
        with output_lock(tmp_path / "run", "pretrain"):  # other ranks neither take nor wait for it
            assert not holds(tmp_path / "run")
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(LockedError), output_lock(tmp_path / "run", "pretrain"):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_lock_output_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(LockedError, match="taken: cannot create the output directory"):
        with output_lock(tmp_path / "taken", "prepare"):
            pass
