"""What the benchmarks share: the git revision a run measures (``git_revision``, recorded by
``conftest.py`` in every result), and the summary of interleaved provider timings
(``bench_encoder.py``, ``bench_pretrain.py``).

``times[provider]`` holds ``(seconds, real tokens)`` per timed step; both providers ran the same
batches in alternating order, so the ratio of their token rates is the comparison that holds on a
noisy machine.
"""

import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_revision(repo: Path = REPO) -> dict:
    """The code a run measures: ``{"git_revision": HEAD's sha, "git_dirty": bool, "git_changes":
    [paths]}``, where ``git_changes`` lists modified and untracked files (results files under
    ``benchmarks/results/`` aside: writing them does not change what was measured). Outside a git
    checkout the sha is ``"unknown"`` and the tree counts as dirty."""

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"git_revision": "unknown", "git_dirty": True, "git_changes": ["(not a git checkout)"]}
    status = git("status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    changes = [line[3:] for line in status if not line[3:].startswith("benchmarks/results/")]
    return {"git_revision": head.stdout.strip(), "git_dirty": bool(changes), "git_changes": changes}


def describe_revision(revision: dict) -> str:
    """One line for a results file: ``git <sha> (clean)`` or ``git <sha> + uncommitted changes to
    ... (dirty tree: not a revision anyone can check out)``."""
    sha = revision["git_revision"][:12]
    if not revision["git_dirty"]:
        return f"git {sha} (clean)"
    changes = revision["git_changes"]
    listed = ", ".join(changes[:5]) + (f" and {len(changes) - 5} more" if len(changes) > 5 else "")
    return f"git {sha} + uncommitted changes to {listed} (dirty tree: not a revision anyone can check out)"


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
