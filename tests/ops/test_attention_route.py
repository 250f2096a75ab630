"""Routing of lub_fast attention (``attention_route``, a pure function of the device type, dtype, head
dim and what is built), the SDPA and PyTorch-flash fallbacks against the reference (SDPA runs on the
CPU; PyTorch's flash attention is CUDA-only, so its argument plumbing runs against fakes of the aten
ops), and the ``cu_seqlens`` checks every device gets."""

import pytest
import torch

from lub_fast.ops import attention
from lub_fast.ops.attention import Built, attention_route, varlen_attention

LENGTHS = [5, 0, 1, 7, 3]  # an empty and a length-1 sequence, odd sizes
HEADS = 2
HEAD_DIM = 8

NOTHING = Built(lub_fast=False, torch_flash=False)
KERNEL = Built(lub_fast=True, torch_flash=False)
FLASH = Built(lub_fast=False, torch_flash=True)
BOTH = Built(lub_fast=True, torch_flash=True)


def _cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _qkv(lengths, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return [torch.randn(total, HEADS, HEAD_DIM, generator=gen, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize(
    "device, dtype, head_dim, built, expected",
    [
        ("cpu", torch.float32, 64, KERNEL, "lub_fast"),
        ("cpu", torch.float64, 64, KERNEL, "lub_fast"),
        ("cpu", torch.bfloat16, 64, NOTHING, "reference"),
        ("cuda", torch.bfloat16, 64, BOTH, "lub_fast"),
        ("cuda", torch.float16, 128, KERNEL, "lub_fast"),
        ("cuda", torch.bfloat16, 96, BOTH, "torch_varlen"),  # head dim the kernel lacks
        ("cuda", torch.float16, 64, FLASH, "torch_varlen"),  # CUDA extension not built
        ("cuda", torch.bfloat16, 96, KERNEL, "sdpa"),  # neither kernel takes it
        ("cuda", torch.bfloat16, 20, BOTH, "sdpa"),  # flash needs a multiple of 8
        ("cuda", torch.bfloat16, 512, FLASH, "sdpa"),  # flash stops at 256
        ("cuda", torch.bfloat16, 64, NOTHING, "sdpa"),  # pre-sm80 GPU, no extension
        ("cuda", torch.float64, 64, BOTH, "reference"),
        ("mps", torch.float32, 64, NOTHING, "sdpa"),
    ],
)
def test_attention_route_table(device, dtype, head_dim, built, expected):
    assert attention_route(device, dtype, head_dim, built) == expected


@pytest.mark.parametrize("built", [NOTHING, KERNEL, FLASH, BOTH])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 100, 128, 256])
def test_attention_route_cuda_fp32_never_materialises(built, head_dim):
    """The default GPU dtype before autocast, fp32, goes to SDPA, never to the [B, H, S, S] reference."""
    route = attention_route("cuda", torch.float32, head_dim, built)
    assert route == "sdpa", (head_dim, built, route)


@pytest.mark.parametrize(
    "device, route, deterministic, expected",
    [
        ("cuda", "lub_fast", False, "lub_fast_atomic_dq"),  # the default stays the atomic kernel
        ("cuda", "lub_fast", True, "lub_fast_dq_pass"),
        ("cpu", "lub_fast", False, "lub_fast_cpu"),
        ("cpu", "lub_fast", True, "lub_fast_cpu"),
        ("cpu", "reference", True, "reference"),
        ("cuda", "reference", False, "reference"),
        ("cuda", "torch_varlen", True, "torch"),
        ("cuda", "sdpa", False, "torch"),
    ],
)
def test_backward_route_table(device, route, deterministic, expected):
    assert attention.backward_route(device, route, deterministic) == expected


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("built", [NOTHING, KERNEL, FLASH, BOTH])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_backward_route_under_the_switch_never_atomic(device, built, dtype):
    """Under torch.use_deterministic_algorithms(True) no route ends in a backward of ours with atomics."""
    route = attention_route(device, dtype, 64, built)
    backward = attention.backward_route(device, route, True)
    assert attention.BACKWARD_DETERMINISTIC.get(backward, False) is not False, (
        route, backward,
    )


def test_backward_route_determinism_is_declared():
    assert [b for b, exact in attention.BACKWARD_DETERMINISTIC.items() if exact is False] == ["lub_fast_atomic_dq"]


def test_info_prints_the_backward_of_each_device():
    from lub_fast import info

    rows = {" ".join(line.split()[:2]): line.split()[2:] for line in info.attention_backwards(KERNEL, BOTH)[1:-1]}
    assert rows == {
        "cpu fp32": ["lub_fast_cpu", "lub_fast_cpu"], "cpu bf16": ["lub_fast_cpu", "lub_fast_cpu"],
        "cuda fp32": ["torch", "torch"], "cuda bf16": ["lub_fast_atomic_dq", "lub_fast_dq_pass"],
    }, rows  # fmt: skip


@pytest.mark.parametrize("switch", [False, True])
def test_varlen_attention_backward_follows_the_deterministic_switch(monkeypatch, switch):
    """The autograd backward passes torch.are_deterministic_algorithms_enabled() to the backward op."""
    seen = []
    real = attention.varlen_attention_bwd
    monkeypatch.setattr(attention, "varlen_attention_bwd", lambda *a: seen.append(a[-1]) or real(*a))
    q, k, v = _qkv(LENGTHS, torch.float32)
    cu, longest = _cu_seqlens(LENGTHS), max(LENGTHS)
    out = varlen_attention(q, k, v, cu, cu, longest, longest, 0.1, 3, 4)
    torch.use_deterministic_algorithms(switch)
    try:
        out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [switch], seen


def test_attention_route_dropout_exactness_is_declared():
    assert set(attention.DROPOUT_EXACT) == set(attention.ROUTES)
    assert [r for r in attention.ROUTES if attention.DROPOUT_EXACT[r]] == ["lub_fast", "reference"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_varlen_attention_sdpa_matches_reference(dtype):
    cu, seqlen = _cu_seqlens(LENGTHS), max(LENGTHS) + 2  # max_seqlen above the longest is allowed
    q, k, v = _qkv(LENGTHS, dtype)
    out = attention.varlen_attention_sdpa(q, k, v, cu, cu, seqlen, seqlen, 0.0, 0.3)
    ref, _ = attention.varlen_attention_fwd_ref(q, k, v, cu, cu, seqlen, seqlen, 0.0, 0, 0, 0.3)
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, msg=lambda m, name=name: f"d{name}: {m}")


def test_varlen_attention_sdpa_dropout_keeps_rate():
    """SDPA's dropout is torch's own (not counter-based): same expectation, rescaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    lengths = [64] * 8
    cu = _cu_seqlens(lengths)
    q = torch.zeros(sum(lengths), HEADS, HEAD_DIM)  # uniform probabilities 1 / 64
    v = torch.ones(sum(lengths), HEADS, HEAD_DIM)
    out = attention.varlen_attention_sdpa(q, q, v, cu, cu, 64, 64, 0.25, 1.0)
    # Each output is (kept count) / 64 / 0.75, whose mean over 8192 rows is 1 within a few 1e-3.
    mean = out[..., 0].mean().item()
    assert abs(mean - 1.0) < 0.02, mean


Q_LENGTHS = [2, 1, 1, 3, 1]  # queries per sequence for the separate-layout cases (keys: LENGTHS)


def _cross(dtype):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(sum(Q_LENGTHS), HEADS, HEAD_DIM, generator=gen, dtype=dtype).requires_grad_()
    k, v = (torch.randn(sum(LENGTHS), HEADS, HEAD_DIM, generator=gen, dtype=dtype).requires_grad_() for _ in "kv")
    return q, k, v, _cu_seqlens(Q_LENGTHS), _cu_seqlens(LENGTHS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_varlen_attention_sdpa_separate_layouts_match_reference(dtype):
    """Queries in a layout of their own, one of them in a sequence without keys (zeros)."""
    q, k, v, cu_q, cu_k = _cross(dtype)
    args = (cu_q, cu_k, max(Q_LENGTHS) + 1, max(LENGTHS))
    out = attention.varlen_attention_sdpa(q, k, v, *args, 0.0, 0.3)
    ref, _ = attention.varlen_attention_fwd_ref(q, k, v, *args, 0.0, 0, 0, 0.3)
    torch.testing.assert_close(out, ref)
    assert out[2].abs().max().item() == 0.0  # the query of sequence 1, which has no keys
    dout = torch.randn_like(out)
    for name, g, r in zip("qkv", torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, msg=lambda m, name=name: f"d{name}: {m}")


def test_varlen_attention_torch_flash_separate_layouts(monkeypatch):
    calls = {}
    forward, backward = _fake_flash(calls)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", forward)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", backward)
    q, k, v, cu_q, cu_k = _cross(torch.float64)
    out = attention.varlen_attention_torch(q, k, v, cu_q, cu_k, 3, 7, 0.0, 0.5)
    fwd = calls["fwd"]
    assert fwd["cu_q"] is cu_q and fwd["cu_k"] is cu_k and (fwd["max_q"], fwd["max_k"]) == (3, 7), fwd
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert calls["bwd_layouts"][0] is cu_q and calls["bwd_layouts"][1] is cu_k and calls["bwd_layouts"][2:] == (3, 7)
    ref, _ = attention.varlen_attention_fwd_ref(q, k, v, cu_q, cu_k, 3, 7, 0.0, 0, 0, 0.5)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r)


def _fake_flash(calls):
    """Fakes of aten::_flash_attention_{forward,backward} computing the reference on the CPU and
    recording the arguments."""

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None):
        calls["fwd"] = dict(cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, dropout_p=dropout_p,
                            is_causal=is_causal, debug=return_debug_mask, scale=scale,
                            strides=(q.stride(), k.stride(), v.stride()))
        out, lse = attention.varlen_attention_fwd_ref(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, 0, 0, scale)
        rng_state, unused = torch.tensor([123, 4], dtype=torch.int64), torch.empty(0)
        return out, lse, rng_state, unused, torch.empty(0)

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, rng_state, unused, *,
                 scale=None):
        calls["bwd"] = dict(rng_state=rng_state.tolist(), unused=unused.numel(), dropout_p=dropout_p,
                            max_q=max_q, is_causal=is_causal, scale=scale)
        calls["bwd_layouts"] = (cu_q, cu_k, max_q, max_k)
        return attention.varlen_attention_bwd_ref(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, 0, 0, scale)

    return forward, backward


def test_varlen_attention_torch_flash_plumbing(monkeypatch):
    calls = {}
    forward, backward = _fake_flash(calls)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", forward)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", backward)
    cu, seqlen = _cu_seqlens(LENGTHS), max(LENGTHS)
    total = sum(LENGTHS)
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(total, 3, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64).requires_grad_()
    q, k, v = qkv.unbind(1)  # views with a row stride of 3 * H * D, as the encoder makes them
    out = attention.varlen_attention_torch(q, k, v, cu, cu, seqlen, seqlen, 0.1, 0.5)
    fwd = calls["fwd"]
    assert fwd["cu_q"] is cu and fwd["cu_k"] is cu and fwd["max_q"] == fwd["max_k"] == seqlen, fwd
    assert (fwd["dropout_p"], fwd["is_causal"], fwd["debug"], fwd["scale"]) == (0.1, False, False, 0.5), fwd
    assert fwd["strides"][0] == (3 * HEADS * HEAD_DIM, HEAD_DIM, 1), fwd  # no copy of the views
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    bwd = calls["bwd"]
    assert bwd == dict(rng_state=[123, 4], unused=0, dropout_p=0.1, max_q=seqlen, is_causal=False, scale=0.5), bwd
    ref_q, ref_k, ref_v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, _ = attention.varlen_attention_fwd_ref(ref_q, ref_k, ref_v, cu, cu, seqlen, seqlen, 0.0, 0, 0, 0.5)
    torch.testing.assert_close(out, ref)
    ref_grads = torch.autograd.grad(ref, (ref_q, ref_k, ref_v), dout)
    torch.testing.assert_close(grad, torch.stack(ref_grads, dim=1))


@pytest.mark.parametrize("route", ["sdpa", "torch_varlen", "reference", "lub_fast"])
def test_varlen_attention_dispatches_on_route(monkeypatch, route):
    called = []
    monkeypatch.setattr(attention, "route_of", lambda q: route)
    for name in ("varlen_attention_sdpa", "varlen_attention_torch"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _n=name, _r=real: called.append(_n) or _r(*a))
    q, k, v = _qkv(LENGTHS, torch.float32)
    if route == "torch_varlen":
        forward, backward = _fake_flash({})
        monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", forward)
    cu, longest = _cu_seqlens(LENGTHS), max(LENGTHS)
    out = varlen_attention(q, k, v, cu, cu, longest, longest)
    expected = {"sdpa": ["varlen_attention_sdpa"], "torch_varlen": ["varlen_attention_torch"]}.get(route, [])
    assert called == expected, (route, called)
    ref, _ = attention.varlen_attention_fwd_ref(q, k, v, cu, cu, longest, longest, 0.0, 0, 0, HEAD_DIM**-0.5)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(
    "cu, max_seqlen, match",
    [
        ([1, 3, 5], 3, "start at 0"),
        ([0, 4, 3, 5], 4, "non-decreasing"),
        ([0, 3, 4], 3, "end at Tq=5"),
        ([0, 3, 5], 2, "max_seqlen_q=2 < longest sequence 3"),
    ],
)
def test_check_cu_seqlens_rejects(cu, max_seqlen, match):
    q, k, v = _qkv([3, 2])
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, cu_t := torch.tensor(cu, dtype=torch.int32), cu_t, max_seqlen, max_seqlen)
    with pytest.raises(ValueError, match=match):
        attention.check_cu_seqlens(torch.tensor(cu, dtype=torch.int32), max_seqlen, 5)


def test_check_cu_seqlens_rechecks_after_in_place_change():
    cu = _cu_seqlens([3, 2])
    attention.check_cu_seqlens(cu, 3, 5)
    attention.check_cu_seqlens(cu, 3, 5)  # memo hit
    cu[1] = 6  # bumps the version counter: checked again
    with pytest.raises(ValueError, match="non-decreasing"):
        attention.check_cu_seqlens(cu, 6, 5)
    with pytest.raises(ValueError, match="end at Tq=4"):
        attention.check_cu_seqlens(_cu_seqlens([3, 2]), 3, 4)  # same values, another T


def test_check_cu_seqlens_under_compile_raises():
    """A compiled graph cannot sync to the host: the check runs in the opaque op checked_cu_seqlens."""
    q, k, v = (t.detach() for t in _qkv([3, 2], torch.float32))

    def fn(q, k, v, cu):
        return varlen_attention(q, k, v, cu, cu, 3, 3).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    good = _cu_seqlens([3, 2])
    torch.testing.assert_close(compiled(q, k, v, good), fn(q, k, v, good))
    with pytest.raises(ValueError, match="end at Tq=5"):
        compiled(q, k, v, torch.tensor([0, 3, 4], dtype=torch.int32))
    torch.library.opcheck(attention.checked_cu_seqlens, (good, 3, 5, "q"))
