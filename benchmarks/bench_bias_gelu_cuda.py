"""Fused bias + GELU on a CUDA GPU: lub_fast's kernels vs eager PyTorch, torch.compile and a copy.

Shape: BERT-base feed-forward activations, [16384 tokens, 3072], bf16 (bias bf16) and fp32.
Forward moves x in and y out; backward moves grad_out and x in and grad_x out; the bias stays in L2.
Providers per direction: ``lub_fast`` (``bias_gelu_fwd`` / ``bias_gelu_bwd``), ``eager``
(``gelu(x + bias)`` / ``aten.gelu_backward(g, x + bias)``), ``compile`` (``torch.compile`` of eager).
The ceiling is a device-to-device copy of the same tensor, timed the same way (bytes read + written).
Each is timed with CUDA events (median of ``REPS`` after ``WARMUP``); ``lub_fast`` is also the
pytest-benchmark measurement. ``extra_info`` holds per provider the median ms, GB/s and the ratio
provider time / lub_fast time, plus ``lub_fast_over_copy_bandwidth``.

Run on a GPU machine: ``pytest benchmarks/bench_bias_gelu_cuda.py --benchmark-enable --benchmark-only -s``.
"""

import statistics

import pytest
import torch
import torch.nn.functional as F

from lub_fast import ops

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

ROWS, N = 16384, 3072
WARMUP, REPS = 10, 50


def median_ms(fn):
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _eager_bwd(g, x, b):
    return torch.ops.aten.gelu_backward(g, x + b)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bias_gelu_cuda(benchmark, dtype, direction):
    assert ops.has_kernel("bias_gelu_fwd", "cuda"), ops.EXTENSION_ERRORS.get("lub_fast._C_cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, g = (torch.randn(ROWS, N, generator=gen, device="cuda").to(dtype) for _ in range(2))
    b = torch.randn(N, generator=gen, device="cuda").to(dtype)
    copy_dst = torch.empty_like(x)
    if direction == "fwd":
        runs = {
            "lub_fast": lambda: torch.ops.lub_fast.bias_gelu_fwd(x, b, "none"),
            "eager": lambda: F.gelu(x + b),
            "compile": (lambda f: lambda: f(x, b))(torch.compile(lambda x, b: F.gelu(x + b))),
        }
        tensors_moved = 2
    else:
        runs = {
            "lub_fast": lambda: torch.ops.lub_fast.bias_gelu_bwd(g, x, b, "none"),
            "eager": lambda: _eager_bwd(g, x, b),
            "compile": (lambda f: lambda: f(g, x, b))(torch.compile(_eager_bwd)),
        }
        tensors_moved = 3
    nbytes = tensors_moved * x.numel() * x.element_size()
    copy_ms = median_ms(lambda: copy_dst.copy_(x))
    copy_gbs = 2 * x.numel() * x.element_size() / copy_ms / 1e6
    times = {name: median_ms(run) for name, run in runs.items()}
    base = times["lub_fast"]
    benchmark.extra_info["copy_gbs"] = round(copy_gbs, 1)
    for name, ms in times.items():
        benchmark.extra_info[f"{name}_ms"] = round(ms, 4)
        benchmark.extra_info[f"{name}_gbs"] = round(nbytes / ms / 1e6, 1)
        benchmark.extra_info[f"{name}_over_lub_fast"] = round(ms / base, 3)
    benchmark.extra_info["lub_fast_over_copy_bandwidth"] = round(nbytes / base / 1e6 / copy_gbs, 3)
    print(
        f"\n{direction} {dtype}: copy {copy_gbs:.0f} GB/s; "
        + ", ".join(f"{k} {v:.3f} ms ({nbytes / v / 1e6:.0f} GB/s)" for k, v in times.items())
    )

    def run_synced():
        runs["lub_fast"]()
        torch.cuda.synchronize()

    benchmark.pedantic(run_synced, rounds=REPS, warmup_rounds=WARMUP)
