"""Optimizers and learning-rate schedules for the training loop.

- ``param_groups``: weight decay on weight matrices and embeddings, none on biases and
  normalization weights (as BERT's ``exclude_from_weight_decay=["LayerNorm", "bias"]``, Devlin et
  al. 2019, google-research/bert ``optimization.py``).
- ``layerwise_param_groups``: layer-wise learning-rate decay for fine-tuning (Clark et al. 2020,
  ELECTRA; Sun et al. 2019, "How to Fine-Tune BERT for Text Classification"): layer ``l`` of ``L``
  trains at ``lr * layer_decay ** (L + 1 - l)``, the embeddings (``l = 0``) slowest.
- ``build_optimizer``: AdamW (Loshchilov & Hutter 2019) using torch's fused kernel on the devices
  where torch has one (CUDA, CPU), or ``Lamb``.
- ``Lamb``: layer-wise adaptive moments (You et al. 2019, "Large Batch Optimization for Deep
  Learning: Training BERT in 76 minutes", Algorithm 2) as NVIDIA's BERT runs it (apex
  ``FusedLAMB``, ``adam_w_mode=True``, ``use_nvlamb=False``): Adam moments with bias correction,
  decoupled weight decay added to the update, and the trust ratio ``||w|| / ||update||`` applied
  only to parameter groups with weight decay (google-research's ``exclude_from_layer_adaptation``
  defaults to the weight-decay exclusions too); gradient clipping is left to the training loop.
- ``lr_factor`` / ``build_scheduler``: linear warmup then linear or cosine decay.
"""

import functools
import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups over the trainable parameters of ``model`` (tied parameters counted once):
    ``weight_decay`` for everything except biases and normalization-layer parameters, ``0.0`` for
    those. Group order and parameter order follow ``model.named_modules()``, so they are the same
    on every rank and every run (which checkpointed optimizer state relies on)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, _NORMS) or name == "bias" or name.endswith("_bias"):
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: Literal["adamw", "lamb"],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    groups: list[dict] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (fused when every parameter is on CUDA or CPU) or ``Lamb`` over ``param_groups``, or
    over ``groups`` (e.g. layer-wise learning rates; a group's ``lr`` is its peak rate, which the
    schedule scales like the others)."""
    if groups is None:
        groups = param_groups(model, weight_decay)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if name == "adamw":
        devices = {p.device.type for g in groups for p in g["params"]}
        fused = devices <= {"cuda", "cpu"}
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"optimizer must be 'adamw' or 'lamb', got {name!r}")


def layerwise_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Optimizer groups with layer-wise learning-rate decay for a task model of ``lub_fast.models``.

    Depth ``0``: embeddings (and ALBERT/ELECTRA's embedding projection); ``l``: encoder layer
    ``l`` (an ALBERT layer shared by several positions takes its deepest one); ``L + 1``: pooler
    and head. Group ``lr`` = ``lr * layer_decay ** (L + 1 - depth)``; weight decay as
    ``param_groups`` (none on biases and LayerNorm). Groups in depth order.
    """
    config = model.config
    top = config.num_hidden_layers + 1
    deepest = {unique: position + 1 for position, unique in enumerate(config.layer_schedule())}  # last use wins
    no_decay = {id(p) for g in param_groups(model, weight_decay) if g["weight_decay"] == 0.0 for p in g["params"]}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(("encoder.embeddings.", "encoder.embedding_projection.")):
            depth = 0
        elif name.startswith("encoder.layers."):
            depth = deepest[int(name.split(".")[2])]
        else:
            depth = top
        decay = 0.0 if id(param) in no_decay else weight_decay
        key = (depth, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": decay, "lr": lr * layer_decay ** (top - depth)}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], -k[1]))]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, Algorithm 2), NVIDIA/apex ``FusedLAMB`` semantics. Per tensor ``w``:

        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        r = ||w|| / ||u|| if weight_decay != 0 and both norms > 0 else 1
        w = w - lr * r * u
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lamb: invalid lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                # moments at least fp32 for fp16/bf16 parameters (as apex)
                math_dtype = torch.promote_types(p.dtype, torch.float32)
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=math_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=math_dtype)
                state["step"] += 1
                t = state["step"].item()
                grad = p.grad.to(math_dtype)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(group["eps"])
                update = (exp_avg / (1 - beta1**t)) / denominator
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p.to(math_dtype))
                    u_norm = torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(ratio)
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["linear", "cosine", "constant"],
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warmup: ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps`` (nanoGPT's form: the
    first step already learns). Then with ``p = (step - warmup_steps) / (total_steps -
    warmup_steps)`` clamped to [0, 1]: linear ``1 - (1 - min_lr_ratio) p``, cosine ``min_lr_ratio +
    (1 - min_lr_ratio) (1 + cos(pi p)) / 2``, constant ``1``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be 'linear', 'cosine' or 'constant', got {schedule!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["linear", "cosine", "constant"],
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following ``lr_factor``; call ``step()`` once per optimizer step."""
    if schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"schedule must be 'linear', 'cosine' or 'constant', got {schedule!r}")
    factor = functools.partial(
        lr_factor,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
