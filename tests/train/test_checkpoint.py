"""Atomic checkpoints: tied weights, weights_only state, keep-last, fallback from a bad newest one
(set aside only by the run's owner), a crash mid-save, a full disk, a reader of a live run that
prunes, and RNG state round trips; ``train(resume="latest")`` after a corruption."""

import errno
import io
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lub_fast.checkpoint as ckpt
from lub_fast.checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    remove_stale_tmp,
    save_checkpoint,
    verify_checkpoint,
)
from lub_fast.lock import output_lock
from lub_fast.train import TrainConfig, train
from train_toy import ToyObjective, make_batches


def _state(step):
    return {"step": step, "micro_step": 3 * step, "values": torch.arange(5.0) * step, "names": ["a", "b"]}


def test_checkpoint_roundtrip_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = ToyObjective()
    assert model.out.weight is model.embed.weight
    grads = {"hidden.weight": torch.randn(16, 16)}
    path = save_checkpoint(tmp_path, checkpoint_name(7, 2), model, _state(7), grads)
    assert path.name == "step_00000007_micro_0002", path.name
    manifest = verify_checkpoint(path)
    assert set(manifest["files"]) == {"model.safetensors", "grads.safetensors", "state.pt"}, manifest["files"]
    torch.manual_seed(1)
    fresh = ToyObjective()
    state, loaded_grads = load_checkpoint(path, fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.out.weight is fresh.embed.weight  # tying survives the load
    assert state["step"] == 7 and torch.equal(state["values"], _state(7)["values"]), state
    assert torch.equal(loaded_grads["hidden.weight"], grads["hidden.weight"])
    torch.load(path / "state.pt", weights_only=True)  # nothing that needs unpickling


def test_checkpoint_keep_last_prunes_oldest(tmp_path):
    model = ToyObjective()
    for step in (1, 2, 3, 10, 11):
        save_checkpoint(tmp_path, checkpoint_name(step), model, _state(step), keep_last=3)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000003", "step_00000010", "step_00000011"], names
    # same position saved again (SIGTERM right after a resume) replaces it atomically
    save_checkpoint(tmp_path, checkpoint_name(11), model, _state(11), keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == names
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_checkpoint_bad_newest_falls_back_with_warning(tmp_path, damage):
    model = ToyObjective()
    for step in (2, 4):
        save_checkpoint(tmp_path, checkpoint_name(step), model, _state(step))
    newest = tmp_path / "checkpoints" / "step_00000004"
    if damage == "truncate":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray((newest / "state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "state.pt").write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    reason = {"truncate": "truncated", "flip": "SHA-256", "no_manifest": "no manifest.json"}[damage]
    with pytest.raises(CheckpointError, match=re.escape(str(newest)) + ".*" + re.escape(reason)):
        load_checkpoint(newest, ToyObjective())  # explicitly requested: a named error
    with pytest.warns(UserWarning, match=re.escape(str(newest)) + ".*falling back"):
        chosen = latest_valid_checkpoint(tmp_path)  # a reader: reports, changes nothing
    assert chosen.name == "step_00000002" and newest.is_dir(), chosen
    with output_lock(tmp_path, "test"), pytest.warns(UserWarning, match="moved to invalid-step_00000004"):
        chosen = latest_valid_checkpoint(tmp_path)  # the owner sets it aside
    assert chosen.name == "step_00000002", chosen
    assert (tmp_path / "checkpoints" / "invalid-step_00000004").is_dir() and not newest.exists()
    assert latest_valid_checkpoint(tmp_path).name == "step_00000002"  # no second warning needed


def test_checkpoint_all_invalid_is_an_error(tmp_path):
    save_checkpoint(tmp_path, checkpoint_name(1), ToyObjective(), _state(1))
    (tmp_path / "checkpoints" / "step_00000001" / "state.pt").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no valid checkpoint"):
        latest_valid_checkpoint(tmp_path)


def test_checkpoint_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    model = ToyObjective()
    save_checkpoint(tmp_path, checkpoint_name(1), model, _state(1))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, checkpoint_name(2), model, _state(2))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert latest_valid_checkpoint(tmp_path).name == "step_00000001"
    assert remove_stale_tmp(tmp_path) == []  # the failed save removed its partial copy itself


def test_checkpoint_rng_state_roundtrip(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = ckpt.rng_state(torch.device("cpu"))
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.rand(4), np.random.randn(3), [random.random() for _ in range(4)])
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    got = (torch.rand(4), np.random.rand(4), np.random.randn(3), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and np.array_equal(expected[2], got[2])
    assert expected[3] == got[3]


def _toy_train(run_dir, total_steps, optimizer, precision, resume=None):
    torch.manual_seed(0)
    objective = ToyObjective(dropout=0.1)
    config = TrainConfig(total_steps=total_steps, grad_accum_steps=2, optimizer=optimizer, precision=precision,
                         lr=1e-2, schedule="constant", save_every=2, keep_last=0, log_every=1, device="cpu")
    result = train(objective, make_batches(3), config, run_dir, resume=resume)
    return objective, result


@pytest.mark.parametrize("optimizer, precision", [("adamw", "fp32"), ("lamb", "bf16"), ("adamw", "fp16")])
def test_checkpoint_train_resume_latest_skips_corrupted(tmp_path, optimizer, precision):
    reference, _ = _toy_train(tmp_path / "ref", 8, optimizer, precision)
    _toy_train(tmp_path / "run", 6, optimizer, precision)
    newest = tmp_path / "run" / "checkpoints" / "step_00000006"
    (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        _toy_train(tmp_path / "run", 8, optimizer, precision)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {newest}: state.pt has 100 bytes")):
        _toy_train(tmp_path / "run", 8, optimizer, precision, resume=newest)
    with pytest.warns(UserWarning) as warned:
        resumed, result = _toy_train(tmp_path / "run", 8, optimizer, precision, resume="latest")
    messages = [str(w.message) for w in warned]
    assert any(re.search("step_00000006.*truncated", m) for m in messages), messages
    assert any("changed training config: total_steps: 6 -> 8" in m for m in messages), messages
    assert result.step == 8 and result.checkpoint.name == "step_00000008", result
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == list(range(1, 9)), lines


class _FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC."""

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_checkpoint_full_disk_is_named_and_leaves_no_partial_copy(tmp_path, monkeypatch, writer):
    """torch.save's chain ends in ``RuntimeError: [enforce fail at inline_container.cc]``; the
    error must still say what happened, where, and how much room was needed."""
    model = ToyObjective()
    save_checkpoint(tmp_path, checkpoint_name(1), model, _state(1))
    if writer == "torch.save":
        save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f: save(obj, _FullDisk()))
    else:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(ckpt, "save_model", full)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(tmp_path, checkpoint_name(2), model, _state(2), keep_last=1)
    message = str(caught.value)
    root = tmp_path / "checkpoints"
    assert message.startswith(f"no space left on the device of {root} while saving step_00000002 (about 0.0"), message
    assert " MB needed" in message, message
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]  # no .tmp-*, nothing pruned
    verify_checkpoint(root / "step_00000001")


def test_checkpoint_full_tmpfs_is_named_and_leaves_no_partial_copy(tmp_path):
    """A real full filesystem (a 1 MiB tmpfs, where this process may mount one)."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        model = ToyObjective()
        save_checkpoint(small, checkpoint_name(1), model, _state(1))
        with open(small / "filler", "wb", buffering=0) as filler, pytest.raises(OSError, match="No space"):
            while True:
                filler.write(b"\0" * 4096)
        with pytest.raises(CheckpointError, match="no space left on the device of " + re.escape(str(small))):
            save_checkpoint(small, checkpoint_name(2), model, _state(2))
        assert sorted(p.name for p in (small / "checkpoints").iterdir()) == ["step_00000001"]
        verify_checkpoint(small / "checkpoints" / "step_00000001")
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_checkpoint_reader_of_a_live_pruning_run_never_breaks_it(tmp_path):
    """A trainer saves every step and keeps 1 (so it prunes every step) while this process loads
    the run's newest checkpoint in a loop: the trainer finishes, every load succeeds, and
    nothing of the run was renamed."""
    toy = Path(__file__).with_name("train_toy.py")
    trainer = subprocess.Popen(
        [sys.executable, str(toy), "--run-dir", str(tmp_path), "--dropout", "0", "--train.total_steps=12",
         "--train.save_every=1", "--train.keep_last=1", "--train.log_every=50"],  # fmt: skip
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    loads, steps = 0, set()
    while trainer.poll() is None:
        loaded = load_latest_checkpoint(tmp_path, ToyObjective(dropout=0.0))
        if loaded is not None:
            loads += 1
            steps.add(loaded[1]["step"])
        time.sleep(0.02)  # leave the trainer a core
    stderr = trainer.stderr.read()
    assert trainer.returncode == 0, stderr[-3000:]
    assert loads >= 5 and len(steps) >= 3, f"only {loads} loads of {len(steps)} steps while the trainer ran"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000012"]
