"""Attention forward + backward on a CUDA GPU: lub_fast's kernels vs PyTorch SDPA, eager and compile.

Shapes are BERT-base heads (H = 12, D = 64, bf16) at 16384 tokens per batch:

- ``dense-128`` / ``dense-512``: every sequence full (B = 128 / 32);
- ``padded50-512``: lengths uniform in [1, 512) with seed 0, about 50% padding of a [B, 512] grid;
  lub_fast runs varlen on the real tokens only, SDPA gets the padded batch with a boolean key mask.

Providers (fwd + bwd of the attention alone, dout random, dropout off): ``lub_fast`` (varlen op),
``sdpa`` (default backend choice),
``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn`` / ``sdpa_math`` (one backend forced; skipped
where a backend rejects the inputs), ``eager`` (matmul / softmax / matmul in bf16) and
``compile`` (``torch.compile`` of eager). Each is timed with CUDA events (median of ``REPS`` after
``WARMUP``); ``lub_fast`` is also the pytest-benchmark measurement. ``extra_info`` holds per provider
the median ms, TFLOP/s on real tokens (fwd 4 S^2 D H per sequence, bwd 2.5x that, as FlashAttention
counts) and the ratio provider time / lub_fast time.

Run on a GPU machine: ``pytest benchmarks/bench_attention_cuda.py --benchmark-enable --benchmark-only -s``.
"""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from lub_fast import ops

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

HEADS, DIM, TOKENS = 12, 64, 16384
DTYPE = torch.bfloat16
WARMUP, REPS = 5, 30
SHAPES = ("dense-128", "dense-512", "padded50-512")


def lengths_of(shape):
    kind, seqlen = shape.split("-")
    seqlen = int(seqlen)
    if kind == "dense":
        return [seqlen] * (TOKENS // seqlen), seqlen
    gen = torch.Generator().manual_seed(0)
    return torch.randint(1, seqlen, (TOKENS // seqlen,), generator=gen).tolist(), seqlen


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


def eager_attention(q, k, v, mask):
    """[B, H, S, D] attention in the input dtype; ``mask`` bool [B, 1, 1, S] or None."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def providers(lengths, seqlen):
    """name -> zero-argument callable running forward + backward once."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    batch, total = len(lengths), sum(lengths)
    mask = torch.arange(seqlen, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    dense = bool(mask.all())
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v, dout = (torch.randn(total, HEADS, DIM, generator=gen, device="cuda", dtype=DTYPE) for _ in range(4))
    qkv = [t.requires_grad_() for t in (q, k, v)]

    def padded(x):
        out = x.new_zeros(batch, seqlen, HEADS, DIM)
        out[mask] = x.detach()
        return out

    qp, kp, vp, doutp = (padded(t) for t in (q, k, v, dout))
    qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (qp, kp, vp))
    douth = doutp.transpose(1, 2).contiguous()
    mask4 = None if dense else mask[:, None, None, :]

    def run_varlen():
        out = ops.attention.varlen_attention(*qkv, cu, cu, seqlen, seqlen)
        torch.autograd.grad(out, qkv, dout)

    def run_sdpa(backend=None):
        def run():
            if backend is None:
                out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask4)
            else:
                with torch.nn.attention.sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask4)
            torch.autograd.grad(out, (qh, kh, vh), douth)

        return run

    compiled = torch.compile(eager_attention)

    def run_eager(fn):
        def run():
            out = fn(qh, kh, vh, mask4)
            torch.autograd.grad(out, (qh, kh, vh), douth)

        return run

    backends = torch.nn.attention.SDPBackend
    return {
        "lub_fast": run_varlen,
        "sdpa": run_sdpa(),
        "sdpa_flash": run_sdpa(backends.FLASH_ATTENTION),
        "sdpa_efficient": run_sdpa(backends.EFFICIENT_ATTENTION),
        "sdpa_cudnn": run_sdpa(backends.CUDNN_ATTENTION),
        "sdpa_math": run_sdpa(backends.MATH),
        "eager": run_eager(eager_attention),
        "compile": run_eager(compiled),
    }


@pytest.mark.parametrize("shape", SHAPES)
def test_attention_fwd_bwd_cuda(benchmark, shape):
    assert ops.has_kernel("varlen_attention_fwd", "cuda"), ops.EXTENSION_ERRORS.get("lub_fast._C_cuda")
    lengths, seqlen = lengths_of(shape)
    flops = 3.5 * 4 * HEADS * DIM * sum(n * n for n in lengths)  # fwd + bwd (bwd = 2.5 fwd)
    runs = providers(lengths, seqlen)
    times = {}
    for name, run in runs.items():
        try:
            times[name] = median_ms(run)
        except RuntimeError as e:  # a forced SDPA backend that rejects these inputs
            benchmark.extra_info[f"{name}_error"] = str(e).splitlines()[0][:200]
    base = times["lub_fast"]
    for name, ms in times.items():
        benchmark.extra_info[f"{name}_ms"] = round(ms, 4)
        benchmark.extra_info[f"{name}_tflops"] = round(flops / ms / 1e9, 1)
        benchmark.extra_info[f"{name}_over_lub_fast"] = round(ms / base, 3)
    sdpa_best = min(v for k, v in times.items() if k.startswith("sdpa"))
    benchmark.extra_info["best_sdpa_over_lub_fast"] = round(sdpa_best / base, 3)
    print(f"\n{shape}: " + ", ".join(f"{k} {v:.3f} ms ({flops / v / 1e9:.0f} TFLOP/s)" for k, v in times.items()))

    def run_synced():
        runs["lub_fast"]()
        torch.cuda.synchronize()

    benchmark.pedantic(run_synced, rounds=REPS, warmup_rounds=WARMUP)
