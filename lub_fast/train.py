"""The one training loop: pretraining, distillation and fine-tuning all run through ``train``.

(Over 500 lines because ``_Loop`` is one control flow over one state: its step, save, restore and
logging read and write the same position, window and optimizer; the file system and resume
checks it calls live in ``lub_fast.checkpoint``.)

What it is given:

- ``objective``: an ``nn.Module`` that owns its models; ``objective(batch) -> (loss, metrics)``
  with ``loss`` a scalar tensor and ``metrics`` a dict of scalars (floats or 0-d tensors; the same
  keys every call). Metrics named ``num_*`` are counts (summed over micro-batches and ranks);
  the others are averaged. ``num_tokens`` (real, non-pad tokens) and ``num_samples`` default to
  ``batch["attention_mask"].sum()`` (else ``batch["input_ids"].numel()``) and the leading size.
  ``objective.state_dict()`` is what the checkpoints hold.
- ``batches(start_micro_step, rank, world_size)``: an iterator over this rank's micro-batches from
  global micro-step ``start_micro_step`` on. Micro-batch ``m`` of rank ``r`` must be a pure
  function of ``(m, r, world_size)`` (the data side makes example ``i`` a function of
  ``(seed, i)``), and ranks must read disjoint examples: then an exact resume needs only the
  micro-step counter.
- ``eval_fn(objective) -> dict``: held-out metrics (MLM loss, masked-token accuracy), called on
  every rank every ``eval_every`` steps and at the end, in eval mode under ``no_grad`` and the
  run's autocast, with the RNG states restored afterwards (so evaluation never changes training).
  A true ``"stop"`` entry (the same on every rank, e.g. early stopping on a dev metric) ends
  training after that step's checkpoint; ``TrainResult.stopped_early`` says so.
- ``param_groups``: optimizer parameter groups to use instead of the default two (weight decay or
  not), e.g. layer-wise learning-rate decay; each group's ``lr`` is its peak rate.

One optimizer step = ``grad_accum_steps`` micro-batches per rank; the loss of each is divided by
``grad_accum_steps`` and DDP averages over ranks, so the gradient is the mean over the global
batch. Precision (``auto``, the default, is resolved once by ``resolve_precision``: bf16 on a CUDA
device that supports it, else fp32): ``fp32``; ``bf16`` autocast; ``fp16`` autocast with ``torch.amp.GradScaler``
(a step with inf/NaN gradients is skipped and the scale halved, logged as ``skipped_steps``). In
fp32/bf16 a non-finite loss or gradient norm raises ``NonFiniteError`` naming the step and the
ranks, before the optimizer touches the weights; checkpoints on disk stay as they were.

Distributed: under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` in the
environment) the process group is initialized from the environment, NCCL on GPUs and gloo on
CPUs, and the objective is wrapped in ``DistributedDataParallel`` with gradient sync only on the
last micro-batch of a window (``no_sync``). Logged metrics are reduced over ranks; only rank 0
writes logs and checkpoints (checkpoints must live on a filesystem that every rank can read).
One machine with 8 GPUs, then two machines through torchrun's c10d rendezvous:

    torchrun --nproc-per-node 8 -m lub_fast.pretrain ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example.com:29400 --rdzv-id bert-wwm-1 -m lub_fast.pretrain ...
    (run the same command on both machines)

Checkpoints (``lub_fast.checkpoint``): every ``save_every`` steps and at the end, keeping the last
``keep_last``. SIGTERM sets a flag: a single process saves after the current micro-batch (a
mid-window checkpoint, with the accumulated gradients), a DDP run saves after the current
optimizer step (all ranks agree through the per-step reduction); ``train`` then returns with
``interrupted=True``. (torchrun forwards its own SIGTERM to every worker and SIGKILLs them 30 s
later, so one optimizer step plus a checkpoint must fit in that.) Resume (``resume="latest"`` or a checkpoint path) restores weights,
gradients, optimizer, scheduler, scaler, every rank's RNG states and the counters, so on CPU the
continued run is bit-identical (``torch.equal``) to an uninterrupted one, from a step boundary or
from the middle of an accumulation window.

Memory: while ``train`` runs, every ``lub_fast.models.encoder.Encoder`` in the objective rounds its
unpadded token count up to a multiple of ``TOKEN_MULTIPLE`` (``Encoder.token_multiple``; restored
afterwards). Varlen batches otherwise give every activation a new size each step, and glibc's heap
fragments: resident memory grew from 402 to 744 MiB over 2000 steps of the demo
(benchmarks/results/2026-12-02-memory-cpu.md).

Logs (rank 0): a tqdm bar (loss, lr, tokens/s, ETA), ``run_dir/metrics.jsonl`` (records averaged
over ``log_every`` steps), TensorBoard when installed, ``run_dir/loss.png`` at the end, and the
resolved config in ``run_dir/config.json``.

Sources: the AMP recipes of the PyTorch docs ("Automatic Mixed Precision examples": gradient
accumulation and clipping with ``GradScaler``), ``DistributedDataParallel.no_sync``, torchrun's
"Elastic Launch" page for the rendezvous flags, and nanoGPT's ``train.py`` for the loop's shape.
"""

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lub_fast import checkpoint as ckpt
from lub_fast.config_cli import check_fields, field_error, option, save_config, to_dict
from lub_fast.errors import UsageError
from lub_fast.logging_utils import MetricsLog, plot_metrics
from lub_fast.models.encoder import Encoder
from lub_fast.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

Batches = Callable[[int, int, int], Iterator[Any]]
EvalFn = Callable[[nn.Module], dict]

# Rows of the encoder's unpadded activations are a multiple of this while training (see "Memory").
TOKEN_MULTIPLE = 64
_RESERVED = ("loss", "lr", "grad_norm", "step", "micro_step", "samples", "tokens", "split")


@dataclass(frozen=True)
class TrainConfig:
    """How to optimize (the objective, model and data have their own configs)."""

    total_steps: int = option(1000, "optimizer steps to train for", ge=1)
    grad_accum_steps: int = option(1, "micro-batches per rank per optimizer step", ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto",
        "auto: bf16 on a CUDA device that supports it, else fp32 (the resolved value goes to config.json); "
        "fp32; bf16 autocast; fp16 autocast with loss scaling (skips inf/NaN steps)",
    )
    optimizer: Literal["adamw", "lamb"] = option(
        "adamw", "adamw (fused where torch has it) or lamb (large batches)"
    )
    lr: float = option(1e-4, "peak learning rate", ge=0)
    weight_decay: float = option(0.01, "decoupled weight decay (not on biases and LayerNorm)", ge=0)
    betas: tuple[float, float] = option((0.9, 0.999), "Adam/LAMB moment decay rates", ge=0, lt=1)
    eps: float = option(1e-6, "Adam/LAMB denominator epsilon", gt=0)
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this; 0 disables clipping", ge=0)
    schedule: Literal["linear", "cosine", "constant"] = option("linear", "decay after warmup")
    warmup_steps: int = option(0, "linear warmup steps (at most total_steps)", ge=0)
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of the peak", ge=0, le=1)
    seed: int = option(0, "seed of dropout and other global RNG use (rank r uses seed + r)", ge=0)
    log_every: int = option(10, "steps per metrics.jsonl record (values averaged over them)", ge=1)
    eval_every: int = option(0, "steps between evaluations; 0: only at the end", ge=0)
    save_every: int = option(1000, "steps between checkpoints; 0: only at the end", ge=0)
    keep_last: int = option(3, "checkpoints to keep; 0 keeps all", ge=0)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: CUDA when available")
    find_unused_parameters: bool = option(False, "DDP: allow parameters that get no gradient in a step")

    def __post_init__(self):
        check_fields(self)
        if self.warmup_steps > self.total_steps:
            raise field_error(self, "warmup_steps", f"<= total_steps = {self.total_steps}")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``TrainConfig.precision`` on ``device``: ``auto`` becomes ``bf16`` on a CUDA device of compute
    capability 8.0 or newer (bf16 tensor cores) and ``fp32`` elsewhere; other values stay."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "bf16"
    return "fp32"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run."""

    rank: int
    world_size: int
    device: torch.device


@dataclass(frozen=True)
class TrainResult:
    """Where training stopped. ``metrics``: the last training record; ``eval_metrics``: the last
    evaluation (empty without ``eval_fn``); ``checkpoint``: the last checkpoint written or
    resumed from; ``interrupted``: stopped early by SIGTERM (after saving); ``stopped_early``:
    ``eval_fn`` asked to stop."""

    step: int
    micro_step: int
    samples: int
    tokens: int
    metrics: dict
    eval_metrics: dict
    checkpoint: Path | None
    interrupted: bool
    stopped_early: bool = False


class NonFiniteError(UsageError, FloatingPointError):
    """A NaN/Inf loss or gradient in fp32/bf16 training."""


def init_distributed(device: Literal["auto", "cpu", "cuda"] = "auto") -> DistEnv:
    """Join the torchrun process group when the environment describes one (idempotent).

    NCCL when this process trains on CUDA (``cuda:LOCAL_RANK``), gloo on CPU. Without torchrun
    (or with ``WORLD_SIZE=1``) it is a single process on ``cuda:0`` or the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device='cuda' but torch sees no CUDA device")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    return DistEnv(rank=rank, world_size=world_size, device=target)


def shutdown_distributed() -> None:
    """Leave the process group, if any (call once at the end of a torchrun command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank of the process group; nothing without one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class StopOnSigterm:
    """While entered (in the main thread), SIGTERM sets ``requested``: a loop stops at its next
    boundary, after saving, instead of dying."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class _Position:
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done per rank (the data position)
    window_pos: int = 0  # micro-batches of the current window done
    samples: int = 0
    tokens: int = 0


_STATE_KEYS = {
    *(f.name for f in dataclasses.fields(_Position)),
    "world_size", "optimizer", "scheduler", "scaler", "rng", "window", "interval", "config",
}  # fmt: skip


@dataclass
class _Interval:
    """Host-side sums of per-step values since the last metrics record."""

    sums: dict = dataclasses.field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    lr: float = 0.0  # of the last step


def train(
    objective: nn.Module,
    batches: Batches,
    config: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    eval_fn: EvalFn | None = None,
    resume: str | os.PathLike | None = None,
    run_config: Any = None,
    param_groups: list[dict] | None = None,
) -> TrainResult:
    """Train ``objective`` for ``config.total_steps`` optimizer steps (see the module docstring).

    ``resume``: ``None`` starts fresh (a ``run_dir`` that already holds checkpoints is refused);
    ``"latest"`` continues from the newest valid checkpoint of ``run_dir`` (an invalid newer one
    is reported and skipped; none at all starts fresh); a path continues from that checkpoint
    (``CheckpointError`` if it is invalid). ``run_config``: the command's whole resolved config
    dataclass, written to ``run_dir/config.json`` (default: ``config``).
    """
    env = init_distributed(config.device)
    precision = resolve_precision(config.precision, env.device)
    if precision != config.precision:  # chosen once; config.json and the checkpoints record the choice
        logger.info("train.precision auto -> %s on %s", precision, env.device)
        if run_config is not None and getattr(run_config, "train", None) == config:
            run_config = dataclasses.replace(run_config, train=dataclasses.replace(config, precision=precision))
        config = dataclasses.replace(config, precision=precision)
    run_dir = Path(run_dir)
    main = env.rank == 0
    objective.to(env.device)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_tmp(run_dir)
    loop = _Loop(objective, config, env, run_dir, eval_fn, param_groups)
    resume_from = ckpt.resume_path(run_dir, resume, env.rank, env.world_size)
    if resume_from is not None:
        loop.restore(resume_from)
    else:
        _seed_all(config.seed + env.rank)
    if env.world_size > 1:
        loop.model = DistributedDataParallel(
            objective,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters,
        )
    if main:
        save_config(run_config if run_config is not None else config, run_dir / "config.json")
        loop.log = MetricsLog(run_dir, resume_step=loop.pos.step if resume_from is not None else None)
    encoders = [m for m in objective.modules() if isinstance(m, Encoder)]
    saved_multiples = [e.token_multiple for e in encoders]
    for encoder in encoders:
        encoder.token_multiple = TOKEN_MULTIPLE
    try:
        interrupted = loop.run(batches)
    finally:
        for encoder, multiple in zip(encoders, saved_multiples):
            encoder.token_multiple = multiple
        if loop.log is not None:
            loop.log.close()
    if main:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return TrainResult(
        step=loop.pos.step,
        micro_step=loop.pos.micro_step,
        samples=loop.pos.samples,
        tokens=loop.pos.tokens,
        metrics=loop.last_record,
        eval_metrics=loop.last_eval,
        checkpoint=loop.last_checkpoint,
        interrupted=interrupted,
        stopped_early=loop.stopped_early,
    )


class _Loop:
    """The state of one ``train`` call; ``run`` is the loop itself."""

    def __init__(self, objective: nn.Module, config: TrainConfig, env: DistEnv, run_dir: Path, eval_fn, param_groups):
        self.objective = self.model = objective  # model: the DDP wrapper when distributed
        self.config, self.env, self.run_dir, self.eval_fn = config, env, run_dir, eval_fn
        self.optimizer = build_optimizer(
            objective, config.optimizer, config.lr, config.weight_decay, config.betas, config.eps, param_groups
        )
        self.stopped_early = False
        self.scheduler = build_scheduler(
            self.optimizer, config.warmup_steps, config.total_steps, config.schedule, config.min_lr_ratio
        )
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=config.precision == "fp16")
        self.amp_dtype = AMP_DTYPES.get(config.precision)
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.log: MetricsLog | None = None  # rank 0 only
        self.pos, self.window, self.interval = _Position(), {}, _Interval()
        self.last_checkpoint: Path | None = None
        self.saved_at = None  # (step, window_pos) of the last checkpoint written or loaded
        self.last_record, self.last_eval = {}, {}
        self.rate_tokens, self.rate_time = 0, time.perf_counter()

    def restore(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (rank 0 verified its checksums when choosing it)."""
        env, config = self.env, self.config
        saved, grads = ckpt.load_checkpoint(path, self.objective, verify=False)
        missing = sorted(_STATE_KEYS - set(saved)) if isinstance(saved, dict) else ["everything (not a dict)"]
        if missing:
            raise ckpt.CheckpointError(
                f"checkpoint {path}: {path / 'state.pt'} lacks {', '.join(missing)}: it is not a state that "
                "lub_fast.train saved; resume from another checkpoint"
            )
        ckpt.check_resumable(saved, to_dict(config), env.world_size, path)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.pos = _Position(**{f.name: saved[f.name] for f in dataclasses.fields(_Position)})
        self.window = {k: v.to(env.device) for k, v in saved["window"].items()}
        self.interval = _Interval(**saved["interval"])
        if grads is not None:
            for name, param in self.objective.named_parameters():
                if name in grads:
                    param.grad = grads[name].to(param.dtype)
        if env.rank < len(saved["rng"]):
            ckpt.set_rng_state(saved["rng"][env.rank], env.device)
        else:  # more ranks than the run that saved (already warned): a fresh stream per rank
            _seed_all(config.seed + env.rank + 1_000_003 * self.pos.step)
        self.last_checkpoint = path
        self.saved_at = (self.pos.step, self.pos.window_pos)
        logger.info("resumed from %s at step %d, micro-step %d", path, self.pos.step, self.pos.micro_step)

    def autocast(self):
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def run(self, batches: Batches) -> bool:
        """Train to ``total_steps``; return whether SIGTERM stopped it early."""
        cfg, env, pos = self.config, self.env, self.pos
        self.objective.train()
        iterator = iter(batches(pos.micro_step, env.rank, env.world_size))
        bar = tqdm(
            total=cfg.total_steps, initial=pos.step, unit="step", disable=env.rank != 0, dynamic_ncols=True
        )
        self.rate_time = time.perf_counter()
        with StopOnSigterm() as stop, bar:
            while pos.step < cfg.total_steps:
                try:
                    batch = next(iterator)
                except StopIteration:
                    raise RuntimeError(
                        f"batches ran out at micro-step {pos.micro_step} on rank {env.rank} "
                        f"(step {pos.step} of {cfg.total_steps})"
                    ) from None
                self._micro_step(_to_device(batch, env.device))
                if pos.window_pos < cfg.grad_accum_steps:
                    if stop.requested and env.world_size == 1:
                        self._save()
                        return True
                    continue
                values = self._optimizer_step(stop.requested)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{values['loss']:.4f}",
                    lr=f"{values['lr']:.2e}",
                    tok_s=f"{self.rate_tokens / max(1e-9, time.perf_counter() - self.rate_time):.0f}",
                    refresh=False,
                )
                done = pos.step == cfg.total_steps
                stopping = values["stop"] > 0
                if pos.step % cfg.log_every == 0 or done or stopping:
                    self._write_record()
                if self.eval_fn is not None and ((cfg.eval_every and pos.step % cfg.eval_every == 0) or done):
                    self._evaluate()
                if (cfg.save_every and pos.step % cfg.save_every == 0) or done or stopping or self.stopped_early:
                    self._save()
                if stopping:
                    return True
                if self.stopped_early:
                    return False
        return False

    def _micro_step(self, batch) -> None:
        cfg, pos = self.config, self.pos
        last = pos.window_pos == cfg.grad_accum_steps - 1
        sync = contextlib.nullcontext() if last or self.model is self.objective else self.model.no_sync()
        with sync:
            with self.autocast():
                loss, metrics = self.model(batch)
            self.scaler.scale(loss.float() / cfg.grad_accum_steps).backward()
        # Sums stay where they are (device tensors or Python floats): no host-device sync here.
        values = {"loss": loss.detach().double()}
        for key, value in metrics.items():
            if key in _RESERVED:
                raise ValueError(f"objective metric name {key!r} is reserved by the training loop")
            values[key] = value.detach().double() if torch.is_tensor(value) else float(value)
        values.setdefault("num_tokens", _count_tokens(batch))
        values.setdefault("num_samples", float(_count_samples(batch)))
        if self.window and set(values) != set(self.window):
            raise ValueError(
                f"objective metrics changed keys at micro-step {pos.micro_step}: "
                f"{sorted(values)} vs {sorted(self.window)}"
            )
        for key, value in values.items():
            self.window[key] = self.window[key] + value if key in self.window else value
        pos.micro_step += 1
        pos.window_pos += 1

    def _optimizer_step(self, stop_requested: bool) -> dict:
        """Clip, check, step, reduce metrics over ranks; returns this step's reduced values."""
        cfg, env, pos = self.config, self.env, self.pos
        self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        keys = sorted(self.window)
        sums = [torch.as_tensor(self.window[k], dtype=torch.float64).to(env.device).reshape(1) for k in keys]
        flags = torch.zeros(env.world_size + 1, dtype=torch.float64, device=env.device)
        flags[env.rank] = (~torch.isfinite(self.window["loss"])).double()
        flags[-1] = float(stop_requested)
        packed = torch.cat([*sums, flags])
        if env.world_size > 1:
            dist.all_reduce(packed)
        host = torch.cat([packed, grad_norm.detach().double().reshape(1).to(packed.device)]).tolist()
        n = cfg.grad_accum_steps * env.world_size
        values = {k: (v if k.startswith("num_") else v / n) for k, v in zip(keys, host)}
        bad_ranks = [r for r in range(env.world_size) if host[len(keys) + r] > 0]
        values["grad_norm"], values["stop"] = host[-1], host[-2]
        values["lr"] = self.scheduler.get_last_lr()[0]
        finite = not bad_ranks and math.isfinite(values["grad_norm"])
        if not finite and cfg.precision != "fp16":
            raise NonFiniteError(
                f"non-finite {'loss' if bad_ranks else 'gradient'} at step {pos.step + 1} "
                f"(micro-steps {pos.micro_step - cfg.grad_accum_steps}..{pos.micro_step - 1}) on rank "
                f"{env.rank} of {env.world_size}: loss={values['loss']}, grad_norm={values['grad_norm']}, "
                f"non-finite loss on ranks {bad_ranks}; training stopped before the update, "
                f"last checkpoint: {self.last_checkpoint or 'none'}"
            )
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = scale is not None and self.scaler.get_scale() < scale
        if skipped:
            logger.warning(
                "fp16: inf/NaN gradients at step %d, step skipped, loss scale %g -> %g",
                pos.step + 1, scale, self.scaler.get_scale(),
            )
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        pos.step += 1
        pos.window_pos = 0
        pos.samples += int(values["num_samples"])
        pos.tokens += int(values["num_tokens"])
        self.rate_tokens += int(values["num_tokens"])
        self.window = {}
        self._accumulate_interval(values, skipped)
        return values

    def _accumulate_interval(self, values: dict, skipped: bool) -> None:
        interval = self.interval
        interval.steps += 1
        interval.lr = values["lr"]
        if skipped:
            interval.skipped += 1
            return
        for key, value in values.items():
            if key not in ("stop", "lr"):
                interval.sums[key] = interval.sums.get(key, 0.0) + value

    def _write_record(self) -> None:
        """Rank 0: one metrics.jsonl record, the means over the steps since the last one."""
        interval, pos = self.interval, self.pos
        kept = interval.steps - interval.skipped
        now = time.perf_counter()
        record = {
            "split": "train",
            "step": pos.step,
            "micro_step": pos.micro_step,
            "samples": pos.samples,
            "tokens": pos.tokens,
        }
        for key, total in sorted(interval.sums.items()):
            record[key] = total if key.startswith("num_") else total / max(1, kept)
        record["lr"] = interval.lr
        record["tokens_per_s"] = self.rate_tokens / max(1e-9, now - self.rate_time)
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
            record["skipped_steps"] = interval.skipped
        self.last_record = record
        self.interval = _Interval()
        self.rate_tokens, self.rate_time = 0, now
        if self.log is not None:
            self.log.write(record)

    def _evaluate(self) -> None:
        """``eval_fn`` on every rank in eval mode, with all RNG states restored afterwards."""
        env = self.env
        states = ckpt.rng_state(env.device)
        self.objective.eval()
        try:
            with torch.no_grad(), self.autocast():
                results = self.eval_fn(self.objective)
        finally:
            self.objective.train()
            ckpt.set_rng_state(states, env.device)
        self.stopped_early = bool(results.pop("stop", False))
        self.last_eval = {k: float(v) for k, v in results.items()}
        if self.log is not None:
            self.log.write({"split": "eval", "step": self.pos.step, **self.last_eval})

    def _save(self) -> None:
        """Checkpoint the current position (collective: every rank calls it)."""
        cfg, env, pos = self.config, self.env, self.pos
        if self.saved_at == (pos.step, pos.window_pos):
            return
        rng = [ckpt.rng_state(env.device)]
        if env.world_size > 1:
            gathered = [None] * env.world_size if env.rank == 0 else None
            dist.gather_object(rng[0], gathered, dst=0)
            rng = gathered
        name = ckpt.checkpoint_name(pos.step, pos.window_pos)
        path = Path(self.run_dir) / ckpt.CHECKPOINT_DIR / name
        if env.rank == 0:
            state = {
                **dataclasses.asdict(pos),
                "world_size": env.world_size,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "window": {k: torch.as_tensor(v, dtype=torch.float64).cpu() for k, v in self.window.items()},
                "interval": dataclasses.asdict(self.interval),
                "config": to_dict(cfg),
            }
            grads = None
            if pos.window_pos:
                grads = {n: p.grad for n, p in self.objective.named_parameters() if p.grad is not None}
            path = ckpt.save_checkpoint(self.run_dir, name, self.objective, state, grads, cfg.keep_last)
            logger.info("saved checkpoint %s", path)
        if env.world_size > 1:
            dist.barrier()
        self.saved_at = (pos.step, pos.window_pos)
        self.last_checkpoint = path


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_device(batch, device: torch.device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _count_tokens(batch) -> torch.Tensor | float:
    if isinstance(batch, dict):
        if torch.is_tensor(batch.get("attention_mask")):
            return batch["attention_mask"].sum().double()
        if torch.is_tensor(batch.get("input_ids")):
            return float(batch["input_ids"].numel())
    return 0.0


def _count_samples(batch) -> int:
    if isinstance(batch, dict):
        batch = list(batch.values())
    for value in batch if isinstance(batch, (list, tuple)) else [batch]:
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    return 0
