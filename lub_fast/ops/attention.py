"""Non-causal multi-head attention over unpadded (varlen) or padded batches, with counter-based dropout.

The op pairs follow FlashAttention (Dao et al., arXiv:2205.14135 and arXiv:2307.08691): the forward
returns the output and the per-row log-sum-exp of the scaled scores; the backward recomputes the
probabilities from ``q, k, v, out, lse`` instead of storing the ``[S, S]`` matrix. The references
here are the specification that CUDA kernels registered for these schemas must reproduce.

Ops (namespace ``lub_fast``), ``T`` tokens, ``H`` heads, ``D`` head dim, ``B`` sequences:

- ``varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, dropout_p, seed, offset, scale)
  -> (out, lse)``: ``q, k, v [T, H, D]`` hold the tokens of all sequences back to back; sequence
  ``b`` is rows ``cu_seqlens[b] : cu_seqlens[b + 1]`` (``cu_seqlens`` int32 ``[B + 1]``, starts at 0,
  non-decreasing, ends at ``T``; empty sequences allowed), ``max_seqlen >= `` every length. Each
  token attends to all tokens of its own sequence. ``out [T, H, D]`` in the input dtype,
  ``lse [H, T]`` fp32 (fp64 for fp64 inputs).
- ``varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, seed, offset,
  scale) -> (dq, dk, dv)``.
- ``padded_attention_fwd(q, k, v, key_padding_mask, dropout_p, seed, offset, scale) -> (out, lse)``:
  ``q, k, v [B, S, H, D]``, ``key_padding_mask`` bool ``[B, S]`` (True = real token). Queries attend
  to the real keys of their row. The rows of padded queries, and every row of a sequence with no
  real token, are zeros with ``lse = +inf`` (so a recompute gives probabilities ``exp(s - lse) = 0``
  and zero gradients, never NaN). ``out [B, S, H, D]``, ``lse [B, H, S]`` fp32 (fp64 for fp64).
- ``padded_attention_bwd(dout, q, k, v, out, lse, key_padding_mask, dropout_p, seed, offset, scale)
  -> (dq, dk, dv)``.

Math, per sequence ``b`` and head ``h``, with ``i`` the query and ``j`` the key local positions
(position inside the sequence for varlen, column of the padded row for padded; the two agree for
right padding) and ``valid(j)`` true for real keys::

    s[i, j]  = scale * <q_i, k_j>            (scale defaults to D ** -0.5), -inf if not valid(j)
    lse[i]   = log(sum_j exp(s[i, j]))
    p[i, j]  = exp(s[i, j] - lse[i])
    pd[i, j] = p[i, j] * keep(b, h, i, j) / (1 - dropout_p)   (pd = p when dropout_p == 0)
    out_i    = sum_j pd[i, j] v_j

Backward, with ``dpd = dout v^T`` and ``Drow_i = <dout_i, out_i>`` (equal to ``sum_j pd dpd``)::

    dv = pd^T dout,   dp = dpd * keep / (1 - dropout_p),   ds = p * (dp - Drow)
    dq = scale * ds k,   dk = scale * ds^T q

Dropout (the spec a kernel reproduces bit for bit; ``_philox`` has the generator)::

    (c0, c1, c2, c3) = (j >> 2, i, b * H + h, offset)             counter words
    (k0, k1)         = (seed & 0xFFFFFFFF, seed >> 32)             key words
    (w0, w1, w2, w3) = Philox4x32_10(counter, key)                 uint32 outputs
    keep(b, h, i, j) = w[j & 3] < floor((1 - dropout_p) * 2**32)  (threshold in IEEE double)

so one Philox call serves four consecutive keys. ``0 <= dropout_p < 1``, ``0 <= seed < 2**63``,
``0 <= offset < 2**32``; callers give each attention call of a step its own ``offset`` (e.g.
``step * num_layers + layer``), or their own seed. The mask depends only on ``(seed, offset, b, h,
i, j)`` and ``H``, so padded and varlen layouts of the same sequences drop the same probabilities.

The references compute in fp32 for fp16/bf16 inputs (fp64 stays fp64) and materialise the
``[B, H, S, S]`` scores, with varlen padded to ``max_seqlen``.

Routing: ``varlen_attention`` and ``padded_attention`` run what ``attention_route`` picks (one pure
function; ``python -m lub_fast.info`` prints it per device and dtype): the lub_fast kernel where it
takes the input, else on CUDA PyTorch's own variable-length flash attention (fp16/bf16) or SDPA
(fp32, TF32 where enabled), the materialising reference only for fp64 and on a CPU without the
kernel. The PyTorch fallbacks draw their own dropout masks (``DROPOUT_EXACT``).
"""

import math
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lub_fast.ops._philox import keep_threshold, philox4x32_10

OPS = ("varlen_attention_fwd", "varlen_attention_bwd", "padded_attention_fwd", "padded_attention_bwd")


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep_mask(
    seed: int, offset: int, batch: int, heads: int, seqlen: int, dropout_p: float, device
) -> Tensor:
    """bool ``[batch, heads, seqlen, seqlen]``: ``keep(b, h, i, j)`` of the module docstring."""
    groups = (seqlen + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64, device=device).view(1, 1, 1, groups)
    c1 = torch.arange(seqlen, dtype=torch.int64, device=device).view(1, 1, seqlen, 1)
    c2 = torch.arange(batch * heads, dtype=torch.int64, device=device).view(batch, heads, 1, 1)
    c3 = torch.full((1, 1, 1, 1), offset, dtype=torch.int64, device=device)
    words = philox4x32_10(c0, c1, c2, c3, seed)
    r = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # [B, H, S, groups, 4]: key j = 4 g + w
    r = r.view(batch, heads, seqlen, groups * 4)[..., :seqlen]
    return r < keep_threshold(dropout_p)


def _heads_first(x, cdtype):
    """``[B, S, H, D]`` -> ``[B, H, S, D]`` in the compute dtype."""
    return x.to(cdtype).transpose(1, 2)


def _scores(q, k, key_padding_mask, scale):
    """``[B, H, S, S]`` scaled scores with -inf at padded keys, from ``[B, H, S, D]`` q and k."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return s.masked_fill(~key_padding_mask[:, None, None, :], -math.inf)


def _empty_rows(key_padding_mask):
    """bool ``[B, 1, S]``: rows whose output is defined as zero (padded query or no real key)."""
    return ~(key_padding_mask & key_padding_mask.any(dim=1, keepdim=True))[:, None, :]


def _dropped(x, keep, dropout_p):
    """``x * keep / (1 - dropout_p)``; ``x`` itself when ``dropout_p == 0``."""
    if keep is None:
        return x
    return torch.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)


def _keep(q, dropout_p, seed, offset):
    if dropout_p == 0.0:
        return None
    batch, seqlen, heads, _ = q.shape
    return dropout_keep_mask(seed, offset, batch, heads, seqlen, dropout_p, q.device)


def padded_attention_fwd_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Reference of ``lub_fast::padded_attention_fwd`` (see the module docstring)."""
    cdtype = _compute_dtype(q.dtype)
    s = _scores(_heads_first(q, cdtype), _heads_first(k, cdtype), key_padding_mask, scale)
    lse = torch.logsumexp(s, dim=-1).masked_fill(_empty_rows(key_padding_mask), math.inf)
    p = torch.exp(s - lse[..., None])
    pd = _dropped(p, _keep(q, dropout_p, seed, offset), dropout_p)
    out = torch.matmul(pd, _heads_first(v, cdtype))  # [B, H, S, D]
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse


def padded_attention_bwd_ref(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of ``lub_fast::padded_attention_bwd``: recomputes ``p`` from ``lse``."""
    cdtype = _compute_dtype(q.dtype)
    qf, kf, vf, dof, of = (_heads_first(t, cdtype) for t in (q, k, v, dout, out))
    s = _scores(qf, kf, key_padding_mask, scale)
    p = torch.exp(s - lse.to(cdtype)[..., None])
    keep = _keep(q, dropout_p, seed, offset)
    dv = torch.matmul(_dropped(p, keep, dropout_p).transpose(-1, -2), dof)
    dp = _dropped(torch.matmul(dof, vf.transpose(-1, -2)), keep, dropout_p)
    drow = (dof * of).sum(dim=-1, keepdim=True)
    ds = p * (dp - drow)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return tuple(g.transpose(1, 2).to(q.dtype).contiguous() for g in (dq, dk, dv))


def _varlen_layout(cu_seqlens: Tensor, max_seqlen: int, total: int):
    """(sequence index [T], local position [T], key_padding_mask [B, max_seqlen]) of varlen tokens."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    if cu[0].item() != 0 or cu[-1].item() != total or bool((lengths < 0).any()):
        raise ValueError(
            f"varlen attention: cu_seqlens must start at 0, be non-decreasing and end at T={total}; "
            f"got {cu_seqlens.tolist()}"
        )
    longest = int(lengths.max().item()) if lengths.numel() else 0
    if longest > max_seqlen:
        raise ValueError(f"varlen attention: max_seqlen={max_seqlen} < longest sequence {longest}")
    tokens = torch.arange(total, dtype=torch.int64, device=cu.device)
    seq = torch.searchsorted(cu[1:], tokens, right=True)
    pos = tokens - cu[seq]
    mask = torch.arange(max_seqlen, device=cu.device)[None, :] < lengths[:, None]
    return seq, pos, mask


def _pad(x: Tensor, seq: Tensor, pos: Tensor, batch: int, seqlen: int) -> Tensor:
    """``[T, ...] -> [B, S, ...]`` with zeros at padding."""
    padded = x.new_zeros((batch, seqlen) + tuple(x.shape[1:]))
    padded[seq, pos] = x
    return padded


def varlen_attention_fwd_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Reference of ``lub_fast::varlen_attention_fwd``: pads to ``max_seqlen``, runs the padded one."""
    batch = cu_seqlens.numel() - 1
    seq, pos, mask = _varlen_layout(cu_seqlens, max_seqlen, q.shape[0])
    qp, kp, vp = (_pad(t, seq, pos, batch, max_seqlen) for t in (q, k, v))
    out, lse = padded_attention_fwd_ref(qp, kp, vp, mask, dropout_p, seed, offset, scale)
    return out[seq, pos], lse[seq, :, pos].transpose(0, 1).contiguous()


def varlen_attention_bwd_ref(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of ``lub_fast::varlen_attention_bwd``: pads to ``max_seqlen``, runs the padded one."""
    batch = cu_seqlens.numel() - 1
    seq, pos, mask = _varlen_layout(cu_seqlens, max_seqlen, q.shape[0])
    padded = [_pad(t, seq, pos, batch, max_seqlen) for t in (dout, q, k, v, out)]
    lse_p = lse.new_full((batch, max_seqlen, lse.shape[0]), math.inf)
    lse_p[seq, pos] = lse.transpose(0, 1)
    grads = padded_attention_bwd_ref(
        *padded, lse_p.transpose(1, 2), mask, dropout_p, seed, offset, scale
    )
    return tuple(g[seq, pos] for g in grads)


# ---- custom ops: default kernels are the references; compiled kernels register per dispatch key.


@torch.library.custom_op("lub_fast::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    return varlen_attention_fwd_ref(q, k, v, cu_seqlens, max_seqlen, dropout_p, seed, offset, scale)


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, dropout_p, seed, offset, scale):
    total, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads, total), dtype=_compute_dtype(q.dtype))


@torch.library.custom_op("lub_fast::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return varlen_attention_bwd_ref(
        dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, seed, offset, scale
    )


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, dropout_p, seed, offset, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, dropout_p, seed, offset, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, cu_seqlens, out, lse)
    ctx.args = (max_seqlen, dropout_p, seed, offset, scale)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
    dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


varlen_attention_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


@torch.library.custom_op("lub_fast::padded_attention_fwd", mutates_args=())
def padded_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    return padded_attention_fwd_ref(q, k, v, key_padding_mask, dropout_p, seed, offset, scale)


@padded_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, dropout_p, seed, offset, scale):
    batch, seqlen, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seqlen), dtype=_compute_dtype(q.dtype))


@torch.library.custom_op("lub_fast::padded_attention_bwd", mutates_args=())
def padded_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return padded_attention_bwd_ref(
        dout, q, k, v, out, lse, key_padding_mask, dropout_p, seed, offset, scale
    )


@padded_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, dropout_p, seed, offset, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _padded_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, dropout_p, seed, offset, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.args = (dropout_p, seed, offset, scale)


def _padded_backward(ctx, dout, _dlse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = padded_attention_bwd(dout, q, k, v, out, lse, key_padding_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


padded_attention_fwd.register_autograd(_padded_backward, setup_context=_padded_setup_context)


# ---- routing: which implementation runs an attention call

ROUTES = ("lub_fast", "torch_varlen", "sdpa", "reference")

# Inputs the CUDA kernels (csrc/attention/attention_kernel.cu) handle.
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (32, 64, 128)
# PyTorch's flash attention (aten::_flash_attention_forward): fp16/bf16, head dim a multiple of 8 up
# to 256, compute capability 8.0 or newer.
TORCH_FLASH_MAX_HEAD_DIM = 256

# Whether a route's dropout is the counter-based keep(seed, offset, b, h, i, j) of the module
# docstring (bit for bit); the others draw their own masks from torch's CUDA generator, with the
# same keep rate but not the same mask, so a run through them is reproducible only through torch's
# RNG state, and the CPU and GPU runs of one seed drop different probabilities.
DROPOUT_EXACT = {"lub_fast": True, "reference": True, "torch_varlen": False, "sdpa": False}


@dataclass(frozen=True)
class Built:
    """What can run attention on one device: the lub_fast kernel for the device's dispatch key, and
    PyTorch's own flash attention (built into torch and supported by the device)."""

    lub_fast: bool
    torch_flash: bool


def attention_route(device_type: str, dtype: torch.dtype, head_dim: int, built: Built, layout: str = "varlen") -> str:
    """The implementation that runs attention on ``(device_type, dtype, head_dim)`` given ``built``.

    - ``lub_fast``: the compiled lub_fast kernel: on CPU whenever it is built (every dtype); on CUDA
      for fp16/bf16 with head dim 32, 64 or 128.
    - ``torch_varlen`` (``layout="varlen"`` only): PyTorch's variable-length flash attention
      (``aten::_flash_attention_forward``, under ``torch.nn.attention.varlen.varlen_attn``) for CUDA
      fp16/bf16 the lub_fast kernel does not take, head dim a multiple of 8 up to 256.
    - ``sdpa``: ``F.scaled_dot_product_attention`` over a padded ``[B, H, S, D]`` view with a
      key-padding mask (its memory-efficient kernel on CUDA, fp32 with TF32 where enabled): CUDA fp32
      and every other CUDA (or other accelerator) case the two above do not take.
    - ``reference``: the materialising PyTorch reference: CPU without the kernel, and fp64 anywhere.

    Dropout does not change the route (every implementation supports it); ``DROPOUT_EXACT`` says
    which routes reproduce the counter-based mask. Pure: tests pass ``built`` for any machine.
    """
    if dtype == torch.float64:
        return "lub_fast" if device_type == "cpu" and built.lub_fast else "reference"
    if device_type == "cpu":
        return "lub_fast" if built.lub_fast else "reference"
    if device_type == "cuda" and dtype in CUDA_DTYPES:
        if built.lub_fast and head_dim in CUDA_HEAD_DIMS:
            return "lub_fast"
        if layout == "varlen" and built.torch_flash and head_dim % 8 == 0 and head_dim <= TORCH_FLASH_MAX_HEAD_DIM:
            return "torch_varlen"
    return "sdpa"


@torch.compiler.assume_constant_result
def _has_kernel(op_name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lub_fast::{op_name}", key)


@torch.compiler.assume_constant_result
def _torch_flash_available(device_index: int) -> bool:
    """PyTorch's flash attention is built and CUDA device ``device_index`` is sm80 or newer."""
    capability = torch.cuda.get_device_capability(device_index)
    return torch.backends.cuda.is_flash_attention_available() and capability >= (8, 0)


def built_on(device: torch.device, op_name: str = "varlen_attention_fwd") -> Built:
    """``Built`` for ``device`` (with its index, as a tensor's device has) as this process has it."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return Built(
        lub_fast=key is not None and _has_kernel(op_name, key),
        torch_flash=device.type == "cuda" and _torch_flash_available(device.index),
    )


def route_of(q: Tensor, op_name: str = "varlen_attention_fwd") -> str:
    """``attention_route`` for the tensor ``q`` (``[T, H, D]`` varlen, ``[B, S, H, D]`` padded)."""
    layout = "varlen" if op_name.startswith("varlen") else "padded"
    return attention_route(q.device.type, q.dtype, q.shape[-1], built_on(q.device, op_name), layout)


def supports(q: Tensor, op_name: str = "varlen_attention_fwd") -> bool:
    """True when the compiled lub_fast kernel of ``lub_fast::op_name`` runs ``q`` (route ``lub_fast``)."""
    return route_of(q, op_name) == "lub_fast"


_warned_fallback = set()


def _warn_fallback(name: str, q: Tensor, route: str) -> None:
    """One warning per (route, dtype, head dim) for a CUDA tensor the lub_fast kernel does not run."""
    reason = (route, str(q.dtype), q.shape[-1])
    if q.device.type != "cuda" or reason in _warned_fallback:
        return
    _warned_fallback.add(reason)
    dropout = "" if DROPOUT_EXACT[route] else "; its dropout masks are torch's own, not lub_fast's counter-based ones"
    warnings.warn(
        f"lub_fast: {name} has no lub_fast CUDA kernel for {q.dtype} with head dim {q.shape[-1]} (or the CUDA "
        f"extension is not built); running route '{route}'{dropout}",
        stacklevel=3,
    )


# ---- fallbacks: the same function through PyTorch's kernels (dropout masks are torch's own)


def _varlen_index(cu_seqlens: Tensor, max_seqlen: int, total: int):
    """(flat padded position [T] = b * max_seqlen + local position, key_padding_mask [B, max_seqlen])
    of the varlen tokens, with no device-to-host copy."""
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(total, dtype=torch.int64, device=cu.device)
    seq = torch.searchsorted(cu[1:], tokens, right=True)
    flat = seq * max_seqlen + (tokens - cu[seq])
    mask = torch.arange(max_seqlen, device=cu.device)[None, :] < (cu[1:] - cu[:-1])[:, None]
    return flat, mask


def _sdpa_padded(q, k, v, key_padding_mask, dropout_p, scale):
    """SDPA over ``[B, S, H, D]`` with a key-padding mask -> ``[B, S, H, D]`` (padded rows arbitrary).
    A batch row without real keys gets key 0 opened, so its (unused) rows stay finite."""
    open_keys = key_padding_mask.clone()
    open_keys[:, 0] |= ~key_padding_mask.any(dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=open_keys[:, None, None, :], dropout_p=dropout_p, scale=scale,
    )
    return out.transpose(1, 2)


def varlen_attention_sdpa(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float, scale: float
) -> Tensor:
    """``varlen_attention`` through ``F.scaled_dot_product_attention``: packs the tokens into a zero-padded
    ``[B, max_seqlen, H, D]`` batch (one scatter, no host sync), runs SDPA with the key-padding mask (on
    CUDA its memory-efficient kernel: no ``[S, S]`` scores in memory) and gathers the real rows back.
    Differentiable. Dropout: torch's own masks (``DROPOUT_EXACT``), not the counter-based ones."""
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    flat, mask = _varlen_index(cu_seqlens, max_seqlen, total)

    def pad(x):
        return x.new_zeros(batch * max_seqlen, heads, head_dim).index_copy(0, flat, x).view(
            batch, max_seqlen, heads, head_dim
        )

    out = _sdpa_padded(pad(q), pad(k), pad(v), mask, dropout_p, scale)
    return out.reshape(batch * max_seqlen, heads, head_dim).index_select(0, flat)


def padded_attention_sdpa(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, dropout_p: float, scale: float
) -> Tensor:
    """``padded_attention`` through ``F.scaled_dot_product_attention``; padded query rows (and rows of a
    sequence without real tokens) are zeros. Dropout: torch's own masks (``DROPOUT_EXACT``)."""
    out = _sdpa_padded(q, k, v, key_padding_mask, dropout_p, scale)
    real = key_padding_mask & key_padding_mask.any(dim=1, keepdim=True)
    return torch.where(real[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


class _TorchVarlen(torch.autograd.Function):
    """PyTorch's variable-length flash attention (the aten ops under
    ``torch.nn.attention.varlen.varlen_attn``), called directly so that dropout works too: forward
    ``aten::_flash_attention_forward``, backward ``aten::_flash_attention_backward`` with the
    forward's RNG state. Positional arguments and ``scale=`` only, which torch 2.11 and 2.13 share."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, dropout_p, scale):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, cu_seqlens, out, lse, rng_state, unused)
        ctx.args = (max_seqlen, dropout_p, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cu_seqlens, out, lse, rng_state, unused = ctx.saved_tensors
        max_seqlen, dropout_p, scale = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
            False, rng_state, unused, scale=scale,
        )
        return dq, dk, dv, None, None, None, None


def varlen_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float, scale: float
) -> Tensor:
    """``varlen_attention`` through PyTorch's flash attention (CUDA fp16/bf16, sm80+, head dim a multiple
    of 8 up to 256): unpadded, no copies of views whose last dim is contiguous. Differentiable.
    Dropout: torch's own Philox masks (``DROPOUT_EXACT``), not the counter-based ones."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _TorchVarlen.apply(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)


# ---- public functions


def _check_common(name, q, k, v, dropout_p, seed, offset):
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"{name}: q, k, v must have the same shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(
            f"{name}: q, k, v must share a floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1); got {dropout_p}")
    if seed < 0:
        raise ValueError(f"{name}: seed must be in [0, 2**63); got {seed}")
    if not 0 <= offset < 2**32:
        raise ValueError(f"{name}: offset must be in [0, 2**32); got {offset}")


# The last cu_seqlens checked: (weak reference, its version counter, T, max_seqlen).
_checked_cu_seqlens = [None]


def _cu_seqlens_error(cu_seqlens: Tensor, max_seqlen: int, total: int) -> str | None:
    """The rule ``cu_seqlens`` breaks, or None: one reduction and one bool copied to the host."""
    if max_seqlen < 0:
        return f"varlen attention: max_seqlen must be >= 0; got {max_seqlen}"
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    bad = (cu_seqlens[0] != 0) | (cu_seqlens[-1] != total)
    if lengths.numel():
        bad = bad | (lengths < 0).any() | (lengths > max_seqlen).any()
    if not bool(bad):
        return None
    cu = cu_seqlens.cpu().to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    if cu[0] != 0 or cu[-1] != total or bool((lengths < 0).any()):
        return (
            f"varlen attention: cu_seqlens must start at 0, be non-decreasing and end at T={total}; "
            f"got {cu.tolist()}"
        )
    return f"varlen attention: max_seqlen={max_seqlen} < longest sequence {int(lengths.max())}"


def check_cu_seqlens(cu_seqlens: Tensor, max_seqlen: int, total: int) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` starts at 0, is non-decreasing, ends at ``total`` and
    no length exceeds ``max_seqlen`` (the reference's rules), on any device.

    Cost: one reduction and one device-to-host copy of a bool (a stream sync on CUDA). The encoder
    passes one ``cu_seqlens`` tensor to every layer, so the check runs once per forward: a tensor
    already checked with the same ``total`` and ``max_seqlen`` and unchanged since (its version
    counter) is not checked again. Under ``torch.compile`` ``varlen_attention`` runs the same check
    inside the opaque op ``lub_fast::checked_cu_seqlens`` instead (there one sync per attention call).
    """
    last = _checked_cu_seqlens[0]
    if last is not None and last[0]() is cu_seqlens and last[1:] == (cu_seqlens._version, total, max_seqlen):
        return
    error = _cu_seqlens_error(cu_seqlens, max_seqlen, total)
    if error is not None:
        raise ValueError(error)
    _checked_cu_seqlens[0] = (weakref.ref(cu_seqlens), cu_seqlens._version, total, max_seqlen)


@torch.library.custom_op("lub_fast::checked_cu_seqlens", mutates_args=())
def checked_cu_seqlens(cu_seqlens: Tensor, max_seqlen: int, total: int) -> Tensor:
    """A copy of ``cu_seqlens`` after ``check_cu_seqlens``: the check as a graph node that
    ``torch.compile`` keeps (its output feeds the attention op) and cannot trace into (host sync)."""
    error = _cu_seqlens_error(cu_seqlens, max_seqlen, total)
    if error is not None:
        raise ValueError(error)
    return cu_seqlens.clone()


@checked_cu_seqlens.register_fake
def _(cu_seqlens, max_seqlen, total):
    return torch.empty_like(cu_seqlens)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    scale: float | None = None,
) -> Tensor:
    """Non-causal attention of each token over the tokens of its own sequence, unpadded.

    ``q, k, v [T, H, D]`` (one floating dtype) are the tokens of all sequences concatenated;
    ``cu_seqlens`` int32 ``[B + 1]`` gives the sequence boundaries (0, ..., T; non-decreasing, empty
    sequences allowed; ``check_cu_seqlens`` raises ``ValueError`` otherwise, on every device);
    ``max_seqlen`` is at least the longest length. Returns ``out [T, H, D]`` in the input dtype,
    differentiable w.r.t. ``q, k, v``. ``dropout_p`` drops attention probabilities with the
    counter-based ``keep(seed, offset, b, h, i, j)`` of the module docstring (pass 0.0 in eval) on the
    ``lub_fast`` and ``reference`` routes, with torch's own masks on the others (``attention_route``,
    ``DROPOUT_EXACT``); ``scale`` defaults to ``D ** -0.5``.
    """
    _check_common("varlen_attention", q, k, v, dropout_p, seed, offset)
    if q.dim() != 3:
        raise ValueError(f"varlen_attention: q, k, v must be [T, H, D]; got {tuple(q.shape)}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"varlen_attention: cu_seqlens must be int32 [B + 1]; got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"varlen_attention: cu_seqlens must be on {q.device} like q; got {cu_seqlens.device}")
    if torch.compiler.is_compiling():
        cu_seqlens = checked_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
    else:
        check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    route = route_of(q, "varlen_attention_fwd")
    if route != "lub_fast":
        _warn_fallback("varlen_attention", q, route)
    if route == "torch_varlen":
        return varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)
    if route == "sdpa":
        return varlen_attention_sdpa(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)
    # The op runs the CPU kernel or, where no kernel is registered for the device, the reference; a
    # CUDA tensor the registered CUDA kernel rejects (fp64) calls the reference directly.
    fwd = varlen_attention_fwd_ref if route == "reference" and q.device.type == "cuda" else varlen_attention_fwd
    out, _ = fwd(q, k, v, cu_seqlens, max_seqlen, dropout_p, seed, offset, scale)
    return out


def padded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    scale: float | None = None,
) -> Tensor:
    """Non-causal attention over a padded batch.

    ``q, k, v [B, S, H, D]`` (one floating dtype), ``key_padding_mask`` bool ``[B, S]`` with True at
    real tokens. Returns ``out [B, S, H, D]`` in the input dtype, differentiable w.r.t. ``q, k, v``:
    real queries attend to the real keys of their row; rows of padded queries (and all rows of a
    sequence without real tokens) are zeros with zero gradients. With right padding the result and
    the dropout mask equal ``varlen_attention`` on the real tokens. ``dropout_p``, ``seed``,
    ``offset`` and ``scale`` as in ``varlen_attention`` (routes: ``lub_fast``, ``sdpa``, ``reference``).
    """
    _check_common("padded_attention", q, k, v, dropout_p, seed, offset)
    if q.dim() != 4:
        raise ValueError(f"padded_attention: q, k, v must be [B, S, H, D]; got {tuple(q.shape)}")
    if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != q.shape[:2]:
        raise ValueError(
            f"padded_attention: key_padding_mask must be bool [B, S] = {tuple(q.shape[:2])}; got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    route = route_of(q, "padded_attention_fwd")
    if route != "lub_fast":
        _warn_fallback("padded_attention", q, route)
    if route == "sdpa":
        return padded_attention_sdpa(q, k, v, key_padding_mask, dropout_p, scale)
    fwd = padded_attention_fwd_ref if route == "reference" and q.device.type == "cuda" else padded_attention_fwd
    out, _ = fwd(q, k, v, key_padding_mask, dropout_p, seed, offset, scale)
    return out
