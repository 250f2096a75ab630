"""``python -m lub_fast.distill``: pretraining distillation of a teacher encoder into a student
(DistilBERT, Sanh et al. 2019, arXiv 1910.01108), with the teacher in the loop or cached.

    # online: the teacher runs in the loop (eval mode, no gradient)
    python -m lub_fast.distill --teacher T_DIR --student small --data SHARDS --output RUN
    # two steps: 1) the teacher's outputs over every training micro-batch, 2) the student on them
    python -m lub_fast.distill --teacher T_DIR --data SHARDS --cache-teacher CACHE --steps N
    python -m lub_fast.distill --teacher T_DIR --student small --data SHARDS --cache CACHE --output RUN --steps N

``--teacher``: an HF directory with an MLM head (bert, roberta, albert, electra generator), or a
``lub_fast.pretrain`` run directory (its ``hf/`` export). ``--student``: an HF directory to continue
from (the seed's recipe: a base model), or a size preset (tiny/small/base/large) of the teacher's
family with the teacher's vocabulary, positions and activation, shaped by ``--student.*``
overrides. A preset student whose widths (hidden, intermediate, embedding size, heads) equal the
teacher's is initialised from it as DistilBERT was (``--student.init=auto``; ``teacher`` insists,
``random`` declines): embeddings, embedding projection and MLM head copied, student layer ``i`` of
``n`` from teacher layer ``round(i * (N - 1) / (n - 1))`` of ``N`` (round half up; ``n = 1``:
layer 0), which for 6 of 12 layers gives DistilBERT's ``[0, 2, 4, 7, 9, 11]``; ALBERT counts
its unique (shared) layers.

Data: shard directories from ``python -m lub_fast.prepare --vocab TEACHER`` (its vocab.txt, else
its tokenizer.json's WordPiece vocabulary, as ``lub_fast.from_pretrained`` reads it); examples,
masking and micro-batch order are those of ``lub_fast.pretrain`` (pure functions of the seed and
the example index), with no sentence-pair task. Step 1 (``--cache-teacher DIR``) writes the
teacher's top-k logits and log-normaliser at the masked positions of the
``total_steps x grad_accum_steps`` micro-batches of every rank (plus its last hidden states when
``--loss.alpha_cos`` > 0), resumable: run the same command again after an interruption. Step 2
(``--cache DIR``) reads them memory-mapped and proves, batch by batch, that its data and masks
are the ones the teacher saw. Same world size and batch size in both steps. Loss, top-k KL and
defaults: ``lub_fast.objectives.distill``; cache format: ``lub_fast.distill_cache``.

On the shared training loop (AMP, DDP under torchrun, exact resume with ``--resume``, logs,
plots); the student is exported with the vocabulary to ``RUN/hf``. Exit status: 0 done, 2 bad
arguments, data, cache or models, 143 stopped by SIGTERM (continue with the same command, plus
``--resume`` for training).
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from lub_fast.config_cli import (
    ConfigError,
    apply_overrides,
    check_fields,
    describe,
    field_error,
    option,
    output_dir,
    resolve_config,
)
from lub_fast.distill_cache import CacheError, CacheReader, CacheWriter, differences, fingerprint, indices_dtype, write_header
from lub_fast.errors import EXIT_CODES_HELP, Preempted, UsageError, run_command
from lub_fast.lock import output_lock
from lub_fast.train import (
    AMP_DTYPES,
    TrainConfig,
    init_distributed,
    resolve_precision,
    shutdown_distributed,
    train,
)

SIZES = ("tiny", "small", "base", "large")


class DistillError(UsageError, ValueError):
    """Models, data or cache that cannot be distilled together; raised before any step runs."""


@dataclass(frozen=True)
class StudentSection:
    model: str = option("small", "size preset (tiny/small/base/large) of the teacher's family, or an HF directory")
    init: Literal["auto", "teacher", "random"] = option(
        "auto", "preset students: copy the teacher's embeddings, head and every k-th layer (auto: when the widths match)"
    )
    num_hidden_layers: int | None = option(None, "override the preset's layer count", ge=1)
    hidden_size: int | None = option(None, "override the preset's hidden size", ge=1)
    num_attention_heads: int | None = option(None, "override the preset's head count", ge=1)
    intermediate_size: int | None = option(None, "override the preset's feed-forward size", ge=1)
    embedding_size: int | None = option(None, "override the preset's embedding size (ALBERT, ELECTRA)", ge=1)
    hidden_dropout_prob: float | None = option(None, "override the preset's hidden dropout", ge=0, lt=1)
    attention_probs_dropout_prob: float | None = option(None, "override the preset's attention dropout", ge=0, lt=1)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class DataSection:
    data: tuple[str, ...] = option((), "training shard directories (python -m lub_fast.prepare)")
    eval_data: tuple[str, ...] = option((), "held-out shard directories (masked-token accuracy of the student)")
    max_seq_len: int = option(128, "tokens per example, [CLS] and [SEP] included", ge=8)
    batch_size: int = option(32, "examples per micro-batch per rank", ge=1)
    short_seq_prob: float = option(0.1, "probability of a shorter target length (BERT's short_seq_prob)", ge=0, le=1)
    seed: int = option(12345, "seed of example order and masking", ge=0)
    num_workers: int = option(0, "DataLoader worker processes per rank", ge=0)
    eval_batches: int = option(8, "held-out micro-batches per evaluation", ge=1)
    verify: bool = option(True, "check the shards' sha256 checksums at start (each rank a share); false if verified")

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class MaskingSection:
    mode: Literal["whole_word", "ngram", "token"] = option("whole_word", "masking units")
    rate: float = option(0.15, "fraction of maskable tokens to predict", gt=0, le=1)
    max_predictions: int = option(20, "most predicted tokens per example (BERT: 20 at 128, 80 at 512)", ge=1)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class LossSection:
    alpha_ce: float = option(
        5.0, "weight of KL(teacher_T || student_T) * T^2 at masked positions (DistilBERT 5.0)", ge=0
    )
    alpha_mlm: float = option(2.0, "weight of the student's MLM cross entropy (DistilBERT 2.0)", ge=0)
    alpha_cos: float = option(1.0, "weight of 1 - cos(student, teacher last hidden states) (DistilBERT 1.0)", ge=0)
    temperature: float = option(2.0, "softmax temperature T of the KL term (DistilBERT 2.0)", gt=0)
    cos_positions: Literal["all", "masked"] = option(
        "all", "cosine loss over all real tokens (DistilBERT) or the masked positions (a 20x smaller cache)"
    )

    def __post_init__(self):
        check_fields(self)
        if self.alpha_ce == self.alpha_mlm == self.alpha_cos == 0:
            raise field_error(self, "alpha_ce", "> 0 when alpha_mlm and alpha_cos are 0: the loss would be 0")


@dataclass(frozen=True)
class CacheSection:
    top_k: int = option(64, "teacher logits kept per masked position (the vocabulary size: all)", ge=1)
    values_dtype: Literal["float16", "float32"] = option("float16", "dtype of the cached logits and hidden states")
    flush_every: int = option(64, "micro-batches between durable progress marks (resume points)", ge=1)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class DistillConfig:
    teacher: str | None = option(None, "teacher: HF directory or lub_fast pretrain run (optional with --cache)")
    output: str = option(
        "runs/distill", "run directory: checkpoints, logs, plots, HF export of the student", check=output_dir
    )
    cache_teacher: str | None = option(
        None, "step 1: write the teacher cache into this directory, then stop", check=output_dir, flag="--cache-teacher"
    )
    from_cache: str | None = option(None, "step 2: distill from this teacher cache (--cache)")
    student: StudentSection = field(default_factory=StudentSection)
    data: DataSection = field(default_factory=DataSection)
    masking: MaskingSection = field(default_factory=MaskingSection)
    loss: LossSection = field(default_factory=LossSection)
    cache: CacheSection = field(default_factory=CacheSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-4, warmup_steps=100, max_grad_norm=5.0))

    def __post_init__(self):
        check_fields(self, command=True)
        if self.cache_teacher and self.from_cache:
            raise ValueError("--cache-teacher (step 1) and --cache (step 2) are two runs: give one of them")
        if self.masking.max_predictions > self.data.max_seq_len:
            raise field_error(self, "masking.max_predictions", f"<= data.max_seq_len = {self.data.max_seq_len}", command=True)

    @property
    def mode(self) -> str:
        return "cache-teacher" if self.cache_teacher else "from-cache" if self.from_cache else "online"


# ---------------------------------------------------------------------------------------- models


def teacher_layers(num_student: int, num_teacher: int) -> list[int]:
    """Teacher layer of each student layer: ``round_half_up(i * (N - 1) / (n - 1))`` (``n = 1``: [0]).
    6 of 12 gives DistilBERT's ``[0, 2, 4, 7, 9, 11]``."""
    if not 1 <= num_student <= num_teacher:
        raise DistillError(f"a student of {num_student} layers cannot take them from a teacher of {num_teacher}")
    if num_student == 1:
        return [0]
    return [(2 * i * (num_teacher - 1) + num_student - 1) // (2 * (num_student - 1)) for i in range(num_student)]


def model_dir(path: str, role: str) -> Path:
    """An HF directory, or a lub_fast run directory's ``hf/`` export."""
    p = Path(path)
    if (p / "hf" / "config.json").exists():
        return p / "hf"
    if (p / "config.json").exists() and (p / "checkpoints").is_dir() and not any(p.glob("model.safetensors*")):
        raise DistillError(f"--{role} {path} is a run directory without an hf/ export (the run has not finished)")
    if not (p / "config.json").exists():
        raise DistillError(f"--{role} {path}: no config.json (not an HF directory nor a lub_fast run with hf/)")
    return p


def load_masked_lm(path: str, role: str):
    """A ``MaskedLM`` from ``path`` (see ``model_dir``); a teacher must bring a trained MLM head."""
    from lub_fast.models import from_pretrained

    directory = model_dir(path, role)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = from_pretrained(directory, task="masked_lm")
        except (FileNotFoundError, ValueError) as error:
            raise DistillError(f"--{role} {path}: {error}") from None
    for w in caught:
        if role == "teacher" and "has no weights for" in str(w.message):
            raise DistillError(f"--teacher {path} has no MLM head to distill from: {w.message}")
        warnings.warn(str(w.message), w.category, stacklevel=2)
    return model


def weights_sha256(model) -> str:
    """sha256 over a model's state dict (names and raw bytes in name order): its identity."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def vocab_sha256(path: str, role: str) -> str | None:
    """sha256 of the vocab.txt of the model at ``path`` (see ``model_dir``; ``read_tokenizer_files``
    makes one of a tokenizer.json's WordPiece vocabulary); None for a model without tokenizer files."""
    from lub_fast.models import read_tokenizer_files

    data = read_tokenizer_files(model_dir(path, role)).get("vocab.txt")
    return hashlib.sha256(data).hexdigest() if data is not None else None


def _student_overrides(cfg: DistillConfig) -> dict:
    return {f.name: getattr(cfg.student, f.name) for f in dataclasses.fields(StudentSection)
            if f.name not in ("model", "init") and getattr(cfg.student, f.name) is not None}


def build_student(cfg: DistillConfig, teacher_config, teacher):
    """The student ``MaskedLM`` and a line saying how it was initialised. ``teacher_config``: the
    teacher's ``EncoderConfig``; ``teacher``: its model (``None`` in step 2 without ``--teacher``)."""
    from lub_fast.models import EncoderConfig, MaskedLM

    overrides = _student_overrides(cfg)
    name = cfg.student.model
    if name not in SIZES:
        if overrides or cfg.student.init == "teacher":
            raise DistillError(
                f"--student {name} is an HF directory: it is continued as it is (the --student.* overrides and "
                "--student.init=teacher are for size presets)"
            )
        return load_masked_lm(name, "student"), f"continued from {model_dir(name, 'student')}"
    t = teacher_config
    inherited = dict(vocab_size=t.vocab_size, pad_token_id=t.pad_token_id, position_offset=t.position_offset,
                     max_position_embeddings=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
                     layer_norm_eps=t.layer_norm_eps, hidden_act=t.hidden_act)
    try:
        config = EncoderConfig.preset(t.family, name, **{**inherited, **overrides})
    except ValueError as error:
        raise DistillError(f"--student {name}: {error}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        student = MaskedLM(config)
    if cfg.student.init == "random":
        return student, "random initialisation"
    widths = ("hidden_size", "intermediate_size", "embedding_size", "num_attention_heads")
    mismatch = [f"{w} {getattr(config, w)} vs the teacher's {getattr(t, w)}" for w in widths if getattr(config, w) != getattr(t, w)]
    if config.num_unique_layers > t.num_unique_layers:
        mismatch.append(f"{config.num_unique_layers} layers vs the teacher's {t.num_unique_layers}")
    if mismatch or teacher is None:
        if cfg.student.init == "teacher":
            reason = "; ".join(mismatch) if mismatch else "no --teacher given to take the weights from"
            raise DistillError(f"--student {name} cannot be initialised from the teacher ({reason})")
        why = "; ".join(mismatch) if mismatch else "no --teacher weights"
        return student, f"random initialisation ({why})"
    chosen = teacher_layers(config.num_unique_layers, t.num_unique_layers)
    source = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        if key.startswith("encoder.layers."):
            index, rest = key[len("encoder.layers."):].split(".", 1)
            state[key] = source[f"encoder.layers.{chosen[int(index)]}.{rest}"]
        else:
            state[key] = source[key]
    student.load_state_dict(state, strict=True)
    return student, f"initialised from teacher layers {chosen}, embeddings and MLM head"


def check_vocabularies(teacher_vocab: dict, student_vocab: dict | None, data_vocab_size: int, data_vocab_sha: str) -> None:
    """Teacher, student (``None`` in step 1) and data must index one vocabulary. ``teacher_vocab``,
    ``student_vocab``: ``vocab_size`` and ``vocab_sha256`` (of its vocab.txt, or None)."""
    student_sha = student_vocab["vocab_sha256"] if student_vocab is not None else None
    checks = [("teacher", teacher_vocab["vocab_size"], teacher_vocab["vocab_sha256"])]
    if student_vocab is not None:
        checks.append(("student", student_vocab["vocab_size"], student_sha))
    for who, size, sha in checks:
        if size != data_vocab_size or (sha is not None and sha != data_vocab_sha):
            detail = f"{size} entries" + (f", vocab.txt sha256 {sha[:12]}" if sha else "")
            raise DistillError(
                f"the {who} and the data have different vocabularies ({detail} vs the data's {data_vocab_size} "
                f"entries, sha256 {data_vocab_sha[:12]}): distillation compares teacher and student token by token, "
                "so teacher, student and data must share one vocab.txt (prepare the data with python -m lub_fast.prepare "
                "--vocab TEACHER_DIR: its vocab.txt, or the WordPiece vocabulary of its tokenizer.json)"
            )
    if student_sha and teacher_vocab["vocab_sha256"] and student_sha != teacher_vocab["vocab_sha256"]:
        raise DistillError("the teacher's and the student's vocab.txt differ: they must share one vocabulary")


# ------------------------------------------------------------------------------------------ data


def data_signature(shard_dirs) -> dict:
    """What the training data is, independent of where it lies: per directory the vocabulary and
    settings hashes and the sha256 of every shard file."""
    from lub_fast.data.shards import open_shards

    signature = []
    for d in shard_dirs:
        shards = open_shards(d, check_tokens=False)
        files = [{k: v["sha256"] for k, v in sorted(s.header["files"].items())} for s in shards.shards]
        signature.append({"vocab_sha256": shards.vocab_sha256, "settings_sha256": shards.meta.get("settings_sha256"),
                          "files": files})
    return {"shards": signature}


def _pipeline(cfg: DistillConfig, env):
    """Dataset, collator and the loop's ``batches`` for this rank; the eval function."""
    from lub_fast.data.collator import MaskingCollator
    from lub_fast.data.dataset import PretrainDataset
    from lub_fast.data.shards import ShardError
    from lub_fast.pretrain import make_batches, make_eval_fn, masking_config

    if not cfg.data.data:
        raise DistillError("no training data: pass --data SHARD_DIR ... (made by python -m lub_fast.prepare)")
    common = dict(max_seq_len=cfg.data.max_seq_len, pair=None, short_seq_prob=cfg.data.short_seq_prob, seed=cfg.data.seed)
    try:
        dataset = PretrainDataset(
            list(cfg.data.data), rank=env.rank, world_size=env.world_size, verify_checksums=cfg.data.verify, **common
        )
        eval_set = PretrainDataset(
            list(cfg.data.eval_data), rank=0, world_size=1, shuffle=False,
            verify_checksums=cfg.data.verify and env.rank == 0, **common,
        ) if cfg.data.eval_data else None
    except (ShardError, ValueError) as error:
        raise DistillError(f"--data: {error}") from None
    if eval_set is not None and Path(eval_set.vocab_path).read_bytes() != Path(dataset.vocab_path).read_bytes():
        raise DistillError("--data.eval_data was prepared with another vocabulary than --data")
    masking = masking_config(dataset, cfg.masking.mode, cfg.masking, cfg.data.seed, cfg.data.max_seq_len)
    try:
        batches = make_batches(dataset, MaskingCollator(masking), cfg.data.batch_size, cfg.data.num_workers)
    except ValueError as error:
        raise DistillError(str(error)) from None
    eval_fn = None
    if eval_set is not None:
        eval_collator = MaskingCollator(dataclasses.replace(masking, seed=cfg.data.seed + 1))
        eval_fn = make_eval_fn(eval_set, eval_collator, cfg.data.batch_size, cfg.data.eval_batches)
    return dataset, batches, eval_fn


def _identity(cfg: DistillConfig, dataset, env) -> dict:
    """The cache header fields that step 2 must agree with (data, masks, batches, temperature)."""
    return {
        "data": {**data_signature(cfg.data.data), "max_seq_len": cfg.data.max_seq_len,
                 "short_seq_prob": cfg.data.short_seq_prob, "seed": cfg.data.seed, "num_examples": dataset.num_examples},
        "masking": dataclasses.asdict(cfg.masking),
        "batch_size": cfg.data.batch_size,
        "world_size": env.world_size,
        "temperature": cfg.loss.temperature,
    }


def _hidden_mode(cfg: DistillConfig) -> str:
    return cfg.loss.cos_positions if cfg.loss.alpha_cos > 0 else "none"


# ----------------------------------------------------------------------------------- step 1


@contextlib.contextmanager
def _sigterm_flag():
    """Yields a dict whose ``"stop"`` turns True on SIGTERM (main thread only)."""
    flag = {"stop": False}
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: flag.update(stop=True))
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def cache_teacher(cfg: DistillConfig, teacher, batches, header: dict, env) -> dict:
    """Step 1 on this rank: run ``teacher`` over its ``header["micro_batches"]`` micro-batches and
    append top-k logits, log-normalisers (and hidden states) to the cache, resuming where a previous
    run stopped. Returns counts and whether SIGTERM interrupted it (after a durable flush)."""
    directory = Path(cfg.cache_teacher)
    if env.rank == 0:
        write_header(directory, header)
    _barrier()
    writer = CacheWriter(directory, env.rank, cfg.cache.flush_every)
    start, total = writer.micro_batches_done, header["micro_batches"]
    k, temperature, hidden = header["k"], header["temperature"], header["hidden"]
    amp = AMP_DTYPES.get(resolve_precision(cfg.train.precision, env.device))
    teacher.to(env.device).eval()
    interrupted = False
    if start < total:
        iterator = iter(batches(start, env.rank, env.world_size))
        bar = tqdm(total=total, initial=start, unit="batch", disable=env.rank != 0, dynamic_ncols=True,
                   desc="teacher cache")
        with _sigterm_flag() as flag, bar, torch.no_grad():
            for _ in range(start, total):
                batch = next(iterator)
                key = fingerprint(batch)
                positions = batch["masked_positions"].to(env.device)
                inputs = {key: batch[key].to(env.device) for key in ("input_ids", "attention_mask", "token_type_ids")}
                with torch.autocast(env.device.type, dtype=amp, enabled=amp is not None):
                    out = teacher(**inputs, masked_positions=positions, sparse_last_layer=hidden != "all")
                logits = out.logits.float()
                lognorm = torch.logsumexp(logits / temperature, dim=-1)
                values, indices = logits.topk(k, dim=-1)
                states = None
                if hidden == "all":
                    states = out.encoder.hidden
                elif hidden == "masked":
                    states = out.encoder.at(positions)
                writer.append(key, values, indices, lognorm, states)
                bar.update(1)
                if flag["stop"]:
                    interrupted = True
                    break
    if interrupted or writer.micro_batches_done < total:
        writer.flush()
        writer.close()
        return {"cache": str(directory), "interrupted": True, "micro_batches": writer.micro_batches_done}
    summary = writer.finish()
    _barrier()
    return {"cache": str(directory), "interrupted": False, **summary}


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------- step 2


def _check_cache(cfg: DistillConfig, reader: CacheReader, identity: dict, needed: int) -> None:
    header = reader.header
    cached = {key: header.get(key) for key in identity}
    diffs = differences(cached, json.loads(json.dumps(identity)))
    if diffs:
        raise DistillError(
            f"--cache {cfg.from_cache} was made from other data, masks or settings: {'; '.join(diffs)}"
        )
    if needed > header["micro_batches"]:
        raise DistillError(
            f"--cache {cfg.from_cache} holds {header['micro_batches']} micro-batches per rank; "
            f"{cfg.train.total_steps} steps x {cfg.train.grad_accum_steps} need {needed}"
        )
    if cfg.loss.alpha_cos > 0 and header["hidden"] != cfg.loss.cos_positions:
        raise DistillError(
            f"--loss.alpha_cos {cfg.loss.alpha_cos} needs teacher hidden states at {cfg.loss.cos_positions} positions; "
            f"--cache {cfg.from_cache} has {header['hidden']!r} (set --loss.alpha_cos=0, or cache them)"
        )


def _with_cache(batches, reader: CacheReader):
    """The loop's batches with micro-batch ``m``'s cached teacher outputs attached."""

    def cached(start: int, rank: int, world_size: int):
        iterator = batches(start, rank, world_size)

        def attach():
            for m, batch in enumerate(iterator, start):
                reader.check(m, batch)
                batch.update(reader.entries(m))
                yield batch

        return attach()

    return cached


# ------------------------------------------------------------------------------------------ run


def run(cfg: DistillConfig, resume: str | None = None) -> dict:
    """Distill as ``cfg`` says (step 1, step 2 or online); returns a summary dict."""
    from lub_fast.data.tokenizer import file_sha256
    from lub_fast.models import EncoderConfig
    from lub_fast.objectives.distill import DistillObjective
    from lub_fast.pretrain import export_hf

    env = init_distributed(cfg.train.device)
    main = env.rank == 0
    mode = cfg.mode
    if mode != "from-cache" and not cfg.teacher:
        raise DistillError("--teacher is required (except in step 2, --cache)")
    dataset, batches, eval_fn = _pipeline(cfg, env)
    data_sha = file_sha256(dataset.vocab_path)
    teacher = load_masked_lm(cfg.teacher, "teacher") if cfg.teacher else None
    identity = _identity(cfg, dataset, env)
    micro_batches = cfg.train.total_steps * cfg.train.grad_accum_steps

    if mode == "cache-teacher":
        tvocab = {"vocab_size": teacher.config.vocab_size, "vocab_sha256": vocab_sha256(cfg.teacher, "teacher")}
        check_vocabularies(tvocab, None, dataset.vocab_size, data_sha)
        if not 1 <= cfg.cache.top_k <= teacher.config.vocab_size:
            raise DistillError(f"--cache.top_k {cfg.cache.top_k} must be in [1, vocab size {teacher.config.vocab_size}]")
        header = {
            **identity,
            "micro_batches": micro_batches,
            "k": cfg.cache.top_k,
            "values_dtype": "<f2" if cfg.cache.values_dtype == "float16" else "<f4",
            "indices_dtype": indices_dtype(teacher.config.vocab_size),
            "hidden": _hidden_mode(cfg),
            "hidden_size": teacher.config.hidden_size,
            "teacher": {"weights_sha256": weights_sha256(teacher), "config": teacher.config.to_hf(), **tvocab},
            "source": {"teacher": str(model_dir(cfg.teacher, "teacher")), "data": list(cfg.data.data)},
        }
        if main:
            per_row = cfg.cache.top_k * (int(header["values_dtype"][-1]) + int(header["indices_dtype"][-1])) + 4
            print(f"lub_fast.distill: step 1, teacher cache of {micro_batches} micro-batches x {cfg.data.batch_size} "
                  f"examples per rank into {cfg.cache_teacher} ({per_row} bytes per masked token, k={cfg.cache.top_k}, "
                  f"hidden states: {header['hidden']})")
        return cache_teacher(cfg, teacher, batches, header, env)

    reader = None
    if mode == "from-cache":
        try:
            reader = CacheReader(cfg.from_cache, env.rank, env.world_size)
        except CacheError as error:
            raise DistillError(str(error)) from None
        _check_cache(cfg, reader, identity, micro_batches)
        cached_teacher = reader.header["teacher"]
        if teacher is not None and weights_sha256(teacher) != cached_teacher["weights_sha256"]:
            raise DistillError(f"--teacher {cfg.teacher} is not the teacher that made --cache {cfg.from_cache} (weights differ)")
        teacher_config = EncoderConfig.from_hf(cached_teacher["config"])
        tvocab = {"vocab_size": cached_teacher["vocab_size"], "vocab_sha256": cached_teacher["vocab_sha256"]}
    else:
        teacher_config = teacher.config
        tvocab = {"vocab_size": teacher.config.vocab_size, "vocab_sha256": vocab_sha256(cfg.teacher, "teacher")}
    student, how = build_student(cfg, teacher_config, teacher)
    student_sha = vocab_sha256(cfg.student.model, "student") if cfg.student.model not in SIZES else None
    check_vocabularies(tvocab, {"vocab_size": student.config.vocab_size, "vocab_sha256": student_sha}, dataset.vocab_size, data_sha)
    if cfg.data.max_seq_len > student.config.max_position_embeddings - student.config.position_offset:
        raise DistillError(f"--data.max_seq_len {cfg.data.max_seq_len} exceeds the student's positions")
    if cfg.loss.alpha_cos > 0 and student.config.hidden_size != teacher_config.hidden_size:
        raise DistillError(
            f"--loss.alpha_cos {cfg.loss.alpha_cos}: the cosine loss needs equal hidden sizes, the student has "
            f"{student.config.hidden_size} and the teacher {teacher_config.hidden_size} (set --loss.alpha_cos=0)"
        )
    loss = dataclasses.asdict(cfg.loss)
    objective = DistillObjective(student, teacher if mode == "online" else None, **loss)
    if reader is not None:
        batches = _with_cache(batches, reader)
    if main:
        params = sum(p.numel() for p in student.parameters())
        print(f"lub_fast.distill: {mode}, student {student.config.family} {student.config.num_hidden_layers} layers, "
              f"hidden {student.config.hidden_size} ({params / 1e6:.1f}M parameters, {how}); "
              f"{cfg.train.total_steps} steps x {cfg.data.batch_size * cfg.train.grad_accum_steps * env.world_size} examples")
    result = train(objective, batches, cfg.train, cfg.output, eval_fn=eval_fn, resume=resume, run_config=cfg)
    summary = {"run_dir": cfg.output, "step": result.step, "interrupted": result.interrupted,
               "metrics": result.metrics, "eval": result.eval_metrics, "hf": None}
    if main and not result.interrupted:
        summary["hf"] = str(export_hf(objective, dataset.vocab_path, Path(cfg.output) / "hf")[0])
        (Path(cfg.output) / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    _barrier()
    return summary


# ----------------------------------------------------------------------------------------- main


def parse_args(argv) -> tuple[DistillConfig, str | None]:
    """Command line -> ``(config, resume)``; raises ``ConfigError``."""
    parser = argparse.ArgumentParser(
        prog="python -m lub_fast.distill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every field below is also an option (--section.field=value):\n  " + "\n  ".join(describe(DistillConfig()))
        + "\n\n" + EXIT_CODES_HELP,
    )
    parser.add_argument("--config", help="start from a saved config.json (overrides apply on top)")
    parser.add_argument("--teacher", help="teacher: HF directory or lub_fast pretrain run directory")
    parser.add_argument("--student", help="student: size preset (tiny/small/base/large) or HF directory")
    parser.add_argument("--data", nargs="+", help="training shard directories")
    parser.add_argument("--output", help="run directory (training)")
    parser.add_argument("--cache-teacher", metavar="DIR", help="step 1: write the teacher cache here and stop")
    parser.add_argument("--cache", metavar="DIR", help="step 2: distill from this teacher cache")
    parser.add_argument("--steps", type=int, help="optimizer steps (same as --train.total_steps)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue the training run in --output from its latest (or this) checkpoint")
    cfg, rest = resolve_config(DistillConfig(), argv)
    args = parser.parse_args(rest)
    changes = {k: v for k, v in (("teacher", args.teacher), ("output", args.output),
                                 ("cache_teacher", args.cache_teacher), ("from_cache", args.cache)) if v}
    try:
        cfg = dataclasses.replace(cfg, **changes)
        if args.student:
            cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, model=args.student))
        if args.data:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data=tuple(args.data)))
        if args.steps is not None:
            cfg = apply_overrides(cfg, [f"train.total_steps={args.steps}"])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return cfg, args.resume


def main(argv=None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def body():
        cfg, resume = parse_args(argv)
        written = cfg.cache_teacher if cfg.mode == "cache-teacher" else cfg.output
        try:
            with output_lock(written, "distill"):
                summary = run(cfg, resume)
        finally:
            shutdown_distributed()
        if summary["interrupted"]:
            again = "run the same command again" if cfg.mode == "cache-teacher" else "add --resume"
            raise Preempted(f"stopped by SIGTERM after saving; to continue, {again}")
        if int(os.environ.get("RANK", "0")) == 0:
            if cfg.mode == "cache-teacher":
                print(f"lub_fast.distill: teacher cache complete in {summary['cache']} "
                      f"({summary['micro_batches']} micro-batches, {summary['rows']} masked tokens on rank 0)")
            else:
                ev = summary["eval"]
                if ev:
                    print(f"lub_fast.distill: held-out masked-token accuracy {ev.get('mlm_acc', float('nan')):.3f}")
                print(f"lub_fast.distill: student exported to {summary['hf']}")

    return run_command("distill", body)


if __name__ == "__main__":
    sys.exit(main())
