"""Non-causal multi-head attention over unpadded (varlen) batches, with counter-based dropout.

The op pair follows FlashAttention (Dao et al., arXiv:2205.14135 and arXiv:2307.08691) and its
``flash_attn_varlen_func``: queries and keys have their own layouts (``cu_seqlens_q``, ``cu_seqlens_k``),
so self-attention passes one layout twice and the encoder's sparse last layer (queries at the masked
positions only, keys over the whole sequence) runs through the same op. The forward returns the
output and the per-row log-sum-exp of the scaled scores; the backward recomputes the probabilities
from ``q, k, v, out, lse`` instead of storing the ``[Sq, Sk]`` matrix. The references here are the
specification that the CPU and CUDA kernels registered for these schemas reproduce.

Ops (namespace ``lub_fast``), ``Tq`` / ``Tk`` query / key tokens, ``H`` heads, ``D`` head dim,
``B`` sequences:

- ``varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
  seed, offset, scale, q_positions) -> (out, lse)``: ``q [Tq, H, D]`` and ``k, v [Tk, H, D]`` hold the
  tokens of all sequences back to back; the queries of sequence ``b`` are rows
  ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` of ``q``, its keys rows ``cu_seqlens_k[b] : cu_seqlens_k[b + 1]``
  of ``k`` and ``v`` (each ``cu_seqlens`` int32 ``[B + 1]``, starts at 0, non-decreasing, ends at
  ``Tq`` / ``Tk``; empty sequences allowed), ``max_seqlen_q`` / ``max_seqlen_k >=`` every length. Each
  query attends to all keys of its own sequence. ``q_positions`` (int32 ``[Tq]`` or None) is the
  dropout row of each query (below). ``out [Tq, H, D]`` in the input dtype, ``lse [H, Tq]`` fp32
  (fp64 for fp64 inputs). A query whose sequence has no key gets zeros and ``lse = +inf`` (so a
  recompute gives probabilities ``exp(s - lse) = 0`` and zero gradients, never NaN).
- ``varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, dropout_p, seed, offset, scale, q_positions, deterministic=False) -> (dq, dk, dv)``.
  ``deterministic`` asks for gradients that are bit-identical across runs (Reproducibility, below);
  the autograd backward passes ``torch.are_deterministic_algorithms_enabled()``.

Math, per sequence ``b`` and head ``h``, with ``i`` the query and ``j`` the key local positions
(position inside the query / key sequence)::

    s[i, j]  = scale * <q_i, k_j>            (scale defaults to D ** -0.5)
    lse[i]   = log(sum_j exp(s[i, j]))
    p[i, j]  = exp(s[i, j] - lse[i])
    pd[i, j] = p[i, j] * keep(b, h, row(i), j) / (1 - dropout_p)   (pd = p when dropout_p == 0)
    out_i    = sum_j pd[i, j] v_j

Backward, with ``dpd = dout v^T`` and ``Drow_i = <dout_i, out_i>`` (equal to ``sum_j pd dpd``)::

    dv = pd^T dout,   dp = dpd * keep / (1 - dropout_p),   ds = p * (dp - Drow)
    dq = scale * ds k,   dk = scale * ds^T q

Dropout (the spec a kernel reproduces bit for bit; ``_philox`` has the generator)::

    (c0, c1, c2, c3) = (j >> 2, row(i), b * H + h, offset)         counter words
    (k0, k1)         = (seed & 0xFFFFFFFF, seed >> 32)             key words
    (w0, w1, w2, w3) = Philox4x32_10(counter, key)                 uint32 outputs
    keep(b, h, r, j) = w[j & 3] < floor((1 - dropout_p) * 2**32)  (threshold in IEEE double)

so one Philox call serves four consecutive keys. ``row(i)`` is ``q_positions[cu_seqlens_q[b] + i]``, or
``i`` when ``q_positions`` is None: self-attention leaves it None (row = the query's position), and a
layout that keeps only some queries of a sequence passes their positions in the full sequence, so
each kept query draws exactly the mask it has in full self-attention. ``0 <= dropout_p < 1``,
``0 <= seed < 2**63``, ``0 <= offset < 2**32``, ``0 <= q_positions < 2**31``; callers give each
attention call of a step its own ``offset`` (e.g. ``step * num_layers + layer``), or their own seed.
The mask depends only on ``(seed, offset, b, h, row, j)`` and ``H``.

The references compute in fp32 for fp16/bf16 inputs (fp64 stays fp64) and materialise the
``[B, H, max_seqlen_q, max_seqlen_k]`` scores of the batch padded to the longest lengths.

Routing: ``varlen_attention`` runs what ``attention_route`` picks (one pure function; ``python -m
lub_fast.info`` prints it per device and dtype): the lub_fast kernel where it takes the input, else
on CUDA PyTorch's own variable-length flash attention (fp16/bf16) or SDPA (fp32, TF32 where
enabled), the materialising reference only for fp64 and on a CPU without the kernel. The PyTorch
fallbacks draw their own dropout masks (``DROPOUT_EXACT``).

Reproducibility of the backward (``backward_route``; ``info`` prints it): the CPU kernel is
deterministic whatever ``deterministic`` says (one thread per (sequence, head) task, query blocks
summed in order, no atomics: bit-identical across runs and thread counts), and so is the reference.
The CUDA kernel by default adds dq over key tiles with fp32 atomics, whose order varies between runs
(dq differs in the last bits; dk, dv do not); with ``deterministic=True`` it computes dk, dv per key
tile and dq in a second pass per query tile that walks the key tiles in order (no atomics,
bit-identical across runs on one GPU and build), at about 1.4x the backward's matrix FLOPs.

(Over 500 lines because the op is one contract: its schema, the reference forward and backward
with their counter-based dropout, fake and autograd registration, input checks and the routing to
kernels and fallbacks must agree line for line, and a reader checks them side by side here.)
"""

import math
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lub_fast.ops._kernels import has_kernel
from lub_fast.ops._philox import keep_threshold, philox4x32_10

OPS = ("varlen_attention_fwd", "varlen_attention_bwd")


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep_mask(
    seed: int,
    offset: int,
    batch: int,
    heads: int,
    seqlen: int,
    dropout_p: float,
    device,
    rows: Tensor | None = None,
) -> Tensor:
    """bool ``[batch, heads, S, seqlen]``: ``keep(b, h, rows[b, i], j)`` of the module docstring for
    keys ``j < seqlen``; ``rows`` int64 ``[batch, S]`` (default: ``i`` for ``i < seqlen``)."""
    if rows is None:
        rows = torch.arange(seqlen, dtype=torch.int64, device=device).expand(batch, seqlen)
    groups = (seqlen + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64, device=device).view(1, 1, 1, groups)
    c1 = rows.to(device=device, dtype=torch.int64)[:, None, :, None]
    c2 = torch.arange(batch * heads, dtype=torch.int64, device=device).view(batch, heads, 1, 1)
    c3 = torch.full((1, 1, 1, 1), offset, dtype=torch.int64, device=device)
    words = philox4x32_10(c0, c1, c2, c3, seed)
    r = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # [B, H, S, groups, 4]: key j = 4 g + w
    r = r.view(batch, heads, rows.shape[1], groups * 4)[..., :seqlen]
    return r < keep_threshold(dropout_p)


def _heads_first(x, cdtype):
    """``[B, S, H, D]`` -> ``[B, H, S, D]`` in the compute dtype."""
    return x.to(cdtype).transpose(1, 2)


def _scores(q, k, key_mask, scale):
    """``[B, H, Sq, Sk]`` scaled scores with -inf at padded keys, from ``[B, H, S, D]`` q and k."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return s.masked_fill(~key_mask[:, None, None, :], -math.inf)


def _dropped(x, keep, dropout_p):
    """``x * keep / (1 - dropout_p)``; ``x`` itself when ``dropout_p == 0``."""
    if keep is None:
        return x
    return torch.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)


class _Padded:
    """A varlen batch padded to ``[B, max_seqlen_q]`` queries and ``[B, max_seqlen_k]`` keys: the
    references' layout. Raises ``ValueError`` on a ``cu_seqlens`` that breaks the rules."""

    def __init__(self, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q, total_k, q_positions):
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(
                f"varlen attention: cu_seqlens_q and cu_seqlens_k must have B + 1 entries each; got "
                f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
            )
        self.batch = cu_seqlens_q.numel() - 1
        self.seq_q, self.pos_q, self.mask_q = _varlen_layout(cu_seqlens_q, max_seqlen_q, total_q, "q")
        self.seq_k, self.pos_k, self.mask_k = _varlen_layout(cu_seqlens_k, max_seqlen_k, total_k, "k")
        self.max_q, self.max_k = max_seqlen_q, max_seqlen_k
        if q_positions is not None and q_positions.numel() and int(q_positions.min()) < 0:
            raise ValueError(f"varlen attention: q_positions must be >= 0; got {int(q_positions.min())}")
        rows = self.pos_q if q_positions is None else q_positions.to(torch.int64)
        self.rows = self.pad_q(rows)

    def pad_q(self, x):
        return _pad(x, self.seq_q, self.pos_q, self.batch, self.max_q)

    def pad_k(self, x):
        return _pad(x, self.seq_k, self.pos_k, self.batch, self.max_k)

    def keep(self, heads, dropout_p, seed, offset, device):
        if dropout_p == 0.0:
            return None
        return dropout_keep_mask(seed, offset, self.batch, heads, self.max_k, dropout_p, device, self.rows)

    def scores(self, q, k, scale):
        """(scores ``[B, H, Sq, Sk]``, bool ``[B, 1, 1]``: sequences without keys)."""
        return _scores(q, k, self.mask_k, scale), ~self.mask_k.any(dim=1)[:, None, None]


def _varlen_layout(cu_seqlens: Tensor, max_seqlen: int, total: int, side: str):
    """(sequence index [T], local position [T], mask [B, max_seqlen]) of varlen tokens."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    if cu[0].item() != 0 or cu[-1].item() != total or bool((lengths < 0).any()):
        raise ValueError(
            f"varlen attention: cu_seqlens_{side} must start at 0, be non-decreasing and end at "
            f"T{side}={total}; got {cu_seqlens.tolist()}"
        )
    longest = int(lengths.max().item()) if lengths.numel() else 0
    if longest > max_seqlen:
        raise ValueError(f"varlen attention: max_seqlen_{side}={max_seqlen} < longest sequence {longest}")
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
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
    q_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference of ``lub_fast::varlen_attention_fwd`` (the module docstring): pads to the longest
    lengths and materialises the scores."""
    lay = _Padded(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0], k.shape[0], q_positions)
    cdtype = _compute_dtype(q.dtype)
    qf = _heads_first(lay.pad_q(q), cdtype)
    kf, vf = (_heads_first(lay.pad_k(t), cdtype) for t in (k, v))
    s, keyless = lay.scores(qf, kf, scale)
    lse = torch.logsumexp(s, dim=-1).masked_fill(keyless, math.inf)  # [B, H, Sq]
    p = torch.exp(s - lse[..., None])
    pd = _dropped(p, lay.keep(q.shape[1], dropout_p, seed, offset, q.device), dropout_p)
    out = torch.matmul(pd, vf).transpose(1, 2)  # [B, Sq, H, D]
    out = out[lay.seq_q, lay.pos_q].to(q.dtype)
    return out, lse[lay.seq_q, :, lay.pos_q].transpose(0, 1).contiguous()


def varlen_attention_bwd_ref(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
    q_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of ``lub_fast::varlen_attention_bwd``: recomputes ``p`` from ``lse``."""
    lay = _Padded(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0], k.shape[0], q_positions)
    cdtype = _compute_dtype(q.dtype)
    qf, dof, of = (_heads_first(lay.pad_q(t), cdtype) for t in (q, dout, out))
    kf, vf = (_heads_first(lay.pad_k(t), cdtype) for t in (k, v))
    lse_p = lay.pad_q(lse.transpose(0, 1).to(cdtype)).masked_fill(~lay.mask_q[..., None], math.inf)
    s, _ = lay.scores(qf, kf, scale)
    p = torch.exp(s - lse_p.transpose(1, 2)[..., None])  # 0 at padded queries (lse = +inf)
    keep = lay.keep(q.shape[1], dropout_p, seed, offset, q.device)
    dv = torch.matmul(_dropped(p, keep, dropout_p).transpose(-1, -2), dof)
    dp = _dropped(torch.matmul(dof, vf.transpose(-1, -2)), keep, dropout_p)
    drow = (dof * of).sum(dim=-1, keepdim=True)
    ds = p * (dp - drow)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    dq = dq.transpose(1, 2)[lay.seq_q, lay.pos_q]
    dk, dv = (g.transpose(1, 2)[lay.seq_k, lay.pos_k] for g in (dk, dv))
    return tuple(g.to(q.dtype).contiguous() for g in (dq, dk, dv))


# ---- custom ops: default kernels are the references; compiled kernels register per dispatch key.


@torch.library.custom_op("lub_fast::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
    q_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    return varlen_attention_fwd_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed, offset, scale, q_positions
    )


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed, offset, scale,
      q_positions=None):
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
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    seed: int,
    offset: int,
    scale: float,
    q_positions: Tensor | None = None,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    # The reference has no atomics: deterministic either way.
    return varlen_attention_bwd_ref(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed, offset,
        scale, q_positions,
    )


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, seed, offset,
      scale, q_positions=None, deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, seed, offset, scale, q_positions = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse, q_positions)
    ctx.args = (max_q, max_k, dropout_p, seed, offset, scale)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, cu_q, cu_k, out, lse, q_positions = ctx.saved_tensors
    deterministic = torch.are_deterministic_algorithms_enabled()
    dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args, q_positions, deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


varlen_attention_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


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


def attention_route(device_type: str, dtype: torch.dtype, head_dim: int, built: Built) -> str:
    """The implementation that runs attention on ``(device_type, dtype, head_dim)`` given ``built``.

    - ``lub_fast``: the compiled lub_fast kernel: on CPU whenever it is built (every dtype); on CUDA
      for fp16/bf16 with head dim 32, 64 or 128.
    - ``torch_varlen``: PyTorch's variable-length flash attention
      (``aten::_flash_attention_forward``, under ``torch.nn.attention.varlen.varlen_attn``) for CUDA
      fp16/bf16 the lub_fast kernel does not take, head dim a multiple of 8 up to 256.
    - ``sdpa``: ``F.scaled_dot_product_attention`` over padded ``[B, H, S, D]`` views with a
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
        if built.torch_flash and head_dim % 8 == 0 and head_dim <= TORCH_FLASH_MAX_HEAD_DIM:
            return "torch_varlen"
    return "sdpa"


# The backwards ``backward_route`` names, each with whether its dq, dk, dv are bit-identical across
# runs of the same inputs; None: torch's own backward, which follows torch.use_deterministic_algorithms
# itself (its deterministic kernel, or an error where it has none).
BACKWARD_DETERMINISTIC = {
    "lub_fast_atomic_dq": False, "lub_fast_dq_pass": True, "lub_fast_cpu": True, "reference": True, "torch": None,
}  # fmt: skip


def backward_route(device_type: str, route: str, deterministic: bool) -> str:
    """The backward that runs after forward route ``route`` (``attention_route``) on ``device_type``,
    with ``deterministic`` = ``torch.are_deterministic_algorithms_enabled()`` (what the autograd
    backward passes to ``lub_fast::varlen_attention_bwd``):

    - ``lub_fast_atomic_dq``: the CUDA kernel's default, dq summed over key tiles with fp32 atomics.
    - ``lub_fast_dq_pass``: the CUDA kernel under the switch: dk, dv per key tile and dq in a second
      pass per query tile, no atomics.
    - ``lub_fast_cpu``: the CPU kernel, deterministic either way.
    - ``reference``: autograd of the reference (PyTorch ops, no atomics of ours).
    - ``torch``: torch's own backward of ``torch_varlen`` and ``sdpa``, which reads the switch itself.

    Pure: tests pass any combination.
    """
    if route == "lub_fast":
        if device_type == "cpu":
            return "lub_fast_cpu"
        return "lub_fast_dq_pass" if deterministic else "lub_fast_atomic_dq"
    return "reference" if route == "reference" else "torch"


@torch.compiler.assume_constant_result
def _torch_flash_available(device_index: int) -> bool:
    """PyTorch's flash attention is built and CUDA device ``device_index`` is sm80 or newer."""
    capability = torch.cuda.get_device_capability(device_index)
    return torch.backends.cuda.is_flash_attention_available() and capability >= (8, 0)


def built_on(device: torch.device) -> Built:
    """``Built`` for ``device`` (with its index, as a tensor's device has) as this process has it."""
    return Built(
        lub_fast=has_kernel("varlen_attention_fwd", device.type),
        torch_flash=device.type == "cuda" and _torch_flash_available(device.index),
    )


def route_of(q: Tensor) -> str:
    """``attention_route`` for the query tensor ``q [Tq, H, D]``."""
    return attention_route(q.device.type, q.dtype, q.shape[-1], built_on(q.device))


def supports(q: Tensor) -> bool:
    """True when the compiled lub_fast kernel runs ``q`` (route ``lub_fast``)."""
    return route_of(q) == "lub_fast"


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
    """(flat padded position [T] = b * max_seqlen + local position, mask [B, max_seqlen]) of the
    varlen tokens, with no device-to-host copy."""
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(total, dtype=torch.int64, device=cu.device)
    seq = torch.searchsorted(cu[1:], tokens, right=True)
    flat = seq * max_seqlen + (tokens - cu[seq])
    mask = torch.arange(max_seqlen, device=cu.device)[None, :] < (cu[1:] - cu[:-1])[:, None]
    return flat, mask


def varlen_attention_sdpa(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    dropout_p: float, scale: float,
) -> Tensor:  # fmt: skip
    """``varlen_attention`` through ``F.scaled_dot_product_attention``: packs queries into a zero-padded
    ``[B, max_seqlen_q, H, D]`` batch and keys and values into ``[B, max_seqlen_k, H, D]`` (one scatter
    each, no host sync), runs SDPA with the key-padding mask (on CUDA its memory-efficient kernel: no
    ``[Sq, Sk]`` scores in memory) and gathers the real query rows back; queries of a sequence without
    keys get zeros. Differentiable. Dropout: torch's own masks (``DROPOUT_EXACT``), not the
    counter-based ones."""
    heads, head_dim = q.shape[1:]
    batch = cu_seqlens_q.numel() - 1
    flat_q, _ = _varlen_index(cu_seqlens_q, max_seqlen_q, q.shape[0])
    flat_k, mask_k = _varlen_index(cu_seqlens_k, max_seqlen_k, k.shape[0])

    def pad(x, flat, seqlen):
        return x.new_zeros(batch * seqlen, heads, head_dim).index_copy(0, flat, x).view(batch, seqlen, heads, head_dim)

    keyless = ~mask_k.any(dim=1)
    open_keys = mask_k.clone()
    open_keys[:, 0] |= keyless  # a sequence without keys gets key 0 (zeros) opened: finite, then zeroed
    out = F.scaled_dot_product_attention(
        pad(q, flat_q, max_seqlen_q).transpose(1, 2),
        pad(k, flat_k, max_seqlen_k).transpose(1, 2),
        pad(v, flat_k, max_seqlen_k).transpose(1, 2),
        attn_mask=open_keys[:, None, None, :], dropout_p=dropout_p, scale=scale,
    )
    out = torch.where(keyless[:, None, None, None], torch.zeros((), dtype=out.dtype, device=out.device), out)
    return out.transpose(1, 2).reshape(batch * max_seqlen_q, heads, head_dim).index_select(0, flat_q)


class _TorchVarlen(torch.autograd.Function):
    """PyTorch's variable-length flash attention (the aten ops under
    ``torch.nn.attention.varlen.varlen_attn``), called directly so that dropout works too: forward
    ``aten::_flash_attention_forward``, backward ``aten::_flash_attention_backward`` with the
    forward's RNG state. Positional arguments and ``scale=`` only, which torch 2.11 and 2.13 share."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, False, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, rng_state, unused)
        ctx.args = (max_seqlen_q, max_seqlen_k, dropout_p, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, rng_state, unused = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, dropout_p, scale = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            False, rng_state, unused, scale=scale,
        )
        return dq, dk, dv, None, None, None, None, None, None


def varlen_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    dropout_p: float, scale: float,
) -> Tensor:  # fmt: skip
    """``varlen_attention`` through PyTorch's flash attention (CUDA fp16/bf16, sm80+, head dim a multiple
    of 8 up to 256): unpadded, no copies of views whose last dim is contiguous. Differentiable.
    Dropout: torch's own Philox masks (``DROPOUT_EXACT``), not the counter-based ones."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _TorchVarlen.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale)


# ---- public functions


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, seed, offset, q_positions):
    name = "varlen_attention"
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(
            f"{name}: q must be [Tq, H, D] and k, v [Tk, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"{name}: q, k, v must share a floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for side, cu in (("q", cu_seqlens_q), ("k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name}: cu_seqlens_{side} must be int32 [B + 1]; got {cu.dtype} {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name}: cu_seqlens_{side} must be on {q.device} like q; got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"{name}: cu_seqlens_q and cu_seqlens_k must have B + 1 entries each; got {cu_seqlens_q.numel()} "
            f"and {cu_seqlens_k.numel()}"
        )
    if q_positions is not None and (
        q_positions.dtype != torch.int32 or q_positions.shape != q.shape[:1] or q_positions.device != q.device
    ):
        raise ValueError(
            f"{name}: q_positions must be int32 [Tq] = [{q.shape[0]}] on {q.device}; got {q_positions.dtype} "
            f"{tuple(q_positions.shape)} on {q_positions.device}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1); got {dropout_p}")
    if seed < 0:
        raise ValueError(f"{name}: seed must be in [0, 2**63); got {seed}")
    if not 0 <= offset < 2**32:
        raise ValueError(f"{name}: offset must be in [0, 2**32); got {offset}")


# The last two cu_seqlens checked (a query and a key layout): (weak reference, version counter, T,
# max_seqlen) each, most recent first.
_checked_cu_seqlens = []


def _cu_seqlens_error(cu_seqlens: Tensor, max_seqlen: int, total: int, side: str) -> str | None:
    """The rule ``cu_seqlens`` breaks, or None: one reduction and one bool copied to the host."""
    if max_seqlen < 0:
        return f"varlen attention: max_seqlen_{side} must be >= 0; got {max_seqlen}"
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
            f"varlen attention: cu_seqlens_{side} must start at 0, be non-decreasing and end at "
            f"T{side}={total}; got {cu.tolist()}"
        )
    return f"varlen attention: max_seqlen_{side}={max_seqlen} < longest sequence {int(lengths.max())}"


def check_cu_seqlens(cu_seqlens: Tensor, max_seqlen: int, total: int, side: str = "q") -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` starts at 0, is non-decreasing, ends at ``total`` and
    no length exceeds ``max_seqlen`` (the reference's rules), on any device; ``side`` (``"q"`` or
    ``"k"``) names it in the message.

    Cost: one reduction and one device-to-host copy of a bool (a stream sync on CUDA). The encoder
    passes one ``cu_seqlens`` tensor to every layer (and the sparse last layer one more for its
    queries), so the check runs once per layout and forward: a tensor among the last two checked
    with the same ``total`` and ``max_seqlen`` and unchanged since (its version counter) is not
    checked again. Under ``torch.compile`` ``varlen_attention`` runs the same check inside the opaque
    op ``lub_fast::checked_cu_seqlens`` instead (there one sync per attention call and layout).
    """
    for ref, version, t, m in _checked_cu_seqlens:
        if ref() is cu_seqlens and (version, t, m) == (cu_seqlens._version, total, max_seqlen):
            return
    error = _cu_seqlens_error(cu_seqlens, max_seqlen, total, side)
    if error is not None:
        raise ValueError(error)
    _checked_cu_seqlens.insert(0, (weakref.ref(cu_seqlens), cu_seqlens._version, total, max_seqlen))
    del _checked_cu_seqlens[2:]


@torch.library.custom_op("lub_fast::checked_cu_seqlens", mutates_args=())
def checked_cu_seqlens(cu_seqlens: Tensor, max_seqlen: int, total: int, side: str) -> Tensor:
    """A copy of ``cu_seqlens`` after ``check_cu_seqlens``: the check as a graph node that
    ``torch.compile`` keeps (its output feeds the attention op) and cannot trace into (host sync)."""
    error = _cu_seqlens_error(cu_seqlens, max_seqlen, total, side)
    if error is not None:
        raise ValueError(error)
    return cu_seqlens.clone()


@checked_cu_seqlens.register_fake
def _(cu_seqlens, max_seqlen, total, side):
    return torch.empty_like(cu_seqlens)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    scale: float | None = None,
    q_positions: Tensor | None = None,
) -> Tensor:
    """Non-causal attention of each query over the keys of its own sequence, unpadded, as
    FlashAttention's ``flash_attn_varlen_func``.

    ``q [Tq, H, D]`` and ``k, v [Tk, H, D]`` (one floating dtype) are the tokens of all sequences
    concatenated; ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 ``[B + 1]`` give the sequence boundaries
    in each (0, ..., T; non-decreasing, empty sequences allowed; ``check_cu_seqlens`` raises
    ``ValueError`` otherwise, on every device); ``max_seqlen_q`` / ``max_seqlen_k`` are at least the
    longest lengths. Self-attention passes the same ``cu_seqlens`` and ``max_seqlen`` twice. Returns
    ``out [Tq, H, D]`` in the input dtype, differentiable w.r.t. ``q, k, v``; a query of a sequence
    without keys gets zeros. ``dropout_p`` drops attention probabilities with the counter-based
    ``keep(seed, offset, b, h, row, j)`` of the module docstring (pass 0.0 in eval) on the ``lub_fast``
    and ``reference`` routes, with torch's own masks on the others (``attention_route``,
    ``DROPOUT_EXACT``); ``q_positions`` (int32 ``[Tq]``, or None for each query's position in its query
    sequence) is each query's position in the full sequence, so that a subset of queries draws the
    masks those queries have in self-attention; ``scale`` defaults to ``D ** -0.5``. Under
    ``torch.use_deterministic_algorithms(True)`` the lub_fast CUDA kernel's backward runs without
    atomics (``backward_route``), so its gradients are bit-identical run after run.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, seed, offset, q_positions)
    layouts = [(cu_seqlens_q, max_seqlen_q, q.shape[0], "q")]
    if cu_seqlens_k is not cu_seqlens_q or max_seqlen_k != max_seqlen_q or k.shape[0] != q.shape[0]:
        layouts.append((cu_seqlens_k, max_seqlen_k, k.shape[0], "k"))
    if torch.compiler.is_compiling():
        checked = [checked_cu_seqlens(*layout) for layout in layouts]
        cu_seqlens_q, cu_seqlens_k = checked[0], checked[-1]
    else:
        for layout in layouts:
            check_cu_seqlens(*layout)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    route = route_of(q)
    if route != "lub_fast":
        _warn_fallback("varlen_attention", q, route)
    layout_args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if route == "torch_varlen":
        return varlen_attention_torch(q, k, v, *layout_args, dropout_p, scale)
    if route == "sdpa":
        return varlen_attention_sdpa(q, k, v, *layout_args, dropout_p, scale)
    # The op runs the CPU kernel or, where no kernel is registered for the device, the reference; a
    # CUDA tensor the registered CUDA kernel rejects (fp64) calls the reference directly.
    fwd = varlen_attention_fwd_ref if route == "reference" and q.device.type == "cuda" else varlen_attention_fwd
    out, _ = fwd(q, k, v, *layout_args, dropout_p, seed, offset, scale, q_positions)
    return out
