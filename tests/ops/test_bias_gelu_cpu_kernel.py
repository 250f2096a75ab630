"""Tests of the C++ CPU kernels of lub_fast::bias_gelu_fwd/bwd (csrc/bias_gelu/bias_gelu.cpp).

They must compute what ``bias_gelu_fwd_ref`` / ``bias_gelu_bwd_ref`` compute: fp32 within
``assert_close`` defaults, fp64 to 1e-12, fp16/bf16 within twice the reference's own error against
fp64. Skipped when no CPU kernel is registered, failed instead when LUB_FAST_REQUIRE_KERNELS=1.
"""

import os

import pytest
import torch

from lub_fast.ops import EXTENSION_ERRORS, has_kernel
from lub_fast.ops.bias_gelu import bias_gelu, bias_gelu_bwd_ref, bias_gelu_fwd_ref

OPS = ("bias_gelu_fwd", "bias_gelu_bwd")
FWD = torch.ops.lub_fast.bias_gelu_fwd
BWD = torch.ops.lub_fast.bias_gelu_bwd


@pytest.fixture(autouse=True)
def _require_kernel():
    missing = ", ".join(f"lub_fast::{op}" for op in OPS if not has_kernel(op, "cpu"))
    if missing:
        why = EXTENSION_ERRORS.get("lub_fast._C") or "lub_fast._C loaded but registers no such kernel"
        if os.environ.get("LUB_FAST_REQUIRE_KERNELS") == "1":
            pytest.fail(f"LUB_FAST_REQUIRE_KERNELS=1 but no CPU kernel for {missing} ({why})")
        pytest.skip(f"no CPU kernel registered for {missing} ({why})")


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
    bias = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    grad = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x.to(dtype), bias.to(dtype), grad.to(dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (97, 33), (4, 7, 512)])
def test_bias_gelu_cpu_kernel_matches_reference(shape, dtype, approximate):
    x, bias, grad = _inputs(shape, dtype)
    close = {} if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(FWD(x, bias, approximate), bias_gelu_fwd_ref(x, bias, approximate), **close)
    torch.testing.assert_close(BWD(grad, x, bias, approximate), bias_gelu_bwd_ref(grad, x, bias, approximate), **close)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_gelu_cpu_kernel_low_precision_error_bound(dtype, approximate):
    x, bias, grad = _inputs((64, 256), dtype, seed=3)
    exact_y = bias_gelu_fwd_ref(x.double(), bias.double(), approximate)
    exact_g = bias_gelu_bwd_ref(grad.double(), x.double(), bias.double(), approximate)
    for ours, ref, exact in (
        (FWD(x, bias, approximate), bias_gelu_fwd_ref(x, bias, approximate), exact_y),
        (BWD(grad, x, bias, approximate), bias_gelu_bwd_ref(grad, x, bias, approximate), exact_g),
    ):
        assert ours.dtype == dtype
        err, ref_err = (ours.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
        assert err <= 2 * ref_err + 1e-12, f"kernel error {err:.3g} > 2 x reference error {ref_err:.3g}"


def test_bias_gelu_cpu_kernel_fp32_bias_under_low_precision_x():
    x, _, grad = _inputs((8, 16), torch.bfloat16)
    bias = torch.randn(16)
    y = FWD(x, bias, "none")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, bias_gelu_fwd_ref(x, bias, "none"))
    torch.testing.assert_close(BWD(grad, x, bias, "none"), bias_gelu_bwd_ref(grad, x, bias, "none"))


def test_bias_gelu_cpu_kernel_opcheck_and_autograd():
    x, bias, _ = _inputs((5, 12), torch.float32, seed=7)
    torch.library.opcheck(FWD, (x, bias, "tanh"))
    torch.library.opcheck(BWD, (torch.randn(5, 12), x, bias, "none"))
    x64, b64 = x.double().requires_grad_(), bias.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: bias_gelu(a, b, "none"), (x64, b64))


def test_bias_gelu_cpu_kernel_rejects_bad_shapes():
    with pytest.raises(ValueError, match="bias must be"):
        FWD(torch.randn(3, 4), torch.randn(5), "none")
    with pytest.raises(ValueError, match="approximate"):
        FWD(torch.randn(3, 4), torch.randn(4), "fast")
