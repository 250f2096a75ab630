"""One fine-tuning run: ``finetune(config)`` trains a task model, keeps the best, predicts dev/test.

Recipe (Devlin et al. 2019; CLUE baselines, https://github.com/CLUEbenchmark/CLUE; HFL's
Chinese-BERT-wwm, https://github.com/ymcui/Chinese-BERT-wwm): AdamW, linear warmup over
``warmup_ratio`` of the steps then linear decay to 0, ``epochs`` passes over the training data
with ``batch_size`` examples per optimizer step (all ranks and accumulation steps together), so
``total_steps = epochs * ceil(train examples / batch_size)``. Optional layer-wise learning-rate
decay (``lub_fast.optim.layerwise_param_groups``).

The task (``make_task``: one ``lub_fast.tasks.base.Task`` per kind) reads the files, builds the
rows, decodes, scores and writes predictions; the model is ``lub_fast.models`` (an HF directory
of a base, MLM or task checkpoint gets a freshly initialised task head), the objective
``lub_fast.objectives.finetune``, the loop ``lub_fast.train`` (AMP, DDP under torchrun, exact
resume, metrics.jsonl). Inputs are WordPiece ids from the model directory's tokenizer; each
micro-batch is padded to its longest row.

Epoch ``e`` visits the training rows in the order of a permutation seeded by ``(seed, e)``;
micro-batch ``m`` of rank ``r`` is a pure function of ``(m, r, world size)``, so a resumed run
continues exactly. The dev set is scored every epoch (or every ``eval_every`` steps); a better dev
metric exports the model to ``output/best_model/`` (an HF directory with ``id2label``/``label2id``
and the tokenizer files); ``patience`` evaluations without improvement stop training. The best
metric and the patience counter are kept in the checkpoints, so a resumed run makes the same
choices. At the end the best model predicts dev and test: ``output/metrics.json``,
``output/{dev,test}_predictions.jsonl`` (``.json`` for CMRC 2018) and, for a CLUE task, the test
predictions under CLUE's file name (``lub_fast.tasks.io.clue_submission_name``).
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lub_fast.config_cli import ConfigError, check_fields, from_dict, option, output_dir
from lub_fast.errors import Preempted
from lub_fast.models.load import from_pretrained, read_tokenizer_files
from lub_fast.objectives.finetune import objective_for
from lub_fast.ops.wwm import IGNORE_INDEX
from lub_fast.optim import layerwise_param_groups
from lub_fast.tasks import TASKS, TaskDataError
from lub_fast.tasks.base import Head, Split, Task, load_tokenizer
from lub_fast.tasks.classification import ClassificationTask, RegressionTask
from lub_fast.tasks.cmrc2018 import SpanTask
from lub_fast.tasks.io import clue_submission_name
from lub_fast.tasks.ner import NerTask
from lub_fast.train import (
    AMP_DTYPES,
    TrainConfig,
    init_distributed,
    resolve_precision,
    train,
)


@dataclass(frozen=True)
class FinetuneOptions:
    """Fine-tuning hyperparameters (``--finetune.FIELD=VALUE``); the task defaults fill the first three."""

    epochs: int = option(3, "passes over the training data", ge=1)
    batch_size: int = option(32, "examples per optimizer step, over all ranks and accumulation steps", ge=1)
    max_seq_len: int = option(128, "word pieces per input, [CLS]/[SEP] included", ge=4)
    warmup_ratio: float = option(0.1, "fraction of the steps with linear warmup", ge=0, le=1)
    layer_decay: float = option(
        1.0, "layer-wise learning-rate decay: layer l of L gets lr * decay**(L+1-l); 1 = off", gt=0, le=1
    )
    patience: int = option(0, "stop after this many evaluations without a better dev metric; 0 = never", ge=0)
    eval_every: int = option(0, "steps between dev evaluations; 0 = once per epoch", ge=0)
    eval_batch_size: int = option(64, "examples per evaluation batch", ge=1)
    doc_stride: int = option(
        128, "cmrc2018 and ner: tokens between the starts of the windows of a long context or sentence", ge=1
    )
    max_query_len: int = option(64, "cmrc2018: question tokens kept", ge=1)
    n_best: int = option(20, "cmrc2018: start and end candidates searched per window", ge=1)
    max_answer_len: int = option(30, "cmrc2018: longest answer in tokens", ge=1)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class FinetuneData:
    """The task's files and how to read them (``--data.FIELD=VALUE``)."""

    train: str = option("", "training file")
    dev: str = option("", "dev file (labelled): picks the best checkpoint")
    test: str | None = option(None, "test file, labelled or not: predicted by the best model")
    labels: str | None = option(None, "label set file (one a line, or CLUE labels.json); default: the training labels")
    text_fields: tuple[str, ...] | None = option(
        None, "task classification: one or two json fields, TSV headers or columns"
    )
    label_field: str | None = option(None, "task classification: the label's json field, TSV header or column")
    scheme: Literal["bio", "bioes", "bmes"] | None = option(None, "ner: re-tag the data in this scheme")
    skip_bad: bool = option(False, "drop bad lines and print their counts instead of stopping")

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run: the task, model and output (the command's ``--task``, ``--model``,
    ``--output``), its files (``data``) and how to train (``finetune``, ``train``)."""

    task: Literal[tuple(TASKS)] = option("classification", "task name (--task)")
    model: str = option("", "HF model directory to start from (--model)")
    output: str = option("", "output directory (--output)", check=output_dir)
    data: FinetuneData = field(default_factory=FinetuneData)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_fields(self, command=True)
        kind, data = TASKS[self.task].kind, self.data
        if data.labels is not None and kind == "span":
            raise ConfigError("cmrc2018 takes no label set (--data.labels)")
        if (data.text_fields is not None or data.label_field is not None) and self.task != "classification":
            raise ConfigError("--data.text_fields and --data.label_field are for the generic 'classification' task")
        if data.scheme is not None and kind != "ner":
            raise ConfigError("--data.scheme is for the 'ner' task")


def default_config(task: str) -> FinetuneConfig:
    """The defaults of ``task``: its ``TaskSpec`` lr, epochs, batch size and sequence length."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    spec = TASKS[task]
    options = FinetuneOptions(epochs=spec.epochs, batch_size=spec.batch_size, max_seq_len=spec.max_seq_len)
    return FinetuneConfig(task=task, finetune=options, train=TrainConfig(lr=spec.lr, keep_last=1))


# The FinetuneConfig fields that moved into ``data`` after commit 093b1bc: old name -> FinetuneData field.
# Their flags were the new field's name with dashes (--train, --text-fields).
MOVED_TO_DATA = {"train_file": "train", "dev_file": "dev", "test_file": "test", "labels": "labels",
                 "text_fields": "text_fields", "label_field": "label_field", "scheme": "scheme",
                 "skip_bad": "skip_bad"}  # fmt: skip


def load_run_config(path) -> FinetuneConfig:
    """The ``FinetuneConfig`` of a run's ``config.json`` (``--config``), of today's layout or of one
    written up to commit 093b1bc, whose top-level file keys (``MOVED_TO_DATA``) it moves under
    ``data``, saying so in one line on stderr: they name the same settings, so such a run directory
    resumes as it is."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    old = [key for key in MOVED_TO_DATA if isinstance(saved, dict) and key in saved]
    if old and "data" in saved:
        raise ConfigError(f"{path}: both data and the old top-level {', '.join(old)}: keep only data (data.train, ...)")
    if old:
        data = {MOVED_TO_DATA[key]: saved[key] for key in old}
        saved = {key: value for key, value in saved.items() if key not in MOVED_TO_DATA} | {"data": data}
        moved = ", ".join(f"{key} as data.{MOVED_TO_DATA[key]}" for key in old)
        print(f"{path}: read the old top-level {moved} (the layout before the files moved to data)", file=sys.stderr)
    try:
        return from_dict(FinetuneConfig, saved)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def make_task(config: FinetuneConfig) -> Task:
    """The ``Task`` of ``config.task``'s kind with the config's reading and decoding options."""
    kind, options, data = TASKS[config.task].kind, config.finetune, config.data
    if kind == "span":
        return SpanTask(
            options.max_seq_len, options.doc_stride, options.max_query_len, options.n_best, options.max_answer_len,
            data.skip_bad,
        )  # fmt: skip
    if kind == "ner":
        return NerTask(options.max_seq_len, options.doc_stride, data.scheme, data.skip_bad)
    sequence = RegressionTask if kind == "regression" else ClassificationTask
    return sequence(config.task, options.max_seq_len, data.text_fields, data.label_field, data.skip_bad)


# ---------------------------------------------------------------------------------------------
# Batches and prediction

_LABEL_KEYS = ("labels", "start_positions", "end_positions")


def collate(rows: list[dict], with_labels: bool = True) -> dict:
    """Pad list-valued fields to the longest row (labels with ``IGNORE_INDEX``, ids with 0) and stack the
    rest; adds ``attention_mask``. Int fields become int64, float fields float32."""
    batch = {}
    length = max(len(r["input_ids"]) for r in rows)
    for key in rows[0]:
        if key in _LABEL_KEYS and not with_labels:
            continue
        values = [r[key] for r in rows]
        if isinstance(values[0], list):
            fill = IGNORE_INDEX if key == "labels" else 0
            batch[key] = torch.tensor([v + [fill] * (length - len(v)) for v in values], dtype=torch.long)
        else:
            dtype = torch.float32 if isinstance(values[0], float) else torch.long
            batch[key] = torch.tensor(values, dtype=dtype)
    lengths = [len(r["input_ids"]) for r in rows]
    batch["attention_mask"] = torch.tensor([[1] * n + [0] * (length - n) for n in lengths])
    return batch


def make_batches(rows: list[dict], batch_size: int, grad_accum_steps: int, seed: int):
    """The ``batches(start_micro_step, rank, world_size)`` of ``lub_fast.train`` over ``rows``.

    Optimizer step ``s`` is step ``k = s mod steps_per_epoch`` of epoch ``e``: examples
    ``perm_e[k * batch_size : (k + 1) * batch_size]`` of the permutation seeded by ``(seed, e)``
    (an epoch's last, short batch is topped up from the epoch's start when it has fewer examples
    than micro-batches), split evenly into ``world_size * grad_accum_steps`` micro-batches: the
    ``j``-th of rank ``r``'s window is part ``j * world_size + r``.
    """
    n = len(rows)
    steps_per_epoch = math.ceil(n / batch_size)

    def batches(start: int, rank: int, world_size: int):
        slots = world_size * grad_accum_steps
        if batch_size % slots:
            raise ValueError(
                f"batch_size {batch_size} is not a multiple of world size {world_size} x "
                f"grad_accum_steps {grad_accum_steps}"
            )
        epoch, order = None, None
        m = start
        while True:
            step, j = divmod(m, grad_accum_steps)
            e, k = divmod(step, steps_per_epoch)
            if e != epoch:
                epoch, order = e, np.random.default_rng([seed, e]).permutation(n)
            chosen = order[k * batch_size : (k + 1) * batch_size]
            if len(chosen) < slots:
                chosen = np.concatenate([chosen, order[: slots - len(chosen)]])
            part = np.array_split(chosen, slots)[j * world_size + rank]
            yield collate([rows[i] for i in part])
            m += 1

    return batches, steps_per_epoch


@torch.no_grad()
def predict(model: nn.Module, task: Task, split: Split, batch_size: int, device, rank=0, world_size=1) -> list:
    """``task.row_outputs`` of every row of ``split`` (rows ``rank::world_size`` on each rank,
    gathered on all ranks). Runs under the caller's autocast."""
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(split.rows), world_size))
    outputs = []
    for first in range(0, len(mine), batch_size):
        rows = [split.rows[i] for i in mine[first : first + batch_size]]
        batch = {k: v.to(device) for k, v in collate(rows, with_labels=False).items()}
        outputs += task.row_outputs(model(**batch), [len(r["input_ids"]) for r in rows])
    model.train(was_training)
    if world_size == 1:
        return outputs
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (mine, outputs))
    result = [None] * len(split.rows)
    for indices, values in gathered:
        for i, v in zip(indices, values):
            result[i] = v
    return result


# ---------------------------------------------------------------------------------------------
# The model: build, export, load


def build_model(config: FinetuneConfig, head: Head) -> nn.Module:
    """The task model on ``config.model``'s encoder (a new head seeded by ``train.seed`` where the
    checkpoint has none), with ``head``'s loss."""
    torch.manual_seed(config.train.seed)
    kwargs = {} if head.num_labels is None else {"num_labels": head.num_labels}
    if head.problem_type is not None:
        kwargs["problem_type"] = head.problem_type
    try:
        model = from_pretrained(config.model, task=head.task, **kwargs)
    except ValueError as error:
        raise ConfigError(f"--model {config.model}: {error}") from None
    room = model.config.max_position_embeddings - model.config.position_offset
    if config.finetune.max_seq_len > room:
        raise ConfigError(f"--finetune.max_seq_len={config.finetune.max_seq_len} exceeds the model's {room} positions")
    return model


def export_model(model: nn.Module, path: Path, labels: tuple | None = None, tokenizer: dict[str, bytes] | None = None) -> None:
    """``model`` as an HF directory at ``path`` (``labels``: its ``id2label`` names; ``tokenizer``: the
    tokenizer files of the model it started from, which ``save_pretrained`` checks and completes):
    written into a temporary directory, then swapped in."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tokenizer, labels=labels)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_exported(path: Path, device) -> nn.Module:
    """The model that ``export_model`` wrote to ``path``, on ``device``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export holds every weight of its architecture
        return from_pretrained(path).to(device)


class _Run(nn.Module):
    """The objective plus the dev-metric record (buffers, so that checkpoints carry it):
    evaluations done, best value and its step, evaluations since the best."""

    def __init__(self, objective: nn.Module):
        super().__init__()
        self.objective = objective
        self.register_buffer("evals", torch.zeros((), dtype=torch.long))
        self.register_buffer("best", torch.full((), -math.inf, dtype=torch.float64))
        self.register_buffer("best_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("since_best", torch.zeros((), dtype=torch.long))

    def forward(self, batch):
        return self.objective(batch)


# ---------------------------------------------------------------------------------------------
# The run


def _read(task: Task, path: str, labels, training: bool = False):
    data = task.read(path, labels, training)
    for rule, ids in sorted(data.repairs.items()):
        shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
        print(f"{path}: kept, repaired: {rule}: {len(ids)} ({shown})", file=sys.stderr)
    for rule, count in sorted(data.skipped.items()):
        print(f"{path}: skipped {count} line(s): {rule}", file=sys.stderr)
    if not data.examples:
        raise TaskDataError(path, 0, "no usable examples")
    return data


def finetune(config: FinetuneConfig, resume: str | None = None) -> dict | None:
    """Fine-tune, export the best model, predict dev/test; returns the report written to
    ``metrics.json`` on rank 0 (None on the others). ``Preempted`` when SIGTERM stopped it."""
    spec, task, options = TASKS[config.task], make_task(config), config.finetune
    env = init_distributed(config.train.device)
    main = env.rank == 0
    output = Path(config.output)
    tokenizer = load_tokenizer(config.model)
    train_data = _read(task, config.data.train, config.data.labels, training=True)
    if not train_data.has_labels:
        raise TaskDataError(config.data.train, 0, "the training file has no labels")
    splits = {"train": task.features(train_data, tokenizer)}
    for name, path in (("dev", config.data.dev), ("test", config.data.test)):
        if path:
            splits[name] = task.features(_read(task, path, train_data.labels), tokenizer)
    if not splits["dev"].data.has_labels:
        raise TaskDataError(config.data.dev, 0, "the dev file has no labels")

    batches, steps_per_epoch = make_batches(
        splits["train"].rows, options.batch_size, config.train.grad_accum_steps, config.train.seed
    )
    total = options.epochs * steps_per_epoch
    eval_every = min(options.eval_every or steps_per_epoch, total)
    warmup = round(options.warmup_ratio * total)
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, total_steps=total, warmup_steps=warmup, eval_every=eval_every)
    )
    head = task.head(train_data.labels)
    model = build_model(config, head)
    tokenizer_files = read_tokenizer_files(config.model)
    run_module = _Run(objective_for(model))
    best_dir = output / "best_model"

    def evaluate(module: _Run) -> dict:
        module.evals += 1
        step = min(int(module.evals) * eval_every, total)
        dev = splits["dev"]
        outputs = predict(model, task, dev, options.eval_batch_size, env.device, env.rank, env.world_size)
        metrics = task.score(dev, task.decode(dev, outputs))
        value = metrics[spec.metric] if math.isfinite(metrics[spec.metric]) else -math.inf
        if int(module.evals) == 1 or value > float(module.best):
            module.best.fill_(value)
            module.best_step.fill_(step)
            module.since_best.zero_()
            if main:
                export_model(model, best_dir, head.labels, tokenizer_files)
        else:
            module.since_best += 1
        stop = bool(options.patience and int(module.since_best) >= options.patience and step < total)
        return {**metrics, f"best_{spec.metric}": float(module.best), "stop": stop}

    extra = {}
    if options.layer_decay != 1.0:
        extra["param_groups"] = layerwise_param_groups(
            model, config.train.lr, config.train.weight_decay, options.layer_decay
        )
    if main:
        counts = ", ".join(f"{n} {len(s.data.examples)}" for n, s in splits.items())
        print(
            f"{config.task}: {counts} examples; {total} steps ({options.epochs} epochs x {steps_per_epoch}), "
            f"dev every {eval_every}",
            file=sys.stderr,
        )
    result = train(
        run_module, batches, config.train, output, eval_fn=evaluate, resume=resume, run_config=config, **extra
    )
    if result.interrupted:
        raise Preempted(f"stopped by SIGTERM at step {result.step} of {total} after saving; continue with --resume")
    if result.stopped_early and main:
        print(
            f"early stop at step {result.step}: {options.patience} evaluations without a better dev {spec.metric}",
            file=sys.stderr,
        )
    if not main:
        return None
    report = {
        "task": config.task,
        "metric": spec.metric,
        "best_step": int(run_module.best_step),
        "total_steps": total,
        "stopped_early": result.stopped_early,
        "examples": {name: len(s.data.examples) for name, s in splits.items()},
        "skipped": {name: s.data.skipped for name, s in splits.items() if s.data.skipped},
        "repaired": {
            name: {rule: len(ids) for rule, ids in s.data.repairs.items()}
            for name, s in splits.items()
            if s.data.repairs
        },
    }
    return _predict_with_best(config, task, splits, best_dir, env.device, report)


def _predict_with_best(config, task, splits, best_dir, device, report) -> dict:
    """Rank 0: the best export predicts dev and test; writes the predictions and ``metrics.json``."""
    output = Path(config.output)
    best = load_exported(best_dir, device)
    amp = AMP_DTYPES.get(resolve_precision(config.train.precision, device))
    for name in ("dev", "test"):
        if name not in splits:
            continue
        split = splits[name]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outputs = predict(best, task, split, config.finetune.eval_batch_size, device)
        predictions = task.decode(split, outputs)
        task.write_predictions(output / f"{name}_predictions{task.prediction_suffix}", split, predictions)
        if name == "test":
            submission, reason = clue_submission_name(config.task, split.data.path, split.data.labels)
            if submission is not None:
                task.write_predictions(output / submission, split, predictions, submission=True)
            elif reason:
                print(f"no CLUE submission file: {reason}", file=sys.stderr)
        if split.data.has_labels:
            report[name] = task.score(split, predictions)
    (output / "metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report
