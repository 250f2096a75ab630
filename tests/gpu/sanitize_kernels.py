"""Runs every CUDA kernel of lub_fast once on small odd-sized inputs, for compute-sanitizer.

``compute-sanitizer --tool memcheck|racecheck|initcheck python3 tests/gpu/sanitize_kernels.py``
(benchmarks/gpu_run.sh does this). Covers: varlen attention fwd/bwd for head dims 32/64/128, bf16
and fp16, with and without dropout, lengths 1, 97, 0, 130, q, k, v contiguous and as views of one
[T, 3, H, D] tensor, and separate query/key layouts with dropout rows (queries at some positions,
one sequence with queries but no keys, one with keys but no queries), each backward both with dq
atomics and deterministic (the dK/dV kernel without dq and the dQ pass); bias+GELU fwd/bwd on the
vector and the scalar path. Exits non-zero when a kernel is missing or an output is not finite.
"""

import sys

import torch

from lub_fast import ops
from lub_fast.ops import attention, bias_gelu


def main():
    missing = [name for name in attention.OPS + bias_gelu.OPS if not ops.has_kernel(name, "cuda")]
    if missing:
        sys.exit(f"no CUDA kernel for {missing}: {ops.EXTENSION_ERRORS.get('lub_fast._C_cuda')}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    outputs = []
    lengths = [1, 97, 0, 130]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    counts = [1, 40, 3, 0]  # queries per sequence of the separate layouts; sequence 2 has no keys
    key_lengths = [1, 97, 0, 130]
    cu_q = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + torch.tensor(key_lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q_positions = torch.cat([torch.arange(c) * 2 for c in counts]).to(torch.int32).cuda()
    for dtype in (torch.bfloat16, torch.float16):
        for dim in (32, 64, 128):
            for p in (0.0, 0.1):
                q, k, v, do = (torch.randn(sum(lengths), 2, dim, generator=gen, device="cuda").to(dtype) for _ in range(4))
                args = (cu, cu, 130, 130, p, 5, 3, dim**-0.5)
                out, lse = torch.ops.lub_fast.varlen_attention_fwd(q, k, v, *args)
                outputs += [out, lse]
                for deterministic in (False, True):
                    outputs += torch.ops.lub_fast.varlen_attention_bwd(do, q, k, v, out, lse, *args, None, deterministic)
                # q, k, v as views of one [T, 3, H, D] projection (read in place with its row stride)
                qkv = torch.randn(sum(lengths), 3, 2, dim, generator=gen, device="cuda").to(dtype)
                out, lse = torch.ops.lub_fast.varlen_attention_fwd(*qkv.unbind(1), *args)
                outputs += [out, lse]
                for deterministic in (False, True):
                    outputs += torch.ops.lub_fast.varlen_attention_bwd(
                        do, *qkv.unbind(1), out, lse, *args, None, deterministic
                    )
            q, do = (torch.randn(sum(counts), 2, dim, generator=gen, device="cuda").to(dtype) for _ in range(2))
            k, v = (torch.randn(sum(key_lengths), 2, dim, generator=gen, device="cuda").to(dtype) for _ in range(2))
            args = (cu_q, cu_k, 40, 130, 0.1, 5, 3, dim**-0.5, q_positions)
            out, lse = torch.ops.lub_fast.varlen_attention_fwd(q, k, v, *args)
            outputs += [out, lse.masked_fill(torch.isinf(lse), 0.0)]
            for deterministic in (False, True):
                outputs += torch.ops.lub_fast.varlen_attention_bwd(do, q, k, v, out, lse, *args, deterministic)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (3072, 1001):  # vector path, scalar path
            x, g = (torch.randn(37, n, generator=gen, device="cuda").to(dtype) for _ in range(2))
            b = torch.randn(n, generator=gen, device="cuda")
            for approximate in ("none", "tanh"):
                outputs.append(torch.ops.lub_fast.bias_gelu_fwd(x, b.to(dtype), approximate))
                outputs.append(torch.ops.lub_fast.bias_gelu_bwd(g, x, b, approximate))
    torch.cuda.synchronize()
    bad = [i for i, t in enumerate(outputs) if not torch.isfinite(t).all()]
    if bad:
        sys.exit(f"non-finite outputs at {bad}")
    print(f"ran {len(outputs)} kernel outputs, all finite")


if __name__ == "__main__":
    main()
