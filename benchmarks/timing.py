"""Shared summary of interleaved provider timings (``bench_encoder.py``, ``bench_pretrain.py``).

``times[provider]`` holds ``(seconds, real tokens)`` per timed step; both providers ran the same
batches in alternating order, so the ratio of their token rates is the comparison that holds on a
noisy machine.
"""

import statistics
import time


def run_interleaved(benchmark, steps: dict, inputs: list, rounds: int, real_tokens: list) -> dict:
    """Time ``rounds`` rounds under pytest-benchmark; round ``i`` runs every provider's step
    (``steps[name](inputs[i % len(inputs)])``) once, in dict order on even rounds and reversed on
    odd ones, after one untimed warm-up round. Returns ``times`` for ``summarise``."""
    times = {name: [] for name in steps}
    state = {"round": 0}

    def one_round():
        i = state["round"]
        item, tokens = inputs[i % len(inputs)], real_tokens[i % len(inputs)]
        order = list(steps.items())
        for name, step in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step(item)
            times[name].append((time.perf_counter() - start, tokens))
        state["round"] += 1

    one_round()  # warm-up: allocator, thread pools, optimizer state, first-call overheads
    for t in times.values():
        t.clear()
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    return times


def summarise(times: dict, real_tokens: list, batch_size: int, seq: int, threads: int) -> dict:
    """Median step time and real tokens/s per provider, padding fraction, and each provider's
    speedup over ``transformers``."""
    info = {
        "batch": f"{batch_size}x{seq}",
        "threads": threads,
        "padding_fraction": 1 - sum(real_tokens) / (len(real_tokens) * batch_size * seq),
    }
    for name, samples in times.items():
        info[f"{name}_median_s"] = statistics.median(s for s, _ in samples)
        info[f"{name}_tokens_per_s"] = sum(n for _, n in samples) / sum(s for s, _ in samples)
    for name in times:
        if name != "transformers":
            info[f"speedup_{name}_over_transformers"] = info[f"{name}_tokens_per_s"] / info["transformers_tokens_per_s"]
    return info
