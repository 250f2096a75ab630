"""Tests of lub_fast.ops.attention: the varlen attention reference, ops and dropout."""

import pytest
import torch
import torch.nn.functional as F

from lub_fast.ops import attention
from lub_fast.ops.attention import varlen_attention

LENGTHS = [5, 0, 1, 7, 3]  # an empty and a length-1 sequence, odd sizes
HEADS = 2
HEAD_DIM = 4


def _cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _mask(lengths, seqlen):
    return torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]


def _varlen_qkv(lengths, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return [torch.randn(total, HEADS, HEAD_DIM, generator=gen, dtype=dtype) for _ in range(3)]


def _pad(x, mask):
    padded = x.new_zeros(mask.shape + x.shape[1:])
    padded[mask] = x
    return padded


def _leaf(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def test_varlen_attention_matches_sdpa():
    lengths = [l for l in LENGTHS if l > 0]  # SDPA gives NaN on a fully masked row
    seqlen = max(lengths)
    mask = _mask(lengths, seqlen)
    q, k, v = _varlen_qkv(lengths)
    out = varlen_attention(q, k, v, _cu_seqlens(lengths), _cu_seqlens(lengths), seqlen, seqlen)
    qp, kp, vp = (_pad(t, mask).transpose(1, 2) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(out, expected.transpose(1, 2)[mask])


def test_varlen_attention_scale_argument():
    q, k, v = _varlen_qkv(LENGTHS)
    cu = _cu_seqlens(LENGTHS)
    seqlen = max(LENGTHS)
    # Scaling q by c with scale / c is the same attention.
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, cu, seqlen, seqlen, scale=0.3),
        varlen_attention(q * 3.0, k, v, cu, cu, seqlen, seqlen, scale=0.1),
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_varlen_attention_gradcheck(dropout_p):
    inputs = _leaf(*_varlen_qkv([3, 0, 1, 4]))
    cu = _cu_seqlens([3, 0, 1, 4])
    assert torch.autograd.gradcheck(
        lambda q, k, v: varlen_attention(q, k, v, cu, cu, 4, 4, dropout_p=dropout_p, seed=7, offset=2), inputs
    )


def _op_cases():
    for lengths in ([3, 0, 1, 6], [1], [0, 0]):
        for dropout_p in (0.0, 0.25):
            yield lengths, dropout_p


@pytest.mark.parametrize(("lengths", "dropout_p"), list(_op_cases()))
def test_attention_opcheck(lengths, dropout_p):
    scale = HEAD_DIM**-0.5
    q, k, v = _leaf(*_varlen_qkv(lengths, dtype=torch.float32))
    cu, seqlen = _cu_seqlens(lengths), max(lengths)
    args = (cu, cu, seqlen, seqlen, dropout_p, 9, 4, scale)
    torch.library.opcheck(attention.varlen_attention_fwd, (q, k, v, *args))
    out, lse = attention.varlen_attention_fwd(q, k, v, *args)
    bwd_inputs = [t.detach() for t in (torch.randn_like(out), q, k, v, out, lse)]
    torch.library.opcheck(attention.varlen_attention_bwd, (*bwd_inputs, *args))


def test_attention_compile_fullgraph():
    lengths = [4, 0, 1, 3]
    cu, seqlen = _cu_seqlens(lengths), max(lengths)

    def fn(q, k, v):
        a = varlen_attention(q * 2.0, k, v, cu, cu, seqlen, seqlen, dropout_p=0.2, seed=5, offset=1)
        return (a.square().sum(), a)

    inputs = _varlen_qkv(lengths, dtype=torch.float32)
    eager_in, compiled_in = _leaf(*inputs), _leaf(*inputs)
    eager = fn(*eager_in)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*compiled_in)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    eager[0].backward()
    compiled[0].backward()
    for e, c in zip(eager_in, compiled_in):
        torch.testing.assert_close(c.grad, e.grad)


def test_attention_dropout_matches_explicit_mask():
    lengths = [6, 2]
    mask = _mask(lengths, 6)
    p, seed, offset = 0.3, 123, 77
    q, k, v = _varlen_qkv(lengths)
    cu = _cu_seqlens(lengths)
    out = varlen_attention(q, k, v, cu, cu, 6, 6, dropout_p=p, seed=seed, offset=offset)
    keep = attention.dropout_keep_mask(seed, offset, 2, HEADS, 6, p, "cpu")
    qp, kp, vp = (_pad(t, mask).transpose(1, 2) for t in (q, k, v))
    scores = qp @ kp.transpose(-1, -2) * HEAD_DIM**-0.5
    scores = scores.masked_fill(~mask[:, None, None, :], -torch.inf)
    probs = scores.softmax(-1) * keep / (1 - p)
    torch.testing.assert_close(out, (probs @ vp).transpose(1, 2)[mask])


def test_attention_dropout_keep_rate():
    # 4 * 4 * 160 * 160 = 409,600 probabilities
    for p in (0.1, 0.5):
        keep = attention.dropout_keep_mask(2024, 3, 4, 4, 160, p, "cpu").double()
        rate = keep.mean().item()
        assert abs(rate - (1 - p)) < 0.01, f"p={p}: keep rate {rate:.4f}, expected {1 - p:.4f}"
        # each of the four Philox output words (key j mod 4) is used at the same rate
        for w in range(4):
            rate_w = keep[..., w::4].mean().item()
            assert abs(rate_w - (1 - p)) < 0.01, f"p={p}, word {w}: keep rate {rate_w:.4f}"


def test_attention_dropout_mask_depends_on_seed_offset_and_position_only():
    base = attention.dropout_keep_mask(1, 0, 2, 3, 40, 0.5, "cpu")
    # a longer padded length covers the same (b, h, i, j) with the same bits
    longer = attention.dropout_keep_mask(1, 0, 2, 3, 67, 0.5, "cpu")
    assert torch.equal(longer[:, :, :40, :40], base)
    assert torch.equal(attention.dropout_keep_mask(1, 0, 2, 3, 40, 0.5, "cpu"), base)
    large = attention.dropout_keep_mask(1, 0, 4, 4, 160, 0.5, "cpu")  # 409,600 probabilities
    for seed, offset in ((2, 0), (1, 1), (2**40, 0)):
        other = attention.dropout_keep_mask(seed, offset, 4, 4, 160, 0.5, "cpu")
        agree = (other == large).double().mean().item()
        assert abs(agree - 0.5) < 0.01, f"seed={seed} offset={offset}: masks agree on {agree:.4f}"
    # every (b, h) gets its own stream
    flat = base.view(6, -1)
    for a in range(6):
        for b in range(a + 1, 6):
            assert not torch.equal(flat[a], flat[b]), f"heads {a} and {b} share a mask"


def test_attention_dropout_deterministic_and_seed_sensitive():
    lengths = [9, 4]
    q, k, v = _varlen_qkv(lengths)
    cu = _cu_seqlens(lengths)

    def run(seed, offset):
        return varlen_attention(q, k, v, cu, cu, 9, 9, dropout_p=0.2, seed=seed, offset=offset)

    assert torch.equal(run(3, 4), run(3, 4))
    assert not torch.equal(run(3, 4), run(4, 4))
    assert not torch.equal(run(3, 4), run(3, 5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_low_precision_matches_fp32(dtype):
    lengths = [7, 1, 0, 4]
    cu, seqlen = _cu_seqlens(lengths), max(lengths)
    low = _leaf(*_varlen_qkv(lengths, dtype=dtype))
    ref = _leaf(*(t.float() for t in low))  # same values, fp32
    kwargs = dict(dropout_p=0.1, seed=1, offset=2)
    out = varlen_attention(*low, cu, cu, seqlen, seqlen, **kwargs)
    out_ref = varlen_attention(*ref, cu, cu, seqlen, seqlen, **kwargs)
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps

    def close(ours, ref):
        # inputs and outputs are rounded to the low precision: a few ulps of the tensor's scale
        scale = ref.abs().max().item()
        torch.testing.assert_close(ours.float(), ref, atol=4 * eps * scale, rtol=4 * eps)

    close(out, out_ref)
    dout = torch.randn(out.shape, dtype=dtype)
    out.backward(dout)
    out_ref.backward(dout.float())
    for t, r in zip(low, ref):
        assert t.grad.dtype == dtype
        close(t.grad, r.grad)


def test_varlen_attention_rejects_bad_inputs():
    q, k, v = _varlen_qkv([3, 2])
    cu = _cu_seqlens([3, 2])
    with pytest.raises(ValueError, match="cu_seqlens_q must be int32"):
        varlen_attention(q, k, v, cu.long(), cu, 3, 3)
    with pytest.raises(ValueError, match="cu_seqlens_k must .* end at Tk=5"):
        varlen_attention(q, k, v, cu, _cu_seqlens([3, 1]), 3, 3)
    with pytest.raises(ValueError, match="max_seqlen_q=2"):
        varlen_attention(q, k, v, cu, cu, 2, 3)
    with pytest.raises(ValueError, match="dropout_p"):
        varlen_attention(q, k, v, cu, cu, 3, 3, dropout_p=1.0)
    with pytest.raises(ValueError, match="B \\+ 1 entries each"):
        varlen_attention(q, k, v, cu, _cu_seqlens([5]), 3, 5)
    with pytest.raises(ValueError, match=r"k, v \[Tk, H, D\]"):
        varlen_attention(q, k[:, :1], v[:, :1], cu, cu, 3, 3)
    with pytest.raises(ValueError, match=r"q_positions must be int32 \[Tq\]"):
        varlen_attention(q, k, v, cu, cu, 3, 3, q_positions=torch.zeros(5, dtype=torch.int64))


# ---- separate query and key layouts (cross attention, the sparse last layer)

Q_LENGTHS = [2, 0, 1, 3, 0]  # queries per sequence: none where the keys are empty and elsewhere
K_LENGTHS = [5, 0, 1, 7, 3]


def _cross_qkv(dtype=torch.float64, seed=3):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(Q_LENGTHS), HEADS, HEAD_DIM, generator=gen, dtype=dtype)
    k, v = (torch.randn(sum(K_LENGTHS), HEADS, HEAD_DIM, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v


def test_varlen_attention_separate_layouts_match_sdpa_per_sequence():
    q, k, v = _cross_qkv()
    cu_q, cu_k = _cu_seqlens(Q_LENGTHS), _cu_seqlens(K_LENGTHS)
    out = varlen_attention(q, k, v, cu_q, cu_k, max(Q_LENGTHS), max(K_LENGTHS))
    assert out.shape == q.shape
    for b in range(len(Q_LENGTHS)):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if Q_LENGTHS[b] == 0:
            continue
        expected = F.scaled_dot_product_attention(*(t[s].transpose(0, 1) for t, s in ((q, rows), (k, keys), (v, keys))))
        torch.testing.assert_close(out[rows], expected.transpose(0, 1), msg=lambda m, b=b: f"sequence {b}: {m}")


def test_varlen_attention_queries_without_keys_are_zero():
    q, k, v = _cross_qkv()
    q, k, v = _leaf(q, k[:15], v[:15])
    cu_q, cu_k = _cu_seqlens([3, 2, 1]), _cu_seqlens([0, 10, 5])  # sequence 0 has queries, no keys
    out = varlen_attention(q, k, v, cu_q, cu_k, 3, 10, dropout_p=0.2, seed=1)
    assert out[:3].abs().max().item() == 0.0 and out[3:].abs().min().item() > 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[:3].abs().max().item() == 0.0
    _, lse = attention.varlen_attention_fwd(q, k, v, cu_q, cu_k, 3, 10, 0.0, 0, 0, 0.5)
    assert torch.isinf(lse[:, :3]).all() and (lse[:, :3] > 0).all(), "queries without keys must have lse = +inf"


def _sparse_rows(gen):
    """A subset of each sequence's positions (some sequences keep none), as the sparse last layer
    picks them: (cu_seqlens_q, q_positions, flat token indices of the kept rows)."""
    cu = _cu_seqlens(K_LENGTHS)
    counts, positions, rows = [], [], []
    for b, n in enumerate(K_LENGTHS):
        keep = sorted(torch.randperm(n, generator=gen)[: (n + 1) // 2].tolist())
        counts.append(len(keep))
        positions += keep
        rows += [int(cu[b]) + p for p in keep]
    return _cu_seqlens(counts), max(counts), torch.tensor(positions, dtype=torch.int32), torch.tensor(rows)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_varlen_attention_sparse_queries_equal_full_rows_with_dropout(dropout_p):
    """Queries at some positions with their positions as ``q_positions`` give the full
    self-attention's outputs and gradients at those rows: the same dropout mask, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    cu_q, max_q, positions, rows = _sparse_rows(gen)
    cu, longest = _cu_seqlens(K_LENGTHS), max(K_LENGTHS)
    q, k, v = _leaf(*_varlen_qkv(K_LENGTHS, seed=5))
    kwargs = {"dropout_p": dropout_p, "seed": 2**40 + 9, "offset": 6}
    full = varlen_attention(q, k, v, cu, cu, longest, longest, **kwargs)
    q_rows = q.detach()[rows].requires_grad_()
    ks, vs = _leaf(k, v)
    sparse = varlen_attention(q_rows, ks, vs, cu_q, cu, max_q, longest, q_positions=positions, **kwargs)
    torch.testing.assert_close(sparse, full[rows], rtol=0, atol=1e-12)
    dout = torch.randn(sparse.shape, generator=gen, dtype=sparse.dtype)
    sparse.backward(dout)
    full.backward(torch.zeros_like(full).index_copy(0, rows, dout))
    torch.testing.assert_close(q_rows.grad, q.grad[rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(ks.grad, k.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(vs.grad, v.grad, rtol=0, atol=1e-12)
    if dropout_p:  # the positions matter: the local indices draw other masks
        local = varlen_attention(q_rows.detach(), k, v, cu_q, cu, max_q, longest, **kwargs)
        assert not torch.equal(local, sparse)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_varlen_attention_separate_layouts_gradcheck(dropout_p):
    gen = torch.Generator().manual_seed(6)
    cu_q, max_q, positions, _ = _sparse_rows(gen)
    cu = _cu_seqlens(K_LENGTHS)
    q = torch.randn(positions.numel(), HEADS, HEAD_DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = _leaf(*_varlen_qkv(K_LENGTHS, seed=7)[:2])
    assert torch.autograd.gradcheck(
        lambda q, k, v: varlen_attention(
            q, k, v, cu_q, cu, max_q, max(K_LENGTHS), dropout_p=dropout_p, seed=3, offset=1, q_positions=positions
        ),
        (q, k, v),
    )


@pytest.mark.parametrize("with_positions", [False, True])
def test_attention_opcheck_separate_layouts(with_positions):
    gen = torch.Generator().manual_seed(8)
    cu_q, max_q, positions, _ = _sparse_rows(gen)
    cu = _cu_seqlens(K_LENGTHS)
    q = torch.randn(positions.numel(), HEADS, HEAD_DIM, generator=gen, requires_grad=True)
    k, v = (torch.randn(sum(K_LENGTHS), HEADS, HEAD_DIM, generator=gen, requires_grad=True) for _ in range(2))
    args = (cu_q, cu, max_q, max(K_LENGTHS), 0.25, 9, 4, HEAD_DIM**-0.5, positions if with_positions else None)
    torch.library.opcheck(attention.varlen_attention_fwd, (q, k, v, *args))
    out, lse = attention.varlen_attention_fwd(q, k, v, *args)
    bwd_inputs = [t.detach() for t in (torch.randn_like(out), q, k, v, out, lse)]
    torch.library.opcheck(attention.varlen_attention_bwd, (*bwd_inputs, *args))
