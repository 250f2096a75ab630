"""DDP under torchrun (gloo, CPU): 2 processes give the same run as 1 process with the same global
batch, the ranks read disjoint examples, and a SIGTERM that reaches one rank only stops both at
the same step with a checkpoint that the 2-process run resumes from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lub_fast.checkpoint import list_checkpoints, load_checkpoint
from lub_fast.logging_utils import read_metrics
from lub_fast.train import TrainConfig, train
from train_toy import ToyObjective, eval_fn, make_batches

TOY = Path(__file__).with_name("train_toy.py")
REPO = Path(__file__).resolve().parents[2]
# No dropout and no padding: every micro-batch has the same token count, so the mean of the
# per-rank mean losses is the global mean loss. 4 steps of 2 micro-batches, 8 examples per step.
CONFIG = TrainConfig(total_steps=4, grad_accum_steps=2, lr=1e-2, save_every=2, eval_every=2, log_every=1,
                     device="cpu")
COMMON = ["--dropout", "0", "--no-pad", *(f"--train.{k}={getattr(CONFIG, k)}" for k in
                                          ("total_steps", "grad_accum_steps", "lr", "save_every", "eval_every"))]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _run(command):
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _seen(run_dir, rank):
    lines = (run_dir / f"seen_rank{rank}.jsonl").read_text().splitlines()
    return [i for line in lines for i in json.loads(line)]


def test_ddp_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    torch.manual_seed(0)  # the toy script's initialization
    single, single_seen = ToyObjective(dropout=0.0), []
    train(single, make_batches(4, pad=False, seen=single_seen), CONFIG, one, eval_fn=eval_fn)
    # rank 1 alone gets SIGTERM during micro-batch 3 (step 2): both ranks stop after step 2
    _run([*TORCHRUN, str(TOY), "--run-dir", str(two), "--batch-size", "2", *COMMON,
          "--term-at", "3", "--signal-rank", "1"])
    result = json.loads((two / "result.json").read_text())
    assert result["interrupted"] and result["step"] == 2 and result["samples"] == 16, result
    assert [len(_seen(two, r)) for r in (0, 1)] == [8, 8]
    _run([*TORCHRUN, str(TOY), "--run-dir", str(two), "--batch-size", "2", *COMMON, "--resume", "latest"])

    seen = [_seen(two, r) for r in (0, 1)]
    assert len(set(seen[0])) == len(seen[0]) == 16 and not set(seen[0]) & set(seen[1]), seen
    assert set(seen[0]) | set(seen[1]) == set(single_seen) == set(range(32))

    records = {d: read_metrics(d / "metrics.jsonl") for d in (one, two)}
    for key in ("loss", "accuracy", "grad_norm", "num_tokens", "num_samples"):
        a = [r[key] for r in records[one] if r["split"] == "train"]
        b = [r[key] for r in records[two] if r["split"] == "train"]
        assert len(a) == 4 and a == pytest.approx(b, rel=1e-5), (key, a, b)
    evals = [[r["loss"] for r in records[d] if r["split"] == "eval"] for d in (one, two)]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], rel=1e-5), evals

    final, expected = load_file(two / "final.safetensors"), single.state_dict()
    assert len(final) == len(expected) - 1  # the tied decoder weight is stored once
    for name, value in final.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # rank 0 alone wrote the checkpoints; they hold every rank's RNG state
    assert [p.name for p in list_checkpoints(two)] == ["step_00000002", "step_00000004"]
    state, _ = load_checkpoint(list_checkpoints(two)[-1], ToyObjective(dropout=0.0))
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["samples"] == 32, state["samples"]
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
