"""Shared summary of interleaved provider timings (``bench_encoder.py``, ``bench_pretrain.py``).

``times[provider]`` holds ``(seconds, real tokens)`` per timed step; both providers ran the same
batches in alternating order, so the ratio of their token rates is the comparison that holds on a
noisy machine.
"""

import statistics


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
