"""Fused bias add + GELU: ``gelu(x + bias)``, the intermediate activation of BERT's feed-forward block.

GELU is from Hendrycks and Gimpel, "Gaussian Error Linear Units" (arXiv:1606.08415):
``gelu(u) = u * Phi(u) = 0.5 * u * (1 + erf(u / sqrt(2)))`` (``approximate="none"``, what BERT
and HuggingFace's ``"gelu"`` use), or the tanh approximation
``0.5 * u * (1 + tanh(sqrt(2 / pi) * (u + 0.044715 * u**3)))`` (``approximate="tanh"``, HF's
``"gelu_new"``). Fusing the bias add saves one read and one write of the ``[..., N]`` activation.

Ops (namespace ``lub_fast``):

- ``bias_gelu_fwd(x, bias, approximate) -> y``: ``x [..., N]`` floating, ``bias [N]`` floating
  (the dtype of ``x``, or fp32 parameters under autocast); ``y`` has the shape and dtype of ``x``
  and is contiguous.
- ``bias_gelu_bwd(grad_out, x, bias, approximate) -> grad_x``: ``grad_x = grad_out * gelu'(x + bias)``
  in the dtype of ``x``. The bias gradient is ``grad_x`` summed over the leading dims, accumulated
  in fp32 (fp64 for fp64) and cast to the dtype of ``bias``; the autograd formula does that sum in
  Python, so a kernel only has to produce ``grad_x``.

The references compute in fp32 for fp16/bf16 inputs (fp64 stays fp64) and round once at the end.
"""

import math
import warnings

import torch
from torch import Tensor

from lub_fast.ops._kernels import has_kernel

OPS = ("bias_gelu_fwd", "bias_gelu_bwd")

APPROXIMATIONS = ("none", "tanh")

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_COEF = 0.044715


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def bias_gelu_fwd_ref(x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    """Reference of ``lub_fast::bias_gelu_fwd``: ``gelu(x + bias)`` computed in fp32 (fp64 for fp64)."""
    cdtype = _compute_dtype(x.dtype)
    u = x.to(cdtype) + bias.to(cdtype)
    if approximate == "none":
        y = 0.5 * u * (1.0 + torch.erf(u * _SQRT_HALF))
    else:
        y = 0.5 * u * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (u + _TANH_COEF * u**3)))
    return y.to(x.dtype).contiguous()


def bias_gelu_bwd_ref(grad_out: Tensor, x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    """Reference of ``lub_fast::bias_gelu_bwd``: ``grad_out * gelu'(x + bias)`` in the dtype of ``x``.

    ``gelu'(u) = Phi(u) + u * phi(u)`` for ``"none"``; for ``"tanh"`` with
    ``t = tanh(c * (u + a u^3))``: ``0.5 (1 + t) + 0.5 u (1 - t^2) c (1 + 3 a u^2)``.
    """
    cdtype = _compute_dtype(x.dtype)
    u = x.to(cdtype) + bias.to(cdtype)
    if approximate == "none":
        cdf = 0.5 * (1.0 + torch.erf(u * _SQRT_HALF))
        pdf = torch.exp(-0.5 * u * u) * _INV_SQRT_2PI
        dgelu = cdf + u * pdf
    else:
        t = torch.tanh(_SQRT_2_OVER_PI * (u + _TANH_COEF * u**3))
        dgelu = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * _TANH_COEF * u * u
        )
    return (grad_out.to(cdtype) * dgelu).to(x.dtype).contiguous()


@torch.library.custom_op("lub_fast::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    return bias_gelu_fwd_ref(x, bias, approximate)


@bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    return x.new_empty(x.shape)


@torch.library.custom_op("lub_fast::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(grad_out: Tensor, x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    return bias_gelu_bwd_ref(grad_out, x, bias, approximate)


@bias_gelu_bwd.register_fake
def _(grad_out, x, bias, approximate):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    grad_x = bias_gelu_bwd(grad_out, x, bias, ctx.approximate)
    grad_bias = None
    if ctx.needs_input_grad[1]:
        rows = grad_x.reshape(-1, grad_x.shape[-1])
        grad_bias = rows.sum(dim=0, dtype=_compute_dtype(grad_x.dtype)).to(bias.dtype)
    return grad_x, grad_bias, None


bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


# Input dtypes the CUDA kernels (csrc/bias_gelu/bias_gelu_kernel.cu) handle; others run the reference.
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_warned_fallback = set()


def supports(x: Tensor, bias: Tensor) -> bool:
    """True when a compiled ``lub_fast::bias_gelu_fwd`` kernel handles ``x`` and ``bias``: CPU when the
    CPU kernel is built; CUDA when the CUDA kernel is built, ``x`` is fp32/fp16/bf16 and ``bias`` has
    its dtype or fp32."""
    if x.device.type == "cpu":
        return has_kernel("bias_gelu_fwd", "cpu")
    if x.device.type == "cuda":
        return (
            has_kernel("bias_gelu_fwd", "cuda")
            and x.dtype in CUDA_DTYPES
            and bias.dtype in (x.dtype, torch.float32)
        )
    return False


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """``gelu(x + bias)``, differentiable w.r.t. ``x`` and ``bias``.

    ``x [..., N]`` and ``bias [N]`` floating, on one device (``bias`` may be fp32 while ``x`` is
    fp16/bf16, as under autocast); returns ``[..., N]`` in the dtype of ``x``, computed in fp32
    (fp64 for fp64 ``x``). ``approximate`` is ``"none"`` (exact erf, as BERT) or ``"tanh"``.
    """
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"bias_gelu: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if bias.dim() != 1 or x.dim() < 1 or x.shape[-1] != bias.shape[0]:
        raise ValueError(
            f"bias_gelu: bias must be [N] with N = x.shape[-1]; got x {tuple(x.shape)}, "
            f"bias {tuple(bias.shape)}"
        )
    if not (x.dtype.is_floating_point and bias.dtype.is_floating_point):
        raise ValueError(f"bias_gelu: x and bias must be floating; got {x.dtype} and {bias.dtype}")
    if x.device.type == "cuda" and not supports(x, bias):
        reason = (str(x.dtype), str(bias.dtype))
        if reason not in _warned_fallback:
            _warned_fallback.add(reason)
            warnings.warn(
                f"lub_fast: bias_gelu has no CUDA kernel for x {x.dtype}, bias {bias.dtype} (or the "
                "CUDA extension is not built); running the PyTorch reference",
                stacklevel=2,
            )
        return bias_gelu_fwd_ref(x, bias, approximate)
    return bias_gelu_fwd(x, bias, approximate)
