"""Fine-tune an encoder on a Chinese task and evaluate it: ``python -m lub_fast.finetune``.

    python -m lub_fast.finetune --task afqmc --model chinese-roberta-wwm-ext \\
        --train afqmc/train.json --dev afqmc/dev.json --test afqmc/test.json --output runs/afqmc \\
        --train.precision=bf16 --finetune.layer_decay=0.9

Tasks, readers, metrics and submission formats are ``lub_fast.tasks``; the models are
``lub_fast.models`` (an HF directory of a base, MLM or task checkpoint gets a freshly initialised
task head); the objectives are ``lub_fast.objectives.finetune``; training is the shared loop
``lub_fast.train`` (AMP, DDP under torchrun, exact resume, metrics.jsonl, loss.png).

Recipe (Devlin et al. 2019; CLUE baselines, https://github.com/CLUEbenchmark/CLUE; HFL's
Chinese-BERT-wwm, https://github.com/ymcui/Chinese-BERT-wwm): AdamW, linear warmup over
``warmup_ratio`` of the steps then linear decay to 0, ``epochs`` passes over the training data
with ``batch_size`` examples per optimizer step (all ranks and accumulation steps together), so
``total_steps = epochs * ceil(train examples / batch_size)``. Optional layer-wise learning-rate
decay (Clark et al. 2020, ELECTRA; Sun et al. 2019, "How to Fine-Tune BERT for Text
Classification"): layer ``l`` of ``L`` trains at ``lr * layer_decay ** (L + 1 - l)``, the embeddings
(``l = 0``) slowest, the head and pooler at ``lr``.

Inputs: WordPiece ids from the model directory's ``tokenizer.json`` or ``vocab.txt`` (BERT's
basic tokenization: Chinese characters split, lower-cased, accents stripped); ``[CLS] a [SEP] b
[SEP]`` with token types 0/1, pairs cut longest-first to ``max_seq_len`` (BERT's
``_truncate_seq_pair``); each micro-batch padded to its longest row. CMRC 2018 uses sliding
windows and n-best answer search (``lub_fast.tasks.cmrc2018``), NER scores a character's first
word piece (``lub_fast.tasks.ner``).

Epoch ``e`` visits the training examples in the order of a permutation seeded by ``(seed, e)``;
micro-batch ``m`` of rank ``r`` is a pure function of ``(m, r, world size)``, so ``--resume``
continues exactly. The dev set is scored every epoch (or every ``eval_every`` steps); a better dev
metric exports the model to ``output/best_model/`` (an HF directory with ``id2label``/``label2id``
and the tokenizer files, loadable by ``transformers``' ``AutoModelFor...`` classes); ``patience``
evaluations without improvement stop training. The best metric and the patience counter are kept
in the checkpoints, so a resumed run makes the same choices. At the end the best model predicts dev
and test: ``output/metrics.json`` and ``output/{dev,test}_predictions.jsonl`` (CLUE json lines
``{"id", "label"}``; NER ``{"id", "text", "label": {type: {entity: [[start, end]]}}}``) or
``.json`` (CMRC 2018 ``{id: answer}``); for a CLUE task the test predictions also go to
``output/<CLUE's file name>`` (``afqmc_predict.json``, ``tnews11_predict.json``,
``cmrc2018_predict.json``, ``cluener_predict.json`` ...: ``lub_fast.tasks.io``) to upload as they are.
CMRC 2018 trains on each question's first gold answer found verbatim in the context and scores
every question against every gold answer, as the official scorer (``lub_fast.tasks.cmrc2018``).

Exit status: 0 done; 2 bad arguments or data (one line naming the file and line); 143 stopped by
SIGTERM after saving a checkpoint (continue with ``--resume``).
"""

import argparse
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

from lub_fast.config_cli import (
    ConfigError,
    apply_overrides,
    check_fields,
    describe,
    load_config,
    option,
    output_dir,
    split_overrides,
)
from lub_fast.errors import EXIT_CODES_HELP, EXIT_PREEMPTED, EXIT_USAGE, Preempted, run_command
from lub_fast.lock import output_lock
from lub_fast.models.hf import from_pretrained
from lub_fast.objectives.finetune import objective_for
from lub_fast.ops.wwm import IGNORE_INDEX
from lub_fast.optim import param_groups
from lub_fast.tasks import TASKS, TaskDataError, load_task
from lub_fast.tasks import metrics as task_metrics
from lub_fast.tasks.cmrc2018 import build_features, postprocess, special_id, trainable_questions
from lub_fast.tasks.io import (
    clue_submission_name,
    write_clue_predictions,
    write_cmrc2018_predictions,
    write_ner_predictions,
)
from lub_fast.tasks.ner import decode_tags, encode_windows, label_ids, tags_to_spans
from lub_fast.train import (
    AMP_DTYPES,
    TrainConfig,
    init_distributed,
    resolve_precision,
    shutdown_distributed,
    train,
)

_HEAD = {
    "classification": "sequence_classification",
    "regression": "sequence_classification",
    "ner": "token_classification",
    "span": "question_answering",
}
_DERIVED = ("train.total_steps", "train.warmup_steps", "train.eval_every")
EXIT_BAD_INPUT = EXIT_USAGE
EXIT_INTERRUPTED = EXIT_PREEMPTED


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
class FinetuneConfig:
    """One fine-tuning run: what (set by the command's flags) and how (``finetune``, ``train``)."""

    task: Literal[tuple(TASKS)] = option("classification", "task name (--task)")
    model: str = option("", "HF model directory to start from (--model)")
    train_file: str = option("", "training data (--train)")
    dev_file: str = option("", "dev data: picks the best checkpoint (--dev)")
    test_file: str | None = option(None, "test data, labelled or not (--test)")
    output: str = option("", "output directory (--output)", check=output_dir)
    labels: str | None = option(None, "label set file; default: the training file's labels (--labels)")
    text_fields: tuple[str, ...] | None = option(None, "task 'classification': text fields (--text-fields)")
    label_field: str | None = option(None, "task 'classification': label field (--label-field)")
    scheme: Literal["bio", "bioes", "bmes"] | None = option(None, "ner: re-tag in this scheme (--scheme)")
    skip_bad: bool = option(False, "drop and count bad lines instead of stopping (--skip-bad)")
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_fields(self, command=True)
        kind = TASKS[self.task].kind
        if self.labels is not None and kind == "span":
            raise ValueError("cmrc2018 takes no label set (--labels)")
        if (self.text_fields is not None or self.label_field is not None) and self.task != "classification":
            raise ValueError("--text-fields and --label-field are for the generic 'classification' task")
        if self.scheme is not None and kind != "ner":
            raise ValueError("--scheme is for the 'ner' task")


def default_config(task: str) -> FinetuneConfig:
    """The defaults of ``task``: its ``TaskSpec`` lr, epochs, batch size and sequence length."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    spec = TASKS[task]
    options = FinetuneOptions(epochs=spec.epochs, batch_size=spec.batch_size, max_seq_len=spec.max_seq_len)
    return FinetuneConfig(task=task, finetune=options, train=TrainConfig(lr=spec.lr, keep_last=1))


# ---------------------------------------------------------------------------------------------
# Tokenization and features


def load_tokenizer(model_dir):
    """The model directory's tokenizer as an HF ``tokenizers.Tokenizer`` (no specials added).

    ``tokenizer.json`` when present (its truncation and padding turned off), else ``vocab.txt``
    through BERT's Chinese pipeline (``lub_fast.data.tokenizer.hf_tokenizer``). Both are checked by
    ``lub_fast.data.tokenizer.model_vocab``: a ``tokenizer.json`` that is not WordPiece, or that
    disagrees with ``vocab.txt``, raises ``VocabularyError``.
    """
    from tokenizers import Tokenizer

    from lub_fast.data.tokenizer import hf_tokenizer, model_vocab

    path = Path(model_dir)
    model_vocab(path)
    if (path / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return tokenizer
    if (path / "vocab.txt").exists():
        return hf_tokenizer(path / "vocab.txt")
    raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")


def truncate_pair(a: list, b: list | None, max_tokens: int) -> tuple[list, list | None]:
    """Cut ``a`` and ``b`` to ``max_tokens`` in total, one token at a time from the end of the
    longer (``b`` on ties), as BERT's ``_truncate_seq_pair``."""
    a = list(a)
    b = None if b is None else list(b)
    while len(a) + (len(b) if b is not None else 0) > max_tokens:
        if b is not None and len(b) >= len(a):
            b.pop()
        else:
            a.pop()
    return a, b


def encode_texts(tokenizer, examples, max_seq_len: int) -> list[dict]:
    """``[CLS] a [SEP] (b [SEP])`` ids and token types of ``TextExample``s."""
    cls, sep = special_id(tokenizer, "[CLS]"), special_id(tokenizer, "[SEP]")
    first = tokenizer.encode_batch([e.text_a for e in examples], add_special_tokens=False)
    pairs = [e for e in examples if e.text_b is not None]
    second = iter(tokenizer.encode_batch([e.text_b for e in pairs], add_special_tokens=False))
    rows = []
    for example, enc_a in zip(examples, first):
        ids_b = next(second).ids if example.text_b is not None else None
        a, b = truncate_pair(enc_a.ids, ids_b, max_seq_len - (3 if ids_b is not None else 2))
        ids = [cls] + a + [sep] + ([] if b is None else b + [sep])
        rows.append({"input_ids": ids, "token_type_ids": [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)})
    return rows


@dataclass
class Split:
    """One data file: ``data`` (``TaskData``), model ``rows`` (dicts of lists/numbers, one per
    model input), and for CMRC 2018 the windows (``QAFeature``s, one per row) or for NER, per row
    (a window of a sentence), its example in ``row_example`` and the piece-to-character
    ``positions`` whose prediction this window gives."""

    data: object
    rows: list
    windows: list | None = None
    positions: list | None = None
    row_example: list | None = None


def build_split(data, kind, tokenizer, options: FinetuneOptions) -> Split:
    """Features of one file; labels are attached when the file has them."""
    if kind == "span":
        windows = build_features(
            data.examples, tokenizer, options.max_seq_len, options.doc_stride, options.max_query_len
        )
        rows = [
            {
                "input_ids": list(w.input_ids),
                "token_type_ids": list(w.token_type_ids),
                "start_positions": w.start_position,
                "end_positions": w.end_position,
            }
            for w in windows
        ]
        return Split(data, rows, windows=windows)
    if kind == "ner":
        label_to_id = {t: i for i, t in enumerate(data.labels)}
        rows, owned_positions, row_example = [], [], []
        for index, example in enumerate(data.examples):
            # Sentences longer than max_seq_len become overlapping windows (nothing is cut).
            for ids, pos, owned in encode_windows(example.tokens, tokenizer, options.max_seq_len, options.doc_stride):
                row = {"input_ids": ids, "token_type_ids": [0] * len(ids)}
                if data.has_labels:
                    row["labels"] = label_ids(pos, example.tags, label_to_id)
                rows.append(row)
                owned_positions.append(owned)
                row_example.append(index)
        return Split(data, rows, positions=owned_positions, row_example=row_example)
    rows = encode_texts(tokenizer, data.examples, options.max_seq_len)
    if data.has_labels:
        label_to_id = None if kind == "regression" else {n: i for i, n in enumerate(data.labels)}
        for row, example in zip(rows, data.examples):
            row["labels"] = float(example.label) if label_to_id is None else label_to_id[example.label]
    return Split(data, rows)


_LABEL_KEYS = ("labels", "start_positions", "end_positions")


def collate(rows: list[dict], with_labels: bool = True) -> dict:
    """Pad list-valued fields to the longest row (labels with -100, ids with 0) and stack the
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


# ---------------------------------------------------------------------------------------------
# Prediction and scoring


@torch.no_grad()
def predict(
    model: nn.Module, split: Split, kind: str, batch_size: int, device, rank: int = 0, world_size: int = 1
) -> list:
    """Raw outputs per row (rows ``rank::world_size`` on each rank, gathered on all ranks):
    class logits (float32 numpy ``[C]``), NER predicted label ids per piece, or CMRC 2018
    ``(start_logits, end_logits)`` over the row's pieces. Runs under the caller's autocast."""
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(split.rows), world_size))
    outputs = []
    for first in range(0, len(mine), batch_size):
        index = mine[first : first + batch_size]
        rows = [split.rows[i] for i in index]
        batch = {k: v.to(device) for k, v in collate(rows, with_labels=False).items()}
        out = model(**batch)
        lengths = [len(r["input_ids"]) for r in rows]
        if kind == "span":
            starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            outputs += [(s[:n], e[:n]) for s, e, n in zip(starts, ends, lengths)]
        elif kind == "ner":
            ids = out.logits.argmax(-1).cpu().numpy()
            outputs += [row[:n] for row, n in zip(ids, lengths)]
        else:
            outputs += list(out.logits.float().cpu().numpy())
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


def decode(split: Split, kind: str, outputs: list, options: FinetuneOptions) -> list | dict:
    """Predictions per example: label names, scores, NER tag lists, or CMRC ``{id: answer}``."""
    data = split.data
    if kind == "span":
        return postprocess(
            split.windows,
            [o[0] for o in outputs],
            [o[1] for o in outputs],
            n_best=options.n_best,
            max_answer_len=options.max_answer_len,
        )
    if kind == "ner":
        tags = [["O"] * len(example.tokens) for example in data.examples]
        for index, positions, ids in zip(split.row_example, split.positions, outputs):
            decode_tags(positions, ids, len(tags[index]), data.labels, tags[index])
        return tags
    if kind == "regression":
        return [float(o[0]) for o in outputs]
    return [data.labels[int(np.argmax(o))] for o in outputs]


def score(split: Split, kind: str, predictions) -> dict:
    """The task's metrics of ``predictions`` against the split's gold labels."""
    examples = split.data.examples
    if kind == "span":
        return task_metrics.cmrc2018_score(examples, predictions)
    if kind == "ner":
        result = task_metrics.entity_f1([e.tags for e in examples], predictions)
        return {"entity_f1": result["f1"], "entity_precision": result["precision"], "entity_recall": result["recall"]}
    golds = [e.label for e in examples]
    if kind == "regression":
        mse = float(np.mean((np.asarray(predictions) - np.asarray(golds)) ** 2))
        return {
            "pearson": task_metrics.pearson(predictions, golds),
            "spearman": task_metrics.spearman(predictions, golds),
            "mse": mse,
        }
    return {
        "accuracy": task_metrics.accuracy(predictions, golds),
        "macro_f1": task_metrics.macro_f1(predictions, golds),
    }


def write_predictions(path_stem: Path, split: Split, kind: str, predictions) -> Path:
    """The task's submission file next to ``path_stem`` (``.json`` for CMRC 2018, else ``.jsonl``)."""
    examples = split.data.examples
    if kind == "span":
        path = path_stem.with_suffix(".json")
        write_cmrc2018_predictions(path, predictions)
        return path
    path = path_stem.with_suffix(".jsonl")
    ids = [e.id for e in examples]
    if kind == "ner":
        write_ner_predictions(path, ids, [e.tokens for e in examples], [tags_to_spans(t) for t in predictions])
    else:
        write_clue_predictions(path, ids, predictions)
    return path


def write_submission(output: Path, task: str, kind: str, split: Split, predictions) -> Path | None:
    """CLUE's submission file of ``predictions`` (test) in ``output`` under CLUE's name
    (``lub_fast.tasks.io.clue_submission_name``), or None for a task CLUE does not rank; prints
    why when a CLUE task's predictions cannot be submitted as they are."""
    name, reason = clue_submission_name(task, split.data.path, split.data.labels)
    if name is None:
        if reason:
            print(f"no CLUE submission file: {reason}", file=sys.stderr)
        return None
    path = output / name
    examples = split.data.examples
    if kind == "span":
        write_cmrc2018_predictions(path, predictions)
    elif kind == "ner":
        spans = [tags_to_spans(t) for t in predictions]
        write_ner_predictions(path, [e.id for e in examples], [e.tokens for e in examples], spans, with_text=False)
    else:
        write_clue_predictions(path, [e.id for e in examples], [str(p) for p in predictions])
    return path


# ---------------------------------------------------------------------------------------------
# Optimizer groups, best-model tracking


def layerwise_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Optimizer groups with layer-wise learning-rate decay for a task model of ``lub_fast.models``.

    Depth ``0``: embeddings (and ALBERT/ELECTRA's embedding projection); ``l``: encoder layer
    ``l`` (an ALBERT layer shared by several positions takes its deepest one); ``L + 1``: pooler
    and head. Group ``lr`` = ``lr * layer_decay ** (L + 1 - depth)``; weight decay as
    ``lub_fast.optim.param_groups`` (none on biases and LayerNorm). Groups in depth order.
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


def _export(model: nn.Module, path: Path) -> None:
    """``save_pretrained`` into a temporary directory, then swap it in."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The command


def _parser() -> argparse.ArgumentParser:
    rows = "\n".join(
        f"  {s.name:<15}{s.kind:<15}{s.metric:<10}{s.lr:<8g}{s.epochs:<8}{s.batch_size:<7}{s.max_seq_len}"
        for s in TASKS.values()
    )
    parser = argparse.ArgumentParser(
        prog="python -m lub_fast.finetune",
        description="Fine-tune an encoder (an HF directory) on a Chinese task; write metrics, predictions and "
        "the best model as an HF directory.\n\nTask defaults (--train.lr, --finetune.epochs, --finetune.batch_size, "
        "--finetune.max_seq_len):\n"
        + f"  {'task':<15}{'kind':<15}{'metric':<10}{'lr':<8}{'epochs':<8}{'batch':<7}max_seq_len\n"
        + rows,
        epilog="Overrides (--section.field=VALUE; total_steps, warmup_steps and eval_every are derived):\n  "
        + "\n  ".join(
            line
            for line in describe(default_config("classification"))
            if line.startswith(("--finetune.", "--train.")) and not line.startswith(tuple(f"--{d}=" for d in _DERIVED))
        )
        + "\n\n"
        + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--task", choices=sorted(TASKS), help="the task (sets the defaults above)")
    add("--model", help="HF model directory (bert, roberta, albert, electra; base, MLM or task checkpoint)")
    add("--train", dest="train_file", metavar="FILE", help="training file")
    add("--dev", dest="dev_file", metavar="FILE", help="dev file (labelled): picks the best checkpoint")
    add("--test", dest="test_file", metavar="FILE", help="test file, labelled or not: predicted by the best model")
    add("--output", metavar="DIR", help="output directory (checkpoints, metrics, predictions, best_model/)")
    add("--labels", metavar="FILE", help="label set (one a line, or CLUE labels.json); default: the training labels")
    add("--text-fields", metavar="A[,B]", help="task classification: one or two json fields, TSV headers or columns")
    add("--label-field", metavar="NAME", help="task classification: the label's json field, TSV header or column")
    add("--scheme", choices=("bio", "bioes", "bmes"), help="ner: re-tag the data in this scheme (default: as the file)")
    add("--skip-bad", action="store_true", default=None, help="drop bad lines and print their counts; default: stop")
    add("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
        help="continue the run in --output: from its latest checkpoint, or from this one")
    add("--config", metavar="FILE", help="start from a saved config (output/config.json) instead of the task defaults")
    return parser


def resolve(argv) -> tuple[FinetuneConfig, str | None]:
    """Command line -> ``(config, resume)``. Raises ``ConfigError`` for bad or missing arguments."""
    overrides, rest = split_overrides(argv)
    args = _parser().parse_args(rest)
    derived = [o.partition("=")[0] for o in overrides if o.partition("=")[0] in _DERIVED]
    if derived:
        raise ConfigError(f"{derived[0]} is derived (from --finetune.epochs, warmup_ratio, eval_every); do not set it")
    if args.config:
        config = load_config(FinetuneConfig, args.config)
    elif args.task:
        config = default_config(args.task)
    else:
        raise ConfigError("--task is required (or --config)")
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume") and v is not None}
    if "text_fields" in flags:
        flags["text_fields"] = tuple(f.strip() for f in flags["text_fields"].split(","))
    try:
        config = dataclasses.replace(config, **flags)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    config = apply_overrides(config, overrides)
    required = (("--model", "model"), ("--train", "train_file"), ("--dev", "dev_file"), ("--output", "output"))
    missing = [flag for flag, name in required if not getattr(config, name)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    return config, args.resume


def _load(config: FinetuneConfig, path: str, labels, training: bool = False) -> object:
    kind = TASKS[config.task].kind
    kwargs = {"skip_bad": config.skip_bad}
    if kind != "span":
        kwargs["labels"] = labels
    if config.task == "classification":
        kwargs.update(text_fields=config.text_fields, label_field=config.label_field)
    if kind == "ner":
        kwargs["scheme"] = config.scheme
    data = load_task(config.task, path, **kwargs)
    if kind == "span" and training:
        data = trainable_questions(data)
    for rule, ids in sorted(data.repairs.items()):
        shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
        print(f"{path}: kept, repaired: {rule}: {len(ids)} ({shown})", file=sys.stderr)
    for rule, count in sorted(data.skipped.items()):
        print(f"{path}: skipped {count} line(s): {rule}", file=sys.stderr)
    if not data.examples:
        raise TaskDataError(path, 0, "no usable examples")
    return data


def build_model(config: FinetuneConfig, labels: tuple | None) -> nn.Module:
    """The task model on ``config.model``'s encoder (a new head seeded by ``train.seed`` where the
    checkpoint has none), with the label names and loss type that its HF export records."""
    kind = TASKS[config.task].kind
    kwargs = {} if kind == "span" else {"num_labels": 1 if kind == "regression" else len(labels)}
    torch.manual_seed(config.train.seed)
    try:
        model = from_pretrained(config.model, task=_HEAD[kind], **kwargs)
    except ValueError as error:
        raise ConfigError(f"--model {config.model}: {error}") from None
    room = model.config.max_position_embeddings - model.config.position_offset
    if config.finetune.max_seq_len > room:
        raise ConfigError(f"--finetune.max_seq_len={config.finetune.max_seq_len} exceeds the model's {room} positions")
    if kind in ("classification", "regression"):
        model.problem_type = "regression" if kind == "regression" else "single_label_classification"
    if kind in ("classification", "ner"):
        model.id2label = dict(enumerate(labels))
    if not any(name in model.tokenizer_files for name in ("tokenizer_config.json", "tokenizer.json")):
        settings = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": True,
            "tokenize_chinese_chars": True,
            "model_max_length": model.config.max_position_embeddings,
        }
        model.tokenizer_files["tokenizer_config.json"] = (json.dumps(settings, indent=2) + "\n").encode()
    return model


def run(config: FinetuneConfig, resume: str | None = None) -> None:
    """Fine-tune, export the best model, predict dev/test; ``Preempted`` when SIGTERM stopped it."""
    spec = TASKS[config.task]
    kind, options = spec.kind, config.finetune
    env = init_distributed(config.train.device)
    main = env.rank == 0
    output = Path(config.output)
    tokenizer = load_tokenizer(config.model)
    train_data = _load(config, config.train_file, config.labels, training=True)
    if not train_data.has_labels:
        raise TaskDataError(config.train_file, 0, "the training file has no labels")
    splits = {"train": build_split(train_data, kind, tokenizer, options)}
    for name, path in (("dev", config.dev_file), ("test", config.test_file)):
        if path:
            splits[name] = build_split(_load(config, path, train_data.labels), kind, tokenizer, options)
    if not splits["dev"].data.has_labels:
        raise TaskDataError(config.dev_file, 0, "the dev file has no labels")

    batches, steps_per_epoch = make_batches(
        splits["train"].rows, options.batch_size, config.train.grad_accum_steps, config.train.seed
    )
    total = options.epochs * steps_per_epoch
    eval_every = min(options.eval_every or steps_per_epoch, total)
    warmup = round(options.warmup_ratio * total)
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, total_steps=total, warmup_steps=warmup, eval_every=eval_every)
    )
    model = build_model(config, train_data.labels)
    run_module = _Run(objective_for(model))
    best_dir = output / "best_model"

    def evaluate(module: _Run) -> dict:
        module.evals += 1
        step = min(int(module.evals) * eval_every, total)
        dev = splits["dev"]
        outputs = predict(model, dev, kind, options.eval_batch_size, env.device, env.rank, env.world_size)
        metrics = score(dev, kind, decode(dev, kind, outputs, options))
        value = metrics[spec.metric] if math.isfinite(metrics[spec.metric]) else -math.inf
        if int(module.evals) == 1 or value > float(module.best):
            module.best.fill_(value)
            module.best_step.fill_(step)
            module.since_best.zero_()
            if main:
                _export(model, best_dir)
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
    stopped_early = result.stopped_early
    if stopped_early and main:
        print(
            f"early stop at step {result.step}: {options.patience} evaluations without a better dev {spec.metric}",
            file=sys.stderr,
        )
    if main:
        _final(config, splits, kind, best_dir, run_module, stopped_early, env.device)


def _final(config, splits, kind, best_dir, run_module, stopped_early, device) -> None:
    """Rank 0: reload the best export, predict dev and test, write metrics.json and predictions."""
    output = Path(config.output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export holds every weight of its architecture
        best = from_pretrained(best_dir).to(device)
    amp = AMP_DTYPES.get(resolve_precision(config.train.precision, device))
    report = {
        "task": config.task,
        "metric": TASKS[config.task].metric,
        "best_step": int(run_module.best_step),
        "total_steps": config.train.total_steps,
        "stopped_early": stopped_early,
        "examples": {name: len(s.data.examples) for name, s in splits.items()},
        "skipped": {name: s.data.skipped for name, s in splits.items() if s.data.skipped},
        "repaired": {
            name: {rule: len(ids) for rule, ids in s.data.repairs.items()}
            for name, s in splits.items()
            if s.data.repairs
        },
    }
    for name in ("dev", "test"):
        if name not in splits:
            continue
        split = splits[name]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            outputs = predict(best, split, kind, config.finetune.eval_batch_size, device)
        predictions = decode(split, kind, outputs, config.finetune)
        write_predictions(output / f"{name}_predictions", split, kind, predictions)
        if name == "test":
            write_submission(output, config.task, kind, split, predictions)
        if split.data.has_labels:
            report[name] = score(split, kind, predictions)
    (output / "metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = {k: v for k, v in report.items() if k in ("task", "best_step", "dev", "test")}
    print(json.dumps(summary, ensure_ascii=False))


def main(argv=None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""

    def body():
        try:
            config, resume = resolve(sys.argv[1:] if argv is None else argv)
            with output_lock(config.output, "finetune"):
                run(config, resume)
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from None
        finally:
            shutdown_distributed()

    return run_command("finetune", body)


if __name__ == "__main__":
    sys.exit(main())
