"""Tests of lub_fast.ops.bias_gelu: reference, ops, autograd, compile and low precision."""

import pytest
import torch
import torch.nn.functional as F

from lub_fast.ops import bias_gelu as bias_gelu_module
from lub_fast.ops.bias_gelu import bias_gelu

SHAPES = [(3, 5, 7), (1, 13), (97,)]


def _inputs(shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3.0
    bias = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    return x.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_matches_torch_gelu(shape, dtype, approximate):
    x, bias = _inputs(shape, dtype)
    x.requires_grad_()
    bias.requires_grad_()
    y = bias_gelu(x, bias, approximate)
    expected = F.gelu(x + bias, approximate=approximate)
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, bias), dy)
    expected_grads = torch.autograd.grad(expected, (x, bias), dy)
    for name, g, e in zip(("x", "bias"), grads, expected_grads):
        torch.testing.assert_close(g, e, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_gradcheck(approximate):
    x, bias = _inputs((4, 3, 6))
    inputs = (x.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, b: bias_gelu(x, b, approximate), inputs)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_opcheck(shape, approximate):
    x, bias = _inputs(shape, torch.float32)
    torch.library.opcheck(
        bias_gelu_module.bias_gelu_fwd, (x.requires_grad_(), bias.requires_grad_(), approximate)
    )
    grad_out = torch.randn(shape)
    bwd_args = (grad_out, x.detach(), bias.detach(), approximate)
    torch.library.opcheck(bias_gelu_module.bias_gelu_bwd, bwd_args)


def test_bias_gelu_compile_fullgraph():
    def fn(x, bias):
        y = bias_gelu(x * 2.0, bias, "none") + bias_gelu(x, bias.cos(), "tanh")
        return y.square().sum(), y

    x, bias = _inputs((5, 8), torch.float32)
    eager_in = [t.clone().requires_grad_() for t in (x, bias)]
    compiled_in = [t.clone().requires_grad_() for t in (x, bias)]
    eager = fn(*eager_in)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*compiled_in)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    eager[0].backward()
    compiled[0].backward()
    for e, c in zip(eager_in, compiled_in):
        torch.testing.assert_close(c.grad, e.grad)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_gelu_low_precision_matches_fp32(dtype, approximate):
    x, bias = (t.requires_grad_() for t in _inputs((6, 33), dtype))
    ref_x, ref_bias = (t.detach().float().requires_grad_() for t in (x, bias))
    y = bias_gelu(x, bias, approximate)
    y_ref = bias_gelu(ref_x, ref_bias, approximate)
    assert y.dtype == dtype
    # fp32 math on the same inputs rounded once: within half an ulp of the output dtype
    torch.testing.assert_close(y, y_ref.to(dtype), rtol=0, atol=0)
    dy = torch.randn(y.shape, dtype=dtype)
    y.backward(dy)
    y_ref.backward(dy.float())
    torch.testing.assert_close(x.grad, ref_x.grad.to(dtype), rtol=0, atol=0)
    # the bias gradient sums 6 rounded rows: within twice the error of torch's own gelu run in `dtype`
    torch_x, torch_bias = (t.detach().requires_grad_() for t in (x, bias))
    F.gelu(torch_x + torch_bias, approximate=approximate).backward(dy)
    err, torch_err = ((g.double() - ref_bias.grad.double()).abs().max().item() for g in (bias.grad, torch_bias.grad))
    assert err <= 2 * torch_err, f"bias grad error {err:.3g} > 2 x torch's {dtype} error {torch_err:.3g}"


def test_bias_gelu_rejects_bad_inputs():
    x, bias = _inputs((2, 4))
    with pytest.raises(ValueError, match="approximate"):
        bias_gelu(x, bias, "erf")
    with pytest.raises(ValueError, match="bias must be"):
        bias_gelu(x, bias[:3])
    with pytest.raises(ValueError, match="floating"):
        bias_gelu(x, bias.long())


def test_bias_gelu_fp32_bias_with_bf16_input():
    x, bias = _inputs((4, 9), torch.bfloat16)
    bias = bias.float().requires_grad_()
    x.requires_grad_()
    y = bias_gelu(x, bias)
    assert y.dtype == torch.bfloat16
    ref_x = x.detach().float().requires_grad_()
    ref_bias = bias.detach().clone().requires_grad_()
    y_ref = F.gelu(ref_x + ref_bias)
    torch.testing.assert_close(y, y_ref.to(torch.bfloat16))  # bf16 defaults: one rounding
    y.backward(torch.ones_like(y))
    y_ref.backward(torch.ones_like(y_ref))
    assert bias.grad.dtype == torch.float32
    # grad_x is rounded to bf16 before the sum over 4 rows
    torch.testing.assert_close(bias.grad, ref_bias.grad, rtol=1e-2, atol=1e-2)
