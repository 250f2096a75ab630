"""A toy objective and data source for the training-loop tests, runnable as a script.

The model is a tiny token classifier with LayerNorm, dropout and an output layer tied to the
embedding (so checkpoints must handle shared tensors); the task maps each token ``t`` to
``(3 t + 1) mod V`` at non-pad positions. Example ``i`` is a pure function of ``(seed, i)`` and
micro-batch ``m`` of rank ``r`` holds examples ``(m * world_size + r) * B + j``: the data contract of
``lub_fast.train``.

As a script (used for SIGKILL/SIGTERM and torchrun tests) it trains and writes
``final.safetensors`` and ``result.json`` into the run directory (rank 0) and appends the example
indices each rank read to ``seen_rank<r>.jsonl`` (one line per run).
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

VOCAB = 37
LENGTH = 8


class ToyObjective(nn.Module):
    """Per-token classification; ``signal_at``: (forward call number, signal) sent to itself."""

    def __init__(self, dim: int = 16, dropout: float = 0.1, signal_at: tuple[int, int] | None = None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, VOCAB)
        self.out.weight = self.embed.weight  # tied, as BERT's MLM decoder
        self.signal_at = signal_at
        self.calls = 0
        self.inject_inf_at: int | None = None

    def forward(self, batch):
        if self.training:
            self.calls += 1
            if self.signal_at is not None and self.calls == self.signal_at[0]:
                os.kill(os.getpid(), self.signal_at[1])
        x = self.norm(self.embed(batch["input_ids"]))
        x = self.dropout(torch.nn.functional.gelu(self.hidden(x))) + x
        logits = self.out(x).float()
        mask = batch["attention_mask"].bool()
        loss = nn.functional.cross_entropy(logits[mask], batch["labels"][mask])
        if self.training and self.inject_inf_at is not None and self.calls == self.inject_inf_at:
            loss = loss * float("inf")
        accuracy = (logits[mask].argmax(-1) == batch["labels"][mask]).float().mean()
        return loss, {"accuracy": accuracy}


def example(seed: int, index: int, pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of example ``index``: a pure function of (seed, index)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    ids = torch.randint(1, VOCAB, (LENGTH,), generator=g)
    length = int(torch.randint(3, LENGTH + 1, (1,), generator=g)) if pad else LENGTH
    mask = torch.arange(LENGTH) < length
    return ids * mask, mask.long()


def make_batches(batch_size: int, seed: int = 0, pad: bool = True, seen: list | None = None):
    """The ``batches(start_micro_step, rank, world_size)`` callable of ``lub_fast.train``."""

    def batches(start: int, rank: int, world_size: int):
        m = start
        while True:
            first = (m * world_size + rank) * batch_size
            indices = list(range(first, first + batch_size))
            if seen is not None:
                seen.extend(indices)
            ids, mask = zip(*(example(seed, i, pad) for i in indices))
            ids, mask = torch.stack(ids), torch.stack(mask)
            yield {"input_ids": ids, "attention_mask": mask, "labels": (3 * ids + 1) % VOCAB}
            m += 1

    return batches


def eval_fn(objective: nn.Module) -> dict:
    """Loss and accuracy on 16 held-out examples (indices far beyond the training ones)."""
    ids, mask = zip(*(example(12345, 10**6 + i, True) for i in range(16)))
    ids, mask = torch.stack(ids), torch.stack(mask)
    loss, metrics = objective({"input_ids": ids, "attention_mask": mask, "labels": (3 * ids + 1) % VOCAB})
    return {"loss": float(loss), "accuracy": float(metrics["accuracy"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--no-pad", action="store_true")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--kill-at", type=int, help="SIGKILL itself at this training forward call")
    parser.add_argument("--term-at", type=int, help="SIGTERM itself at this training forward call")
    parser.add_argument("--signal-rank", type=int, help="only this rank signals itself (default: all)")
    args, rest = parser.parse_known_args(argv)

    torch.set_num_threads(1)
    from lub_fast.config_cli import resolve_config
    from lub_fast.train import TrainConfig, init_distributed, shutdown_distributed, train

    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        train: TrainConfig = TrainConfig(log_every=1, save_every=2, device="cpu")

    run_config, unknown = resolve_config(ToyConfig(), rest)
    config = run_config.train
    if unknown:
        parser.error(f"unrecognized arguments: {unknown}")
    env = init_distributed("cpu")
    signal_at = None
    if args.signal_rank in (None, env.rank):
        if args.kill_at:
            signal_at = (args.kill_at, signal.SIGKILL)
        elif args.term_at:
            signal_at = (args.term_at, signal.SIGTERM)
    torch.manual_seed(0)
    objective = ToyObjective(dropout=args.dropout, signal_at=signal_at)
    seen = []
    batches = make_batches(args.batch_size, pad=not args.no_pad, seen=seen)
    result = train(objective, batches, config, args.run_dir, eval_fn=eval_fn, resume=args.resume, run_config=run_config)
    run_dir = Path(args.run_dir)
    with open(run_dir / f"seen_rank{env.rank}.jsonl", "a") as f:  # one line per process run
        f.write(json.dumps(seen) + "\n")
    if env.rank == 0:
        save_model(objective, str(run_dir / "final.safetensors"))
        summary = {"step": result.step, "micro_step": result.micro_step, "samples": result.samples,
                   "interrupted": result.interrupted, "checkpoint": str(result.checkpoint)}
        (run_dir / "result.json").write_text(json.dumps(summary))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
