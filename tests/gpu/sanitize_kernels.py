"""Runs every CUDA kernel of lub_fast once on small odd-sized inputs, for compute-sanitizer.

``compute-sanitizer --tool memcheck|racecheck|initcheck python3 tests/gpu/sanitize_kernels.py``
(benchmarks/gpu_run.sh does this). Covers: varlen attention fwd/bwd for head dims 32/64/128, bf16
and fp16, with and without dropout, lengths 1, 97, 0, 130, q, k, v contiguous and as views of one
[T, 3, H, D] tensor; padded attention fwd/bwd with right padding and with holes; bias+GELU fwd/bwd
on the vector and the scalar path; wwm_mask in every mode for T = 1, 97, 512 (shared-memory
scratch) and 1100 (global workspace) with an empty row and rows not 16-byte aligned. Exits non-zero when a kernel is missing or an output is not finite.
"""

import sys

import torch

from lub_fast import ops


def main():
    missing = [name for name in ops.OP_NAMES if not ops.has_kernel(name, "cuda")]
    if missing:
        sys.exit(f"no CUDA kernel for {missing}: {ops.EXTENSION_ERRORS.get('lub_fast._C_cuda')}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    outputs = []
    lengths = [1, 97, 0, 130]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    mask = torch.arange(130, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    holes = mask & (torch.rand(mask.shape, generator=gen, device="cuda") < 0.7)
    for dtype in (torch.bfloat16, torch.float16):
        for dim in (32, 64, 128):
            for p in (0.0, 0.1):
                q, k, v, do = (torch.randn(sum(lengths), 2, dim, generator=gen, device="cuda").to(dtype) for _ in range(4))
                args = (cu, 130, p, 5, 3, dim**-0.5)
                out, lse = torch.ops.lub_fast.varlen_attention_fwd(q, k, v, *args)
                outputs += [out, lse, *torch.ops.lub_fast.varlen_attention_bwd(do, q, k, v, out, lse, *args)]
                # q, k, v as views of one [T, 3, H, D] projection (read in place with its row stride)
                qkv = torch.randn(sum(lengths), 3, 2, dim, generator=gen, device="cuda").to(dtype)
                out, lse = torch.ops.lub_fast.varlen_attention_fwd(*qkv.unbind(1), *args)
                outputs += [out, lse, *torch.ops.lub_fast.varlen_attention_bwd(do, *qkv.unbind(1), out, lse, *args)]
            for m in (mask, holes):
                q, k, v, do = (torch.randn(4, 130, 2, dim, generator=gen, device="cuda").to(dtype) for _ in range(4))
                args = (m, 0.1, 5, 3, dim**-0.5)
                out, lse = torch.ops.lub_fast.padded_attention_fwd(q, k, v, *args)
                outputs += [out, lse.masked_fill(torch.isinf(lse), 0.0)]
                outputs += torch.ops.lub_fast.padded_attention_bwd(do, q, k, v, out, lse, *args)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (3072, 1001):  # vector path, scalar path
            x, g = (torch.randn(37, n, generator=gen, device="cuda").to(dtype) for _ in range(2))
            b = torch.randn(n, generator=gen, device="cuda")
            for approximate in ("none", "tanh"):
                outputs.append(torch.ops.lub_fast.bias_gelu_fwd(x, b.to(dtype), approximate))
                outputs.append(torch.ops.lub_fast.bias_gelu_bwd(g, x, b, approximate))
    for T in (1, 97, 512, 1100):
        for offset in (0, 1):  # offset 1: flag rows 1 byte past 16-byte alignment (bytewise loads)
            B = 5
            ids = torch.randint(5, 1000, (B * T + offset,), generator=gen, device="cuda")[offset:].view(B, T)
            word_start = (torch.rand(B * T + offset, generator=gen, device="cuda") < 0.6)[offset:].view(B, T)
            maskable = (torch.rand(B * T + offset, generator=gen, device="cuda") < 0.95)[offset:].view(B, T)
            maskable[0] = False  # an empty row
            index = torch.arange(B, device="cuda")
            for mode in ("token", "whole_word", "ngram"):
                outputs += torch.ops.lub_fast.wwm_mask(ids, word_start, maskable, index, 7, 1, mode, 0.4, T, 4, 5, 1000)
    torch.cuda.synchronize()
    bad = [i for i, t in enumerate(outputs) if not torch.isfinite(t).all()]
    if bad:
        sys.exit(f"non-finite outputs at {bad}")
    print(f"ran {len(outputs)} kernel outputs, all finite")


if __name__ == "__main__":
    main()
