"""Time one training step of the demo's model in fp32 and under CPU bf16 autocast, alternating.

    python benchmarks/quality/demo_step_precision.py [--repeats 2] [--threads 2] [--profile]

The model is ``lub_fast.recipes.demo_config``'s (the objective ``build_objective`` makes, vocab
8000) on a random batch of the demo's shape (128 x 32, 15% of positions masked), with AdamW. Each
measurement is the mean of 20 steps after 5 warm-up steps; ``--profile`` adds a ``torch.profiler``
table of 5 more steps. It answers whether ``--train.precision bf16`` speeds up the demo on a CPU
with AMX (benchmarks/results/2026-12-02-demo-recipe-cpu.md, session 7). Wall times on a shared VM
carry its steal; compare only the alternating pairs of one run.
"""

import argparse
import time

import torch

from lub_fast.recipes import build_objective, demo_config

BATCH, SEQ, VOCAB, RATE = 128, 32, 8000, 0.15


def make_step(bf16: bool):
    torch.manual_seed(0)
    objective, _ = build_objective(demo_config(), VOCAB, {"pad": 0})
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=gen)
    positions = torch.randperm(BATCH * SEQ, generator=gen)[: int(RATE * BATCH * SEQ)].sort().values
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "masked_positions": positions,
        "masked_labels": ids.view(-1)[positions],
    }
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = objective(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def time_step(step, n: int = 20) -> float:
    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"mkldnn bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, {args.threads} threads")
    for _ in range(args.repeats):
        for name in ("fp32", "bf16"):
            step = make_step(name == "bf16")
            print(f"{name}: {time_step(step) * 1e3:.1f} ms a step", flush=True)
            if args.profile:
                from torch.profiler import profile

                with profile() as prof:
                    for _ in range(5):
                        step()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
