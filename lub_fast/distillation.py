"""Pretraining distillation (DistilBERT, Sanh et al. 2019) around the shared loop: the teacher and
the student (a size preset initialised from the teacher's layers, or an HF directory), the checks
that teacher, student, data and cache agree, and step 1 of the two-step recipe, the teacher's
outputs written into a cache (format: ``lub_fast.distill_cache``; loss: ``lub_fast.objectives.distill``).
"""

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from lub_fast.config_cli import option
from lub_fast.distill_cache import (
    CacheReader,
    CacheWriter,
    differences,
    fingerprint,
    write_header,
)
from lub_fast.errors import UsageError
from lub_fast.sections import ShapeSection
from lub_fast.train import AMP_DTYPES, StopOnSigterm, barrier, resolve_precision

SIZES = ("tiny", "small", "base", "large")


class DistillError(UsageError, ValueError):
    """Models, data or cache that cannot be distilled together; raised before any step runs."""


@dataclass(frozen=True)
class StudentSection(ShapeSection):
    model: str = option("small", "size preset (tiny/small/base/large) of the teacher's family, or an HF directory")
    init: Literal["auto", "teacher", "random"] = option(
        "auto", "preset students: copy the teacher's embeddings, head and every k-th layer (auto: when the widths match)"
    )


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


def build_student(cfg, teacher_config, teacher):
    """The student ``MaskedLM`` of the ``DistillConfig`` ``cfg`` and a line saying how it was
    initialised. ``teacher_config``: the teacher's ``EncoderConfig``; ``teacher``: its model
    (``None`` in step 2 without ``--teacher``)."""
    from lub_fast.models import EncoderConfig, MaskedLM

    overrides = cfg.student.overrides()
    name = cfg.student.model
    if name not in SIZES:
        if overrides or cfg.student.init == "teacher":
            raise DistillError(
                f"--student {name} is an HF directory: it is continued as it is (the --student.* overrides and "
                "--student.init=teacher are for size presets)"
            )
        return load_masked_lm(name, "student"), f"continued from {model_dir(name, 'student')}"
    t = teacher_config
    inherited = {"vocab_size": t.vocab_size, "pad_token_id": t.pad_token_id, "position_offset": t.position_offset,
                     "max_position_embeddings": t.max_position_embeddings, "type_vocab_size": t.type_vocab_size,
                     "layer_norm_eps": t.layer_norm_eps, "hidden_act": t.hidden_act}
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
    ``student_vocab``: ``vocab_size`` and ``vocab_sha256`` (of its vocab.txt, or None), as
    ``model_vocab_info`` gives them."""
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


# ------------------------------------------------------------------------------------- the cache


def data_signature(shard_dirs) -> dict:
    """What the training data is, independent of where it lies: per directory the vocabulary and
    settings hashes and the sha256 of every shard file."""
    from lub_fast.data.parts import expand
    from lub_fast.data.shards import open_shards

    signature = []
    for d in expand(shard_dirs):
        shards = open_shards(d, check_tokens=False)
        files = [{k: v["sha256"] for k, v in sorted(s.header["files"].items())} for s in shards.shards]
        signature.append({"vocab_sha256": shards.vocab_sha256, "settings_sha256": shards.meta.get("settings_sha256"),
                          "files": files})
    return {"shards": signature}


def cache_identity(cfg, dataset, world_size: int) -> dict:
    """The cache header fields that step 2 must agree with (data, masks, batches, temperature) for
    the ``DistillConfig`` ``cfg`` over ``dataset`` (this rank's) with ``world_size`` ranks."""
    return {
        "data": {**data_signature(cfg.data.data), "max_seq_len": cfg.data.max_seq_len,
                 "short_seq_prob": cfg.data.short_seq_prob, "seed": cfg.data.seed, "num_examples": dataset.num_examples},
        "masking": dataclasses.asdict(cfg.masking),
        "batch_size": cfg.data.batch_size,
        "world_size": world_size,
        "temperature": cfg.loss.temperature,
    }


def hidden_mode(cfg) -> str:
    """Which teacher hidden states the cosine loss needs: ``all``, ``masked`` or ``none``."""
    return cfg.loss.cos_positions if cfg.loss.alpha_cos > 0 else "none"


def cache_teacher(cfg, teacher, batches, header: dict, env) -> dict:
    """Step 1 on this rank: run ``teacher`` over its ``header["micro_batches"]`` micro-batches and
    append top-k logits, log-normalisers (and hidden states) to the cache, resuming where a previous
    run stopped. ``cfg``: the ``DistillConfig`` (its ``cache_teacher`` directory, ``cache`` and
    ``train.precision``). Returns counts and whether SIGTERM interrupted it (after a durable flush)."""
    directory = Path(cfg.cache_teacher)
    if env.rank == 0:
        write_header(directory, header)
    barrier()
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
        with StopOnSigterm() as stop, bar, torch.no_grad():
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
                if stop.requested:
                    interrupted = True
                    break
    if interrupted or writer.micro_batches_done < total:
        writer.flush()
        writer.close()
        return {"cache": str(directory), "interrupted": True, "micro_batches": writer.micro_batches_done}
    summary = writer.finish()
    barrier()
    return {"cache": str(directory), "interrupted": False, **summary}


def check_cache(cfg, reader: CacheReader, identity: dict, needed: int) -> None:
    """Step 2: the cache ``reader`` was made for this ``DistillConfig``'s data, masks and settings
    (``identity``, ``cache_identity``'s), holds ``needed`` micro-batches per rank, and has the
    hidden states the cosine loss needs."""
    header = reader.header
    cached = {key: header.get(key) for key in identity}
    diffs = differences(cached, json.loads(json.dumps(identity)))
    if diffs:
        raise DistillError(
            f"--from-cache {cfg.from_cache} was made from other data, masks or settings: {'; '.join(diffs)}"
        )
    if needed > header["micro_batches"]:
        raise DistillError(
            f"--from-cache {cfg.from_cache} holds {header['micro_batches']} micro-batches per rank; "
            f"{cfg.train.total_steps} steps x {cfg.train.grad_accum_steps} need {needed}"
        )
    if cfg.loss.alpha_cos > 0 and header["hidden"] != cfg.loss.cos_positions:
        raise DistillError(
            f"--loss.alpha_cos {cfg.loss.alpha_cos} needs teacher hidden states at {cfg.loss.cos_positions} positions; "
            f"--from-cache {cfg.from_cache} has {header['hidden']!r} (set --loss.alpha_cos=0, or cache them)"
        )


def with_cache(batches, reader: CacheReader):
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


def cache_header(cfg, teacher, identity: dict, micro_batches: int) -> dict:
    """Step 1's cache header for ``teacher`` under the ``DistillConfig`` ``cfg``: ``identity``
    (``cache_identity``'s), ``micro_batches`` per rank, the row layout and the teacher's identity."""
    from lub_fast.distill_cache import indices_dtype

    if not 1 <= cfg.cache.top_k <= teacher.config.vocab_size:
        raise DistillError(f"--cache.top_k {cfg.cache.top_k} must be in [1, vocab size {teacher.config.vocab_size}]")
    return {
        **identity,
        "micro_batches": micro_batches,
        "k": cfg.cache.top_k,
        "values_dtype": "<f2" if cfg.cache.values_dtype == "float16" else "<f4",
        "indices_dtype": indices_dtype(teacher.config.vocab_size),
        "hidden": hidden_mode(cfg),
        "hidden_size": teacher.config.hidden_size,
        "teacher": {"weights_sha256": weights_sha256(teacher), "config": teacher.config.to_hf(),
                    **model_vocab_info(teacher, cfg.teacher, "teacher")},
        "source": {"teacher": str(model_dir(cfg.teacher, "teacher")), "data": list(cfg.data.data)},
    }


def model_vocab_info(model, path: str | None, role: str) -> dict:
    """``vocab_size`` of ``model`` and ``vocab_sha256`` of the vocab.txt beside it at ``path`` (None:
    a student built from a size preset has no vocabulary file), as ``check_vocabularies`` takes them."""
    return {"vocab_size": model.config.vocab_size, "vocab_sha256": vocab_sha256(path, role) if path else None}
