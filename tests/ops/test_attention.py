"""Tests of lub_fast.ops.attention: varlen and padded attention references, ops and dropout."""

import pytest
import torch
import torch.nn.functional as F

from lub_fast.ops import attention
from lub_fast.ops.attention import padded_attention, varlen_attention

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
    out = varlen_attention(q, k, v, _cu_seqlens(lengths), seqlen)
    qp, kp, vp = (_pad(t, mask).transpose(1, 2) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(out, expected.transpose(1, 2)[mask])


def test_varlen_attention_scale_argument():
    q, k, v = _varlen_qkv(LENGTHS)
    cu = _cu_seqlens(LENGTHS)
    seqlen = max(LENGTHS)
    # Scaling q by c with scale / c is the same attention.
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, seqlen, scale=0.3),
        varlen_attention(q * 3.0, k, v, cu, seqlen, scale=0.1),
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_padded_attention_matches_varlen(dropout_p):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 9, (12,), generator=gen).tolist() + [0, 1]
    seqlen = max(lengths) + 2  # extra padding columns change nothing
    mask = _mask(lengths, seqlen)
    q, k, v = _leaf(*_varlen_qkv(lengths, seed=2))
    qp, kp, vp = _leaf(*(_pad(t, mask) for t in (q, k, v)))
    kwargs = dict(dropout_p=dropout_p, seed=11, offset=5)
    out = varlen_attention(q, k, v, _cu_seqlens(lengths), max(lengths), **kwargs)
    out_p = padded_attention(qp, kp, vp, mask, **kwargs)
    torch.testing.assert_close(out_p[mask], out, rtol=0, atol=1e-12)
    assert out_p[~mask].abs().max().item() == 0.0, "padded query rows must be zeros"
    dout = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    out.backward(dout)
    out_p.backward(_pad(dout, mask) + (~mask)[:, :, None, None])  # gradient at padded rows is ignored
    for name, g, gp in (("q", q.grad, qp.grad), ("k", k.grad, kp.grad), ("v", v.grad, vp.grad)):
        torch.testing.assert_close(gp[mask], g, rtol=0, atol=1e-12, msg=lambda m: f"d{name}: {m}")
        assert gp[~mask].abs().max().item() == 0.0, f"d{name} at padding must be zero"


def test_padded_attention_fully_padded_sequence_is_zero():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    q, k, v = _leaf(*(torch.randn(2, 3, HEADS, HEAD_DIM, dtype=torch.float64) for _ in range(3)))
    out = padded_attention(q, k, v, mask, dropout_p=0.2, seed=3)
    assert torch.isfinite(out).all()
    assert out[1].abs().max().item() == 0.0, f"fully padded row gave {out[1].abs().max().item()}"
    out.sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
        assert g[1].abs().max().item() == 0.0
    _, lse = attention.padded_attention_fwd(q, k, v, mask, 0.0, 0, 0, HEAD_DIM**-0.5)
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all(), "empty rows must have lse = +inf"


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_varlen_attention_gradcheck(dropout_p):
    inputs = _leaf(*_varlen_qkv([3, 0, 1, 4]))
    cu = _cu_seqlens([3, 0, 1, 4])
    assert torch.autograd.gradcheck(
        lambda q, k, v: varlen_attention(q, k, v, cu, 4, dropout_p=dropout_p, seed=7, offset=2), inputs
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_padded_attention_gradcheck(dropout_p):
    mask = _mask([3, 1, 0], 4)
    shape = (3, 4, HEADS, HEAD_DIM)
    inputs = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: padded_attention(q, k, v, mask, dropout_p=dropout_p, seed=7, offset=2), inputs
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
    args = (cu, seqlen, dropout_p, 9, 4, scale)
    torch.library.opcheck(attention.varlen_attention_fwd, (q, k, v, *args))
    out, lse = attention.varlen_attention_fwd(q, k, v, *args)
    bwd_inputs = [t.detach() for t in (torch.randn_like(out), q, k, v, out, lse)]
    torch.library.opcheck(attention.varlen_attention_bwd, (*bwd_inputs, *args))

    mask = _mask(lengths, seqlen + 1)
    qp, kp, vp = _leaf(*(_pad(t.detach(), mask) for t in (q, k, v)))
    args = (mask, dropout_p, 9, 4, scale)
    torch.library.opcheck(attention.padded_attention_fwd, (qp, kp, vp, *args))
    out, lse = attention.padded_attention_fwd(qp, kp, vp, *args)
    bwd_inputs = [t.detach() for t in (torch.randn_like(out), qp, kp, vp, out, lse)]
    torch.library.opcheck(attention.padded_attention_bwd, (*bwd_inputs, *args))


def test_attention_compile_fullgraph():
    lengths = [4, 0, 1, 3]
    cu, seqlen = _cu_seqlens(lengths), max(lengths)
    mask = _mask(lengths, seqlen)

    def fn(q, k, v, qp, kp, vp):
        a = varlen_attention(q * 2.0, k, v, cu, seqlen, dropout_p=0.2, seed=5, offset=1)
        b = padded_attention(qp, kp, vp.sin(), mask, dropout_p=0.2, seed=5, offset=1)
        return (a.square().sum() + b.cos().sum(), a, b)

    q, k, v = _varlen_qkv(lengths, dtype=torch.float32)
    inputs = [q, k, v] + [_pad(t, mask) for t in (q, k, v)]
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
    out = varlen_attention(q, k, v, _cu_seqlens(lengths), 6, dropout_p=p, seed=seed, offset=offset)
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
        return varlen_attention(q, k, v, cu, 9, dropout_p=0.2, seed=seed, offset=offset)

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
    out = varlen_attention(*low, cu, seqlen, **kwargs)
    out_ref = varlen_attention(*ref, cu, seqlen, **kwargs)
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
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, _cu_seqlens([3, 2]).long(), 3)
    with pytest.raises(ValueError, match="end at T=5"):
        varlen_attention(q, k, v, _cu_seqlens([3, 1]), 3)
    with pytest.raises(ValueError, match="max_seqlen=2"):
        varlen_attention(q, k, v, _cu_seqlens([3, 2]), 2)
    with pytest.raises(ValueError, match="dropout_p"):
        varlen_attention(q, k, v, _cu_seqlens([3, 2]), 3, dropout_p=1.0)
    with pytest.raises(ValueError, match="bool"):
        padded_attention(q[None], k[None], v[None], torch.ones(1, 5, dtype=torch.int64))
