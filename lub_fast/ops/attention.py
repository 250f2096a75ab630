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
"""

import math
import warnings

import torch
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


# ---- public functions

# Inputs the CUDA kernels (csrc/attention/attention_kernel.cu) handle; others run the reference.
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (32, 64, 128)

_warned_fallback = set()


@torch.compiler.assume_constant_result
def _has_kernel(op_name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lub_fast::{op_name}", key)


def supports(q: Tensor, op_name: str = "varlen_attention_fwd") -> bool:
    """True when a compiled kernel of ``lub_fast::op_name`` handles ``q``: CPU when the CPU kernel is
    built; CUDA when the CUDA kernel is built and ``q`` is fp16/bf16 with head dim 32, 64 or 128."""
    if q.device.type == "cpu":
        return _has_kernel(op_name, "CPU")
    if q.device.type == "cuda":
        return _has_kernel(op_name, "CUDA") and q.dtype in CUDA_DTYPES and q.shape[-1] in CUDA_HEAD_DIMS
    return False


def _cuda_fallback(name: str, q: Tensor, op_name: str) -> bool:
    """True (after one warning per reason) when ``q`` is a CUDA tensor the CUDA kernel does not handle."""
    if q.device.type != "cuda" or supports(q, op_name):
        return False
    reason = (str(q.dtype), q.shape[-1])
    if reason not in _warned_fallback:
        _warned_fallback.add(reason)
        warnings.warn(
            f"lub_fast: {name} has no CUDA kernel for {q.dtype} with head dim {q.shape[-1]} (or the "
            "CUDA extension is not built); running the PyTorch reference",
            stacklevel=3,
        )
    return True


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
    sequences allowed); ``max_seqlen`` is at least the longest length. Returns ``out [T, H, D]`` in
    the input dtype, differentiable w.r.t. ``q, k, v``. ``dropout_p`` drops attention probabilities
    with the counter-based ``keep(seed, offset, b, h, i, j)`` of the module docstring (pass 0.0 in
    eval); ``scale`` defaults to ``D ** -0.5``.
    """
    _check_common("varlen_attention", q, k, v, dropout_p, seed, offset)
    if q.dim() != 3:
        raise ValueError(f"varlen_attention: q, k, v must be [T, H, D]; got {tuple(q.shape)}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"varlen_attention: cu_seqlens must be int32 [B + 1]; got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    fwd = varlen_attention_fwd
    if _cuda_fallback("varlen_attention", q, "varlen_attention_fwd"):
        fwd = varlen_attention_fwd_ref
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
    ``offset`` and ``scale`` as in ``varlen_attention``.
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
    fwd = padded_attention_fwd
    if _cuda_fallback("padded_attention", q, "padded_attention_fwd"):
        fwd = padded_attention_fwd_ref
    out, _ = fwd(q, k, v, key_padding_mask, dropout_p, seed, offset, scale)
    return out
