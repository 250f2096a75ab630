"""GPU tests of the CUDA attention kernels (csrc/attention/attention_kernel.cu) against the references.

Parity rule (STYLE.md): for bf16/fp16 the kernel's max error against the fp32 reference is at most
2x that of the same attention computed by PyTorch in the low precision, for the output and every
gradient; odd lengths (1, 97, 513), an empty sequence, head dims 32/64/128, self-attention and separate
query/key layouts with dropout rows. Dropout masks are checked bit for bit, opcheck and
torch.compile(fullgraph=True) run on the CUDA ops. The deterministic backward (``deterministic=True``,
what autograd asks for under torch.use_deterministic_algorithms(True)) meets the same parity rule,
gives bit-identical gradients run after run, the default backward's dk and dv bit for bit and its dq
within rounding.
"""

import math

import pytest
import torch

from lub_fast.ops import attention

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [32, 64, 128]
LENGTHS = [1, 97, 0, 513, 64]  # one token, odd, empty, odd and past two key tiles, one full tile
HEADS = 3
DROPOUT_P = 0.17
SEED, OFFSET = 0x1234_5678_9ABC, 11


@pytest.fixture(autouse=True)
def _kernels(require_cuda_kernels):
    require_cuda_kernels(*attention.OPS)


def _cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


def _randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen, device="cuda").to(dtype)


def _leaf(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _lowp_padded(q, k, v, mask, keep, dropout_p, scale):
    """Attention computed by PyTorch in q's dtype ([B, S, H, D], mask bool [B, S]): the error
    baseline. Padded query rows are zeros, as in the reference."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None, None, :], -math.inf)
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)  # rows of empty sequences
    if keep is not None:
        p = torch.where(keep, p * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=p.dtype, device=p.device))
    out = torch.matmul(p, vh).transpose(1, 2)
    return torch.where(mask[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def _keep(batch, seqlen, dropout_p):
    if dropout_p == 0.0:
        return None
    return attention.dropout_keep_mask(SEED, OFFSET, batch, HEADS, seqlen, dropout_p, "cuda")


def _varlen_layout(lengths):
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).cuda()
    starts = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist()[:-1]).cuda()
    pos = torch.arange(sum(lengths), device="cuda") - starts[seq]
    mask = torch.arange(max(lengths), device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    return seq, pos, mask


def _lowp_varlen(q, k, v, lengths, dropout_p, scale):
    seq, pos, mask = _varlen_layout(lengths)
    batch, seqlen = mask.shape

    def pad(x):
        padded = x.new_zeros((batch, seqlen) + tuple(x.shape[1:]))
        padded[seq, pos] = x
        return padded

    out = _lowp_padded(pad(q), pad(k), pad(v), mask, _keep(batch, seqlen, dropout_p), dropout_p, scale)
    return out[seq, pos]


def _assert_within_2x(dtype, names, ours, ref, lowp):
    for name, o, r, l in zip(names, ours, ref, lowp):
        assert torch.isfinite(o).all(), f"{name}: kernel output has non-finite values"
        err = (o.float() - r.float()).abs().max().item()
        base = (l.float() - r.float()).abs().max().item()
        assert err <= 2.0 * base + 1e-6, (
            f"{name} ({dtype}): kernel max error {err:.3e} > 2 x PyTorch-{dtype} max error {base:.3e}"
        )


@pytest.mark.parametrize("dropout_p", [0.0, DROPOUT_P])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_cuda_parity(dtype, dim, dropout_p):
    gen = torch.Generator(device="cuda").manual_seed(dim)
    total = sum(LENGTHS)
    q, k, v, dout = (_randn((total, HEADS, dim), dtype, gen) for _ in range(4))
    cu, max_seqlen, scale = _cu_seqlens(LENGTHS), max(LENGTHS), dim**-0.5
    args = (cu, cu, max_seqlen, max_seqlen, dropout_p, SEED, OFFSET, scale)

    ours_in = _leaf(q, k, v)
    out, lse = torch.ops.lub_fast.varlen_attention_fwd(*ours_in, *args)
    out.backward(dout)
    ref_in = _leaf(q.float(), k.float(), v.float())
    out32, lse32 = attention.varlen_attention_fwd_ref(*ref_in, *args)
    out32.backward(dout.float())
    lowp_in = _leaf(q, k, v)
    outl = _lowp_varlen(*lowp_in, LENGTHS, dropout_p, scale)
    outl.backward(dout)

    _assert_within_2x(
        dtype,
        ("out", "dq", "dk", "dv"),
        [out] + [t.grad for t in ours_in],
        [out32] + [t.grad for t in ref_in],
        [outl] + [t.grad for t in lowp_in],
    )
    torch.testing.assert_close(lse, lse32, atol=1e-3, rtol=1e-4)


# Queries at some positions of each sequence (the sparse last layer's layout): none in one sequence,
# all in another, queries but no keys in a third; keys of every position.
K_LENGTHS = [97, 0, 513, 1, 64, 0]
Q_COUNTS = [9, 0, 513, 0, 17, 3]


def _sparse_layout():
    positions = [
        torch.randperm(max(n, c), generator=torch.Generator().manual_seed(n + c))[:c].sort().values
        for n, c in zip(K_LENGTHS, Q_COUNTS)
    ]
    q_positions = torch.cat(positions).to(torch.int32).cuda()
    return q_positions, _cu_seqlens(Q_COUNTS), _cu_seqlens(K_LENGTHS)


@pytest.mark.parametrize("dropout_p", [0.0, DROPOUT_P])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_cuda_separate_layouts_parity(dtype, dim, dropout_p):
    """q/k layouts with q_positions: within 2x of PyTorch in the low precision (the sparse rows of
    a full low-precision attention), and the dropout masks are the full layer's at those rows."""
    gen = torch.Generator(device="cuda").manual_seed(200 + dim)
    q_positions, cu_q, cu_k = _sparse_layout()
    total_k = sum(K_LENGTHS)
    k, v, q_full = (_randn((total_k, HEADS, dim), dtype, gen) for _ in range(3))
    starts = cu_k[:-1].long()
    seq_q = torch.repeat_interleave(torch.arange(len(Q_COUNTS), device="cuda"), torch.tensor(Q_COUNTS, device="cuda"))
    rows = starts[seq_q] + q_positions.long()  # the queries' rows in the full layout
    keyless = torch.tensor([K_LENGTHS[b] == 0 for b in seq_q.tolist()], device="cuda")
    rows = torch.where(keyless, 0, rows)
    q = _randn((sum(Q_COUNTS), HEADS, dim), dtype, gen)
    q = torch.where(keyless[:, None, None], q, q_full[rows])
    dout = _randn(q.shape, dtype, gen)
    scale = dim**-0.5
    args = (cu_q, cu_k, max(Q_COUNTS), max(K_LENGTHS), dropout_p, SEED, OFFSET, scale, q_positions)

    ours_in = _leaf(q, k, v)
    out, lse = torch.ops.lub_fast.varlen_attention_fwd(*ours_in, *args)
    out.backward(dout)
    ref_in = _leaf(q.float(), k.float(), v.float())
    out32, lse32 = attention.varlen_attention_fwd_ref(*ref_in, *args)
    out32.backward(dout.float())
    # Baseline: full low-precision attention with the full layer's masks, at the queries' rows.
    lowp_in = _leaf(q_full.index_copy(0, rows[~keyless], q[~keyless]), k, v)
    full = _lowp_varlen(*lowp_in, K_LENGTHS, dropout_p, scale)
    outl = torch.where(keyless[:, None, None], 0.0, full[rows]).to(dtype)
    outl.backward(dout)
    lowp_dq = torch.where(keyless[:, None, None], 0.0, lowp_in[0].grad[rows]).to(dtype)

    _assert_within_2x(
        dtype,
        ("out", "dq", "dk", "dv"),
        [out] + [t.grad for t in ours_in],
        [out32] + [t.grad for t in ref_in],
        [outl, lowp_dq, lowp_in[1].grad, lowp_in[2].grad],
    )
    assert (out[keyless] == 0).all() and torch.isinf(lse[:, keyless]).all(), "queries without keys"
    real = ~keyless[None, :].expand_as(lse)
    torch.testing.assert_close(lse[real], lse32[real], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_cuda_dropout_mask_bit_identical(dtype):
    # q = k = 0 makes every probability 1 / L; v = one-hot over a window of 128 keys turns
    # out[i, d] into keep(i, w0 + d) / ((1 - p) L): nonzero exactly where the key is kept. In the
    # backward, dout = one-hot over a window of 128 queries makes dv[j, d] = keep(w0 + d, j) / (...).
    lengths = [97, 513, 0, 1]
    dim = 128
    total, batch, seqlen = sum(lengths), len(lengths), max(lengths)
    cu = _cu_seqlens(lengths)
    seq, pos, _ = _varlen_layout(lengths)
    expected = attention.dropout_keep_mask(SEED, OFFSET, batch, HEADS, seqlen, DROPOUT_P, "cuda")
    zeros = torch.zeros(total, HEADS, dim, dtype=dtype, device="cuda")
    for w0 in range(0, seqlen, dim):
        onehot = ((pos[:, None] - w0) == torch.arange(dim, device="cuda")[None, :]).to(dtype)  # [T, D]
        window = onehot[:, None, :].expand(total, HEADS, dim).contiguous()
        args = (cu, cu, seqlen, seqlen, DROPOUT_P, SEED, OFFSET, 1.0)
        out, lse = torch.ops.lub_fast.varlen_attention_fwd(zeros, zeros, window, *args)
        _, _, dv = torch.ops.lub_fast.varlen_attention_bwd(window, zeros, zeros, window, out, lse, *args)
        for b, length in enumerate(lengths):
            width = min(dim, length - w0)
            if width <= 0:
                continue
            rows = torch.nonzero(seq == b).flatten()
            got = (out[rows, :, :width] != 0).transpose(0, 1)  # [H, L, width]
            want = expected[b, :, :length, w0 : w0 + width]
            assert torch.equal(got, want), (
                f"forward keep mask differs at {(got != want).sum().item()} of {want.numel()} entries "
                f"(sequence {b}, keys {w0}..{w0 + width - 1})"
            )
            got_t = (dv[rows, :, :width] != 0).transpose(0, 1)  # [H, L keys, width queries]
            want_t = expected[b, :, w0 : w0 + width, :length].transpose(1, 2)
            assert torch.equal(got_t, want_t), (
                f"backward keep mask differs at {(got_t != want_t).sum().item()} of {want_t.numel()} "
                f"entries (sequence {b}, queries {w0}..{w0 + width - 1})"
            )


def test_attention_cuda_opcheck():
    gen = torch.Generator(device="cuda").manual_seed(3)
    lengths = [3, 0, 17]
    q, k, v, dout = (_randn((sum(lengths), HEADS, 64), torch.bfloat16, gen) for _ in range(4))
    cu = _cu_seqlens(lengths)
    layout = (cu, cu, 17, 17, DROPOUT_P, SEED, OFFSET, 0.125)
    fwd_args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *layout)
    torch.library.opcheck(torch.ops.lub_fast.varlen_attention_fwd.default, fwd_args)
    out, lse = torch.ops.lub_fast.varlen_attention_fwd(*fwd_args)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, *layout)
    torch.library.opcheck(torch.ops.lub_fast.varlen_attention_bwd.default, bwd_args)
    q_positions, cu_q, cu_k = _sparse_layout()  # separate layouts with dropout rows
    qs = _randn((sum(Q_COUNTS), HEADS, 64), torch.bfloat16, gen).requires_grad_()
    ks, vs = (_randn((sum(K_LENGTHS), HEADS, 64), torch.bfloat16, gen).requires_grad_() for _ in range(2))
    layout = (cu_q, cu_k, max(Q_COUNTS), max(K_LENGTHS), DROPOUT_P, SEED, OFFSET, 0.125, q_positions)
    torch.library.opcheck(torch.ops.lub_fast.varlen_attention_fwd.default, (qs, ks, vs, *layout))


def test_attention_cuda_compile_fullgraph():
    gen = torch.Generator(device="cuda").manual_seed(4)
    lengths = [97, 1, 0, 40]
    q, k, v, dout = (_randn((sum(lengths), HEADS, 64), torch.bfloat16, gen) for _ in range(4))
    cu = _cu_seqlens(lengths)

    def fn(q, k, v):
        return attention.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), DROPOUT_P, SEED, OFFSET)

    eager_in, compiled_in = _leaf(q, k, v), _leaf(q, k, v)
    eager = fn(*eager_in)
    compiled = torch.compile(fn, fullgraph=True)(*compiled_in)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    eager.backward(dout)
    compiled.backward(dout)
    for e, c in zip(eager_in, compiled_in):  # dq adds tiles with atomics: equal up to rounding order
        torch.testing.assert_close(c.grad, e.grad, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "dtype, head_dim, route",
    [(torch.bfloat16, 16, "torch_varlen"), (torch.float16, 96, "torch_varlen"), (torch.bfloat16, 20, "sdpa"),
     (torch.float32, 64, "sdpa")],
)
def test_attention_cuda_fallback_routes_match_reference(monkeypatch, dtype, head_dim, route):
    """Inputs the kernel lacks run PyTorch's flash attention or SDPA, never the [B, H, S, S] reference."""
    monkeypatch.setattr(attention, "_warned_fallback", set())  # the warning comes once per process
    gen = torch.Generator(device="cuda").manual_seed(5)
    lengths = [5, 0, 97, 9]
    cu = _cu_seqlens(lengths)
    q, k, v, dout = (_randn((sum(lengths), HEADS, head_dim), dtype, gen) for _ in range(4))
    assert attention.route_of(q) == route, attention.route_of(q)
    with pytest.warns(UserWarning, match=f"running route '{route}'"):
        out = attention.varlen_attention(*_leaf(q, k, v), cu, cu, 97, 97)
    qf, kf, vf = _leaf(q.float(), k.float(), v.float())
    ref, _ = attention.varlen_attention_fwd_ref(qf, kf, vf, cu, cu, 97, 97, 0.0, 0, 0, head_dim**-0.5)
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)  # TF32 / 16-bit
    torch.testing.assert_close(out.float(), ref, **tol)


def test_attention_cuda_bad_cu_seqlens_raise():
    gen = torch.Generator(device="cuda").manual_seed(6)
    q = _randn((8, HEADS, 64), torch.bfloat16, gen)
    for cu, match in (([0, 3, 9], "end at Tq=8"), ([0, 5, 3, 8], "non-decreasing"), ([2, 8], "start at 0")):
        with pytest.raises(ValueError, match=match):
            attention.varlen_attention(q, q, q, cu_t := torch.tensor(cu, dtype=torch.int32, device="cuda"), cu_t, 8, 8)
    with pytest.raises(ValueError, match="max_seqlen_q=4 < longest sequence 5"):
        attention.varlen_attention(q, q, q, _cu_seqlens([5, 3]), _cu_seqlens([5, 3]), 4, 4)


def test_attention_cuda_qkv_views_match_contiguous():
    """The encoder passes q, k, v as views of one [T, 3, H, D] projection."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    lengths = [33, 1, 64]
    cu = _cu_seqlens(lengths)
    qkv = _randn((sum(lengths), 3, HEADS, 64), torch.bfloat16, gen)
    dout = _randn((sum(lengths), HEADS, 64), torch.bfloat16, gen)
    (views,) = _leaf(qkv)
    out = attention.varlen_attention(*views.unbind(1), cu, cu, 64, 64, DROPOUT_P, SEED, OFFSET)
    out.backward(dout)
    dense = _leaf(*(t.contiguous() for t in qkv.unbind(1)))
    expected = attention.varlen_attention(*dense, cu, cu, 64, 64, DROPOUT_P, SEED, OFFSET)
    expected.backward(dout)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(views.grad, torch.stack([t.grad for t in dense], dim=1), atol=2e-2, rtol=2e-2)


def _backward(inputs, args, deterministic):
    """(dq, dk, dv) of ``varlen_attention_bwd`` for ``inputs = (q, k, v, dout)`` after the forward."""
    q, k, v, dout = inputs
    out, lse = torch.ops.lub_fast.varlen_attention_fwd(q, k, v, *args)
    return torch.ops.lub_fast.varlen_attention_bwd(dout, q, k, v, out, lse, *args, deterministic=deterministic)


def _assert_equal(names, got, want, what):
    for name, a, b in zip(names, got, want):
        assert torch.equal(a, b), (
            f"{name}: {what} differs at {(a != b).sum().item()} of {a.numel()} entries, by up to "
            f"{(a.float() - b.float()).abs().max().item():.3e}"
        )


@pytest.mark.parametrize("dropout_p", [0.0, DROPOUT_P])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_cuda_deterministic_backward_parity(dtype, dim, dropout_p):
    """The deterministic backward: within 2x of PyTorch in the low precision like the default one, and
    bit-identical over runs (each run after the other's allocations, on other memory)."""
    gen = torch.Generator(device="cuda").manual_seed(300 + dim)
    total = sum(LENGTHS)
    q, k, v, dout = (_randn((total, HEADS, dim), dtype, gen) for _ in range(4))
    cu, max_seqlen, scale = _cu_seqlens(LENGTHS), max(LENGTHS), dim**-0.5
    args = (cu, cu, max_seqlen, max_seqlen, dropout_p, SEED, OFFSET, scale)
    first = _backward((q, k, v, dout), args, True)
    runs = [_backward((q, k, v, dout), args, True) for _ in range(3)]

    ref_in = _leaf(q.float(), k.float(), v.float())
    attention.varlen_attention_fwd_ref(*ref_in, *args)[0].backward(dout.float())
    lowp_in = _leaf(q, k, v)
    _lowp_varlen(*lowp_in, LENGTHS, dropout_p, scale).backward(dout)
    _assert_within_2x(dtype, ("dq", "dk", "dv"), first, [t.grad for t in ref_in], [t.grad for t in lowp_in])
    for run in runs:
        _assert_equal(("dq", "dk", "dv"), run, first, "a rerun of the deterministic backward")


@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_cuda_deterministic_matches_atomic(dtype, dim):
    """dk, dv come from the same key-tile code in both backwards (bit for bit); dq sums the same fp32
    products in another order (close). Separate layouts with dropout rows, queries without keys."""
    gen = torch.Generator(device="cuda").manual_seed(400 + dim)
    q_positions, cu_q, cu_k = _sparse_layout()
    k, v = (_randn((sum(K_LENGTHS), HEADS, dim), dtype, gen) for _ in range(2))
    q, dout = (_randn((sum(Q_COUNTS), HEADS, dim), dtype, gen) for _ in range(2))
    args = (cu_q, cu_k, max(Q_COUNTS), max(K_LENGTHS), DROPOUT_P, SEED, OFFSET, dim**-0.5, q_positions)
    atomic = _backward((q, k, v, dout), args, False)
    exact = _backward((q, k, v, dout), args, True)
    _assert_equal(("dk", "dv"), exact[1:], atomic[1:], "the deterministic backward vs the atomic one")
    torch.testing.assert_close(exact[0], atomic[0], atol=2e-2, rtol=2e-2)
    keyless = torch.tensor([K_LENGTHS[b] for b, c in enumerate(Q_COUNTS) for _ in range(c)], device="cuda") == 0
    assert (exact[0][keyless] == 0).all(), "dq of queries without keys"


def test_attention_cuda_backward_under_deterministic_algorithms():
    """Under the switch autograd runs the deterministic backward (no error, bit-identical reruns, what
    the op gives with deterministic=True); the atomic backward asked for directly still raises."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    lengths = [40, 0, 200]
    cu = _cu_seqlens(lengths)
    q, k, v, dout = (_randn((sum(lengths), HEADS, 64), torch.bfloat16, gen) for _ in range(4))
    args = (cu, cu, 200, 200, DROPOUT_P, SEED, OFFSET, 0.125)
    assert attention.backward_route("cuda", attention.route_of(q), True) == "lub_fast_dq_pass"
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            leaves = _leaf(q, k, v)
            attention.varlen_attention(*leaves, cu, cu, 200, 200, DROPOUT_P, SEED, OFFSET, 0.125).backward(dout)
            grads.append([t.grad for t in leaves])
        with pytest.raises(RuntimeError, match="lub_fast attention backward on CUDA with deterministic=False"):
            _backward((q, k, v, dout), args, False)
    finally:
        torch.use_deterministic_algorithms(False)
    _assert_equal(("dq", "dk", "dv"), grads[1], grads[0], "a rerun under the switch")
    _assert_equal(("dq", "dk", "dv"), grads[0], _backward((q, k, v, dout), args, True), "autograd vs the op")
