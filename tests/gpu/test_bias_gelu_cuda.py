"""GPU tests of the CUDA bias+GELU kernels (csrc/bias_gelu/bias_gelu_kernel.cu) against the reference.

fp32: ``assert_close`` defaults against the reference. fp16/bf16: the kernel's max error against the
fp32 reference is at most 2x that of PyTorch's ``gelu(x + bias)`` run in the low precision, for y,
grad_x and grad_bias. Both the 16-byte vector path and the scalar path (N not a multiple of the
vector width, misaligned rows) are covered, with fp32 bias under bf16/fp16 inputs as under autocast.
"""

import pytest
import torch
import torch.nn.functional as F

from lub_fast.ops import bias_gelu as bg

pytestmark = pytest.mark.gpu

APPROXIMATIONS = ["none", "tanh"]
# (shape, why): BERT-base FFN rows; N odd (scalar path); one row; 3-D input.
SHAPES = [(513, 3072), (97, 1001), (1, 8), (3, 5, 24)]


@pytest.fixture(autouse=True)
def _kernels(require_cuda_kernels):
    require_cuda_kernels(*bg.OPS)


def _inputs(shape, dtype, bias_dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (2.0 * torch.randn(shape, generator=gen, device="cuda")).to(dtype)
    bias = torch.randn(shape[-1], generator=gen, device="cuda").to(bias_dtype)
    dy = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    return x, bias, dy


def _run(fn, x, bias, dy):
    x, bias = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y = fn(x, bias)
    y.backward(dy)
    return y, x.grad, bias.grad


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_cuda_fp32_matches_reference(shape, approximate):
    x, bias, dy = _inputs(shape, torch.float32, torch.float32, seed=1)
    ours = _run(lambda a, b: bg.bias_gelu(a, b, approximate), x, bias, dy)
    ref = _run(lambda a, b: bg.bias_gelu_fwd_ref(a, b, approximate), x, bias, dy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("bias_fp32", [False, True])
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_gelu_cuda_low_precision_parity(dtype, shape, approximate, bias_fp32):
    x, bias, dy = _inputs(shape, dtype, torch.float32 if bias_fp32 else dtype, seed=2)
    ours = _run(lambda a, b: bg.bias_gelu(a, b, approximate), x, bias, dy)
    ref = _run(lambda a, b: bg.bias_gelu_fwd_ref(a.float(), b.float(), approximate), x, bias, dy.float())
    lowp = _run(lambda a, b: F.gelu(a + b.to(a.dtype), approximate=approximate), x, bias, dy)
    for name, o, r, l in zip(("y", "grad_x", "grad_bias"), ours, ref, lowp):
        assert o.dtype == l.dtype or name == "grad_bias", f"{name}: dtype {o.dtype}, expected {l.dtype}"
        err = (o.float() - r.float()).abs().max().item()
        base = (l.float() - r.float()).abs().max().item()
        assert err <= 2.0 * base + 1e-6, (
            f"{name} ({dtype}, bias fp32={bias_fp32}): kernel max error {err:.3e} > 2 x PyTorch-{dtype} "
            f"max error {base:.3e}"
        )


def test_bias_gelu_cuda_misaligned_input_uses_scalar_path():
    x, bias, _ = _inputs((64 * 1024 + 1,), torch.bfloat16, torch.bfloat16, seed=3)
    view = x[1:].view(64, 1024)  # contiguous, 2 bytes past a 16-byte boundary
    assert view.data_ptr() % 16 != 0
    ours = bg.bias_gelu(view, bias[1:1025].contiguous())
    ref = bg.bias_gelu_fwd_ref(view, bias[1:1025], "none")
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=2**-8)


def test_bias_gelu_cuda_rounds_once_like_the_reference():
    # Kernel and reference both compute in fp32 and round once: bf16 outputs agree within one ulp.
    x, bias, _ = _inputs((256, 3072), torch.bfloat16, torch.float32, seed=4)
    ours = bg.bias_gelu(x, bias).float()
    ref = bg.bias_gelu_fwd_ref(x, bias, "none").float()
    excess = ((ours - ref).abs() - (2**-8 * ref.abs() + 1e-6)).max().item()
    assert excess <= 0, f"kernel and reference differ by more than one bf16 ulp (excess {excess:.3e})"


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_bias_gelu_cuda_opcheck(approximate):
    x, bias, dy = _inputs((33, 64), torch.bfloat16, torch.float32, seed=5)
    torch.library.opcheck(
        torch.ops.lub_fast.bias_gelu_fwd.default, (x.requires_grad_(), bias.requires_grad_(), approximate)
    )
    torch.library.opcheck(torch.ops.lub_fast.bias_gelu_bwd.default, (dy, x.detach(), bias.detach(), approximate))


def test_bias_gelu_cuda_compile_fullgraph():
    x, bias, dy = _inputs((97, 3072), torch.bfloat16, torch.bfloat16, seed=6)
    fn = torch.compile(lambda a, b: bg.bias_gelu(a, b), fullgraph=True)
    compiled = _run(fn, x, bias, dy)
    eager = _run(bg.bias_gelu, x, bias, dy)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, atol=0, rtol=0)


def test_bias_gelu_cuda_fp64_falls_back_to_reference():
    x, bias, _ = _inputs((4, 8), torch.float64, torch.float64, seed=7)
    assert not bg.supports(x, bias)
    with pytest.warns(UserWarning, match="no CUDA kernel"):
        y = bg.bias_gelu(x, bias)
    torch.testing.assert_close(y, bg.bias_gelu_fwd_ref(x, bias, "none"), atol=0, rtol=0)
