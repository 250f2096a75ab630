"""Tests of the C++ CPU kernels of lub_fast::varlen_attention_fwd/bwd (csrc/attention/attention.cpp).

The kernels must compute what ``varlen_attention_fwd_ref`` / ``varlen_attention_bwd_ref`` compute:
the same out, lse and gradients (fp32 within ``assert_close`` defaults, fp64 to 1e-12, fp16/bf16
within twice the error of the reference run in that precision) and bit-identical dropout keep
decisions. Skipped when no CPU kernel is registered, failed instead when LUB_FAST_REQUIRE_KERNELS=1.
"""

import os

import pytest
import torch

from lub_fast.ops import EXTENSION_ERRORS, attention, has_kernel
from lub_fast.ops.attention import varlen_attention_bwd_ref, varlen_attention_fwd_ref

OPS = ("varlen_attention_fwd", "varlen_attention_bwd")
LENGTHS = [0, 1, 97, 3, 0, 130, 17]  # empty, single and odd lengths; 130 spans two query blocks
FWD = torch.ops.lub_fast.varlen_attention_fwd
BWD = torch.ops.lub_fast.varlen_attention_bwd


@pytest.fixture(autouse=True)
def _require_kernel():
    missing = ", ".join(f"lub_fast::{op}" for op in OPS if not has_kernel(op, "cpu"))
    if missing:
        why = EXTENSION_ERRORS.get("lub_fast._C") or "lub_fast._C loaded but registers no such kernel"
        if os.environ.get("LUB_FAST_REQUIRE_KERNELS") == "1":
            pytest.fail(f"LUB_FAST_REQUIRE_KERNELS=1 but no CPU kernel for {missing} ({why})")
        pytest.skip(f"no CPU kernel registered for {missing} ({why})")


def _cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(lengths, heads, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return [torch.randn(total, heads, dim, generator=gen, dtype=dtype) for _ in range(4)]


def _args(lengths, dropout_p, dim, seed=1234, offset=56):
    cu, longest = _cu_seqlens(lengths), max(lengths, default=0)
    return (cu, cu, longest, longest, dropout_p, seed, offset, dim**-0.5)


def _close(dtype):
    """assert_close defaults for fp32, 1e-12 for fp64."""
    return {} if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.5])
def test_varlen_attention_cpu_kernel_matches_reference(dtype, dropout_p):
    q, k, v, dout = _inputs(LENGTHS, 3, 24, dtype, seed=0)
    args = _args(LENGTHS, dropout_p, 24)
    out, lse = FWD(q, k, v, *args)
    out_ref, lse_ref = varlen_attention_fwd_ref(q, k, v, *args)
    assert out.dtype == dtype and lse.dtype == dtype and lse.shape == (3, sum(LENGTHS))
    torch.testing.assert_close(out, out_ref, **_close(dtype), msg=lambda m: f"out: {m}")
    torch.testing.assert_close(lse, lse_ref, **_close(dtype), msg=lambda m: f"lse: {m}")
    grads = BWD(dout, q, k, v, out_ref, lse_ref, *args)
    grads_ref = varlen_attention_bwd_ref(dout, q, k, v, out_ref, lse_ref, *args)
    for name, g, r in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert g.dtype == dtype and g.shape == q.shape
        torch.testing.assert_close(g, r, **_close(dtype), msg=lambda m: f"{name}: {m}")


def _separate_layouts(seed):
    """Queries at some positions of each sequence (some keep none; one sequence has queries but no
    keys), with their positions as the dropout rows, against keys over every position."""
    gen = torch.Generator().manual_seed(seed)
    k_lengths = [130, 0, 1, 97, 0, 9]
    q_counts = [40, 0, 1, 97, 3, 0]
    positions = [torch.randperm(max(n, c), generator=gen)[:c].sort().values for n, c in zip(k_lengths, q_counts)]
    q_positions = torch.cat(positions).to(torch.int32)
    cu_q, cu_k = _cu_seqlens(q_counts), _cu_seqlens(k_lengths)
    return q_positions, cu_q, cu_k, max(q_counts), max(k_lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("with_positions", [False, True])
def test_varlen_attention_cpu_kernel_separate_layouts_match_reference(dtype, dropout_p, with_positions):
    q_positions, cu_q, cu_k, max_q, max_k = _separate_layouts(1)
    heads, dim = 2, 16
    gen = torch.Generator().manual_seed(2)
    q, dout = (torch.randn(q_positions.numel(), heads, dim, generator=gen, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(int(cu_k[-1]), heads, dim, generator=gen, dtype=dtype) for _ in range(2))
    args = (cu_q, cu_k, max_q, max_k, dropout_p, 2**40 + 1, 7, dim**-0.5, q_positions if with_positions else None)
    out, lse = FWD(q, k, v, *args)
    out_ref, lse_ref = varlen_attention_fwd_ref(q, k, v, *args)
    torch.testing.assert_close(out, out_ref, **_close(dtype), msg=lambda m: f"out: {m}")
    torch.testing.assert_close(lse, lse_ref, **_close(dtype), msg=lambda m: f"lse: {m}")
    rows = slice(int(cu_q[4]), int(cu_q[5]))  # the queries of the sequence without keys
    assert out[rows].abs().max().item() == 0.0 and torch.isinf(lse[:, rows]).all()
    grads = BWD(dout, q, k, v, out_ref, lse_ref, *args)
    grads_ref = varlen_attention_bwd_ref(dout, q, k, v, out_ref, lse_ref, *args)
    for name, g, r in zip(("dq", "dk", "dv"), grads, grads_ref):
        torch.testing.assert_close(g, r, **_close(dtype), msg=lambda m, name=name: f"{name}: {m}")
    keys = slice(int(cu_k[5]), int(cu_k[6]))  # the keys of the sequence without queries
    assert grads[1][keys].abs().max().item() == 0.0 and grads[2][keys].abs().max().item() == 0.0


def test_varlen_attention_cpu_kernel_separate_layouts_opcheck():
    q_positions, cu_q, cu_k, max_q, max_k = _separate_layouts(3)
    q = torch.randn(q_positions.numel(), 2, 8, requires_grad=True)
    k, v = (torch.randn(int(cu_k[-1]), 2, 8, requires_grad=True) for _ in range(2))
    args = (cu_q, cu_k, max_q, max_k, 0.2, 5, 1, 0.3, q_positions)
    torch.library.opcheck(attention.varlen_attention_fwd, (q, k, v, *args))
    out, lse = FWD(q.detach(), k.detach(), v.detach(), *args)
    bwd_inputs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse)
    torch.library.opcheck(attention.varlen_attention_bwd, (*bwd_inputs, *args))


def test_varlen_attention_cpu_kernel_random_lengths():
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 40, (9,), generator=gen).tolist() + [0, 1, 97]
    q, k, v, dout = _inputs(lengths, 2, 16, torch.float32, seed=6)
    args = _args(lengths, 0.2, 16, seed=2**40 + 3, offset=2**32 - 1)
    out, lse = FWD(q, k, v, *args)
    out_ref, lse_ref = varlen_attention_fwd_ref(q, k, v, *args)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(lse, lse_ref)
    grads = BWD(dout, q, k, v, out, lse, *args)
    for g, r in zip(grads, varlen_attention_bwd_ref(dout, q, k, v, out, lse, *args)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_varlen_attention_cpu_kernel_keep_mask_is_the_spec(dropout_p):
    # With v[j] = e_j, out_i is the dropped probability row pd[i, :] itself; with dout_i = e_i,
    # dv[j] holds pd[:, j]. Their zeros must be exactly ~dropout_keep_mask (p > 0 everywhere).
    lengths, heads, seed, offset = [97, 1, 0, 40], 2, 77, 3
    dim, seqlen = 128, max(lengths)
    q, k, _, _ = (0.1 * t for t in _inputs(lengths, heads, dim, torch.float64, seed=2))
    cu = _cu_seqlens(lengths)
    eye = torch.eye(dim, dtype=torch.float64)
    pos = torch.cat([torch.arange(n) for n in lengths])
    one_hot = eye[pos][:, None, :].expand(-1, heads, -1).contiguous()
    args = (cu, cu, seqlen, seqlen, dropout_p, seed, offset, dim**-0.5)
    out, lse = FWD(q, k, one_hot, *args)
    _, _, dv = BWD(one_hot, q, k, one_hot, out, lse, *args)
    keep = attention.dropout_keep_mask(seed, offset, len(lengths), heads, seqlen, dropout_p, "cpu")
    for b, n in enumerate(lengths):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        want = keep[b, :, :n, :n]  # [H, i, j]
        got_fwd = out[rows, :, :n].transpose(0, 1) != 0  # [H, i, j]
        got_bwd = dv[rows, :, :n].permute(1, 2, 0) != 0  # dv[j, h, i] -> [H, i, j]
        differ_fwd, differ_bwd = int((got_fwd != want).sum()), int((got_bwd != want).sum())
        assert differ_fwd == 0, f"sequence {b}: {differ_fwd} of {want.numel()} forward keep bits differ"
        assert differ_bwd == 0, f"sequence {b}: {differ_bwd} of {want.numel()} backward keep bits differ"
    assert 0 < keep.double().mean().item() < 1


def test_varlen_attention_cpu_kernel_noncontiguous_inputs():
    lengths = [5, 0, 33]
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(sum(lengths), 3, 2, 8, generator=gen)  # a fused projection, split by view
    q, k, v = qkv.unbind(1)
    dout = torch.randn(sum(lengths), 8, 2, generator=gen).transpose(1, 2)
    args = _args(lengths, 0.3, 8)
    out, lse = FWD(q, k, v, *args)
    out_ref, lse_ref = varlen_attention_fwd_ref(q, k, v, *args)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(lse, lse_ref)
    grads = BWD(dout, q, k, v, out, lse, *args)
    for g, r in zip(grads, varlen_attention_bwd_ref(dout, q, k, v, out, lse, *args)):
        assert g.is_contiguous()
        torch.testing.assert_close(g, r)


def test_varlen_attention_cpu_kernel_thread_count_invariant():
    q, k, v, dout = _inputs(LENGTHS, 4, 16, torch.float32, seed=9)
    args = _args(LENGTHS, 0.1, 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, lse = FWD(q, k, v, *args)
            results.append((out, lse, *BWD(dout, q, k, v, out, lse, *args)))
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads by {(a - b).abs().max().item()}"


def test_varlen_attention_cpu_kernel_backward_deterministic_under_the_switch():
    """The CPU backward has no atomics: under torch.use_deterministic_algorithms(True) autograd asks for
    the deterministic backward and gets bit-for-bit the gradients of the default call, run after run."""
    q, k, v, dout = _inputs(LENGTHS, 2, 32, torch.float32, seed=11)
    args = _args(LENGTHS, 0.1, 32)
    out, lse = FWD(q, k, v, *args)
    default = BWD(dout, q, k, v, out, lse, *args)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.use_deterministic_algorithms(True)
    try:
        runs = [BWD(dout, q, k, v, out, lse, *args, None, True) for _ in range(2)]
        FWD(*leaves, *args)[0].backward(dout)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b, c, g in zip("qkv", default, *runs, (t.grad for t in leaves)):
        for label, x in (("second run", c), ("deterministic=True", b), ("autograd", g)):
            assert torch.equal(a, x), f"d{name}: {label} differs by {(a - x).abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_varlen_attention_cpu_kernel_low_precision(dtype):
    # kernel error vs the fp32 reference <= 2x the error of the reference run in `dtype`
    lengths = [7, 0, 1, 40]
    low = [t.to(dtype) for t in _inputs(lengths, 2, 16, torch.float32, seed=4)]
    q, k, v, dout = low
    exact = [t.float() for t in low]
    args = _args(lengths, 0.1, 16)
    out, lse = FWD(q, k, v, *args)
    out_low, lse_low = varlen_attention_fwd_ref(q, k, v, *args)
    out_32, _ = varlen_attention_fwd_ref(*exact[:3], *args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    grads = BWD(dout, q, k, v, out_low, lse_low, *args)
    grads_low = varlen_attention_bwd_ref(dout, q, k, v, out_low, lse_low, *args)
    grads_32 = varlen_attention_bwd_ref(exact[3], *exact[:3], out_low.float(), lse_low, *args)
    torch.testing.assert_close(lse, lse_low)  # both computed in fp32
    pairs = [("out", out, out_low, out_32)]
    pairs += [(n, g, gl, g32) for n, g, gl, g32 in zip(("dq", "dk", "dv"), grads, grads_low, grads_32)]
    for name, got, ref_low, ref_32 in pairs:
        assert got.dtype == ref_low.dtype, name
        err = (got.float() - ref_32).abs().max().item()
        err_ref = (ref_low.float() - ref_32).abs().max().item()
        assert err <= 2 * err_ref + 1e-6, f"{name}: kernel error {err:.3g} > 2 x reference's {err_ref:.3g}"


def test_varlen_attention_cpu_kernel_gradcheck():
    lengths = [3, 0, 1, 5]
    q, k, v, _ = (t.requires_grad_() for t in _inputs(lengths, 2, 4, torch.float64, seed=3))
    cu = _cu_seqlens(lengths)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention.varlen_attention(q, k, v, cu, cu, 5, 5, dropout_p=0.3, seed=7, offset=2),
        (q, k, v),
    )


@pytest.mark.parametrize(
    ("lengths", "dropout_p"), [([3, 0, 1, 6], 0.0), ([3, 0, 1, 6], 0.25), ([0, 0], 0.25)]
)
def test_varlen_attention_cpu_kernel_opcheck(lengths, dropout_p):
    q, k, v, dout = _inputs(lengths, 2, 8, torch.float32, seed=1)
    args = _args(lengths, dropout_p, 8)
    torch.library.opcheck(attention.varlen_attention_fwd, (q.requires_grad_(), k, v, *args))
    out, lse = FWD(q.detach(), k, v, *args)
    torch.library.opcheck(attention.varlen_attention_bwd, (dout, q.detach(), k, v, out, lse, *args))


def test_varlen_attention_cpu_kernel_rejects_bad_inputs():
    q, k, v, dout = _inputs([3, 2], 2, 4, torch.float32, seed=0)
    cu, scale = _cu_seqlens([3, 2]), 0.5
    def bounds(*values):
        return torch.tensor(values, dtype=torch.int32)

    cases = [
        ((q, k, v, bounds(0, 3, 4), cu, 3, 3, 0.0, 0, 0, scale), "cu_seqlens_q must .* end at Tq=5"),
        ((q, k, v, cu, bounds(0, 4, 3, 5), 3, 4, 0.0, 0, 0, scale), r"cu_seqlens_k\[2\]=3 < cu_seqlens_k\[1\]=4"),
        ((q, k, v, bounds(1, 5), bounds(1, 5), 5, 5, 0.0, 0, 0, scale), "start at 0"),
        ((q, k, v, cu.long(), cu, 3, 3, 0.0, 0, 0, scale), "cu_seqlens_q must be int32"),
        ((q, k, v, cu, cu, 3, 2, 0.0, 0, 0, scale), "max_seqlen_k=2 < longest sequence 3"),
        ((q, k, v, cu, bounds(0, 5), 3, 5, 0.0, 0, 0, scale), "B \\+ 1 entries each"),
        ((q, k, v, cu, cu, 3, 3, 1.0, 0, 0, scale), r"dropout_p must be in \[0, 1\)"),
        ((q, k, v, cu, cu, 3, 3, 0.1, -1, 0, scale), "seed must be"),
        ((q, k, v, cu, cu, 3, 3, 0.1, 0, 2**32, scale), r"offset must be in \[0, 2\*\*32\)"),
        ((q, k[:4], v, cu, cu, 3, 3, 0.0, 0, 0, scale), r"k, v \[Tk, H, D\]"),
        ((q, k.double(), v, cu, cu, 3, 3, 0.0, 0, 0, scale), "share a floating dtype"),
        ((q[0], k[0], v[0], cu, cu, 3, 3, 0.0, 0, 0, scale), r"q must be \[Tq, H, D\]"),
        ((q, k, v, cu, cu, 3, 3, 0.0, 0, 0, scale, torch.zeros(4, dtype=torch.int32)),
         r"q_positions must be int32 \[Tq\]"),
        ((q, k, v, cu, cu, 3, 3, 0.0, 0, 0, scale, -torch.ones(5, dtype=torch.int32)), "q_positions must be >= 0"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            FWD(*args)
    out, lse = FWD(q, k, v, cu, cu, 3, 3, 0.0, 0, 0, scale)
    with pytest.raises(ValueError, match=r"lse must be a floating \[H, Tq\] = \[2, 5\]"):
        BWD(dout, q, k, v, out, lse.t(), cu, cu, 3, 3, 0.0, 0, 0, scale)
    with pytest.raises(ValueError, match="dout and out must have q's shape"):
        BWD(dout[:4], q, k, v, out, lse, cu, cu, 3, 3, 0.0, 0, 0, scale)
