"""The training loop: learning, accumulation, clipping, logs, fp16/bf16/fp32 NaN handling, and
bit-exact resume after SIGKILL and after SIGTERM in the middle of an accumulation window."""

import json
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lub_fast import train as train_module
from lub_fast.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from lub_fast.config_cli import load_config
from lub_fast.logging_utils import MetricsLog, read_metrics
from lub_fast.models import EncoderConfig, MaskedLM
from lub_fast.train import NonFiniteError, TrainConfig, train
from train_toy import ToyObjective, eval_fn, make_batches

TOY = Path(__file__).with_name("train_toy.py")
REPO = Path(__file__).resolve().parents[2]


def _train(run_dir, dropout=0.0, batch_size=4, pad=True, **overrides):
    torch.manual_seed(0)
    objective = ToyObjective(dropout=dropout)
    config = TrainConfig(**{"lr": 1e-2, "log_every": 1, "device": "cpu", **overrides})
    result = train(objective, make_batches(batch_size, pad=pad), config, run_dir, eval_fn=eval_fn)
    return objective, result


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"]


def test_train_loop_loss_decreases_and_writes_logs(tmp_path):
    start = time.perf_counter()
    _, result = _train(tmp_path, dropout=0.1, total_steps=40, eval_every=20, lr=3e-2, log_every=5)
    wall = time.perf_counter() - start
    records = read_metrics(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [r["step"] for r in evals] == [20, 40], evals
    first, last = train_records[0], train_records[-1]
    assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])
    assert last["accuracy"] > first["accuracy"] + 0.3, (first["accuracy"], last["accuracy"])
    assert evals[-1]["accuracy"] > 0.5, evals
    # 40 steps x 4 examples; tokens are the non-pad ones (lengths 3..8)
    assert result.samples == 160 and 3 * 160 <= result.tokens <= 8 * 160, result
    assert sum(r["num_tokens"] for r in train_records) == result.tokens
    # a record's rate covers its own interval, which is shorter than the whole run
    assert all(r["tokens_per_s"] >= r["num_tokens"] / wall for r in train_records), (wall, train_records)
    # the lr that step s ran with: linear decay from 3e-2, no warmup (lr_factor of the 0-based step s - 1)
    assert [r["lr"] for r in train_records] == pytest.approx([3e-2 * (1 - (s - 1) / 40) for s in range(5, 41, 5)])
    assert result.eval_metrics == {k: v for k, v in evals[-1].items() if k not in ("split", "step")}
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert load_config(TrainConfig, tmp_path / "config.json") == TrainConfig(
        total_steps=40, eval_every=20, lr=3e-2, log_every=5, device="cpu", precision="fp32"  # auto, resolved
    )


def test_train_loop_metrics_log_resume_truncates_and_mirrors_tensorboard(tmp_path, monkeypatch):
    writers = []

    class FakeWriter:  # torch.utils.tensorboard.SummaryWriter's interface, recorded
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step, self.scalars = log_dir, purge_step, []
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLog(tmp_path, resume_step=None)
    for step in range(1, 6):
        log.write({"split": "train", "step": step, "loss": 1.0 / step, "accuracy": float("nan")})
    log.write({"split": "eval", "step": 5, "loss": 0.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "st')  # a killed writer's half line
    assert writers[0].purge_step is None and writers[0].log_dir == str(tmp_path / "tensorboard")
    assert ("train/loss", 0.5, 2) in writers[0].scalars and ("eval/loss", 0.5, 5) in writers[0].scalars
    assert not any(tag.endswith(("/split", "/step")) for tag, _, _ in writers[0].scalars)
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["accuracy"] is None  # NaN written as null

    MetricsLog(tmp_path, resume_step=3).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert writers[1].purge_step == 4
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3


def test_train_loop_accumulation_equals_big_batch(tmp_path):
    big, _ = _train(tmp_path / "big", batch_size=8, pad=False, total_steps=4, grad_accum_steps=1)
    accumulated, _ = _train(tmp_path / "acc", batch_size=2, pad=False, total_steps=4, grad_accum_steps=4)
    torch.testing.assert_close(_losses(tmp_path / "acc"), _losses(tmp_path / "big"), rtol=1e-6, atol=0)
    for name, value in big.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(big.hidden.weight, ToyObjective(dropout=0.0).hidden.weight)


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0])
def test_train_loop_clips_gradient_norm(tmp_path, max_grad_norm):
    seen = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(record_norm)
    try:
        _train(tmp_path, total_steps=3, max_grad_norm=max_grad_norm)
    finally:
        handle.remove()
    reported = [r["grad_norm"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert len(seen) == 3 and all(n > 1.0 for n in reported), (seen, reported)
    expected = [min(n, max_grad_norm) for n in reported] if max_grad_norm else reported
    assert seen == pytest.approx(expected, rel=1e-4), (seen, reported)


def test_train_loop_fp16_inf_loss_skips_step(tmp_path):
    torch.manual_seed(0)
    objective = ToyObjective(dropout=0.0)
    objective.inject_inf_at = 7  # first micro-batch of step 4 (2 per step)
    config = TrainConfig(total_steps=5, grad_accum_steps=2, precision="fp16", lr=1e-2, log_every=1,
                         save_every=1, keep_last=0, device="cpu")
    result = train(objective, make_batches(4), config, tmp_path)
    assert result.step == 5, result
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert records[4]["skipped_steps"] == 1 and records[4].get("loss") is None, records[4]
    assert records[3]["skipped_steps"] == 0 and records[3]["loss_scale"] == 65536.0, records[3]
    assert records[4]["loss_scale"] == 32768.0 and records[5]["loss_scale"] == 32768.0, records
    # the step after the skipped one trains normally, from step 3's weights
    assert records[5]["skipped_steps"] == 0 and abs(records[5]["loss"] - records[3]["loss"]) < 0.2 * records[3]["loss"], records
    weights = {s: load_file(tmp_path / "checkpoints" / f"step_{s:08d}" / "model.safetensors") for s in (2, 3, 4)}
    for name, value in weights[3].items():
        assert torch.equal(value, weights[4][name]), f"skipped step 4 changed {name}"
    assert not torch.equal(weights[2]["hidden.weight"], weights[3]["hidden.weight"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_loop_nonfinite_stops_with_step_and_rank(tmp_path, precision):
    torch.manual_seed(0)
    objective = ToyObjective(dropout=0.0)
    objective.inject_inf_at = 10  # second micro-batch of step 5
    config = TrainConfig(total_steps=8, grad_accum_steps=2, precision=precision, lr=1e-2, save_every=2,
                         keep_last=0, device="cpu")
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 5 \(micro-steps 8\.\.9\) on rank 0 of 1"):
        train(objective, make_batches(4), config, tmp_path)
    last = list_checkpoints(tmp_path)[-1]
    assert last.name == "step_00000004", last
    verify_checkpoint(last)
    before = ToyObjective(dropout=0.0)
    load_checkpoint(last, before)
    for name, value in before.state_dict().items():  # the update of step 5 was never applied
        assert torch.equal(value, objective.state_dict()[name]), name


def _run_toy(run_dir, *args, check=True):
    command = [sys.executable, str(TOY), "--run-dir", str(run_dir), "--dropout", "0.1", "--batch-size", "3",
               "--train.total_steps=8", "--train.grad_accum_steps=3", "--train.lr=1e-2", "--train.save_every=2",
               *args]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    _run_toy(run_dir)
    return run_dir


def _assert_same_run(run_dir, reference):
    assert _losses(run_dir) == _losses(reference), (_losses(run_dir), _losses(reference))
    assert len(_losses(run_dir)) == 8
    ours, theirs = load_file(run_dir / "final.safetensors"), load_file(reference / "final.safetensors")
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
    evals = lambda d: [r for r in read_metrics(d / "metrics.jsonl") if r["split"] == "eval"]  # noqa: E731
    assert evals(run_dir) == evals(reference)


def test_train_loop_resume_after_sigterm_mid_window_and_sigkill_is_bit_exact(tmp_path, reference_run):
    # 3 micro-batches per step, checkpoints every 2 steps. SIGTERM during micro-batch 11 (the 2nd
    # of step 4's window): a mid-window checkpoint with the accumulated gradients, exit status 0.
    stopped = _run_toy(tmp_path, "--term-at", "11")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["interrupted"] and result["step"] == 3 and result["micro_step"] == 11, result
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "step_00000003_micro_0002", [p.name for p in list_checkpoints(tmp_path)]
    assert (newest / "grads.safetensors").is_file()
    assert re.search(r"3/8", stopped.stderr), stopped.stderr[-500:]
    # resumed mid-window, then SIGKILL during the 9th micro-batch of this process (micro-batch 20,
    # inside step 7's window), after the step-6 checkpoint
    killed = _run_toy(tmp_path, "--resume", "latest", "--kill-at", "9", check=False)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert list_checkpoints(tmp_path)[-1].name == "step_00000006", list_checkpoints(tmp_path)
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) == 6
    _run_toy(tmp_path, "--resume", "latest")
    _assert_same_run(tmp_path, reference_run)


class _MaskedLMLoss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                          masked_positions=batch["masked_positions"]).loss, {}  # fmt: skip


def _encoder_batches(start, rank, world_size):
    step = start
    while True:
        gen = torch.Generator().manual_seed(step)
        lengths = torch.randint(1, 13, (3,), generator=gen)
        mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
        ids = torch.randint(5, 99, (3, 12), generator=gen) * mask
        positions = mask.reshape(-1).nonzero().squeeze(1)[::3]
        yield {"input_ids": ids, "attention_mask": mask, "masked_positions": positions,
               "labels": ids.reshape(-1)[positions]}  # fmt: skip
        step += 1


def test_train_loop_rounds_encoder_rows_while_it_runs(tmp_path):
    """``train`` rounds the encoder's rows up to ``TOKEN_MULTIPLE`` (few distinct activation sizes
    for the heap) for the run only: construction sets nothing, and train restores the setting."""
    config = EncoderConfig.preset("bert", "tiny", vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = MaskedLM(config)
    assert model.encoder.token_multiple == 1
    rows = []
    model.encoder.layers[0].register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    train(_MaskedLMLoss(model), _encoder_batches, TrainConfig(total_steps=6, device="cpu"), tmp_path)
    assert len(rows) == 6 and all(r % train_module.TOKEN_MULTIPLE == 0 for r in rows), rows
    assert train_module.TOKEN_MULTIPLE > 1 and model.encoder.token_multiple == 1
