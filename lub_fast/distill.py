"""``python -m lub_fast.distill``: pretraining distillation of a teacher encoder into a student
(DistilBERT, Sanh et al. 2019, arXiv 1910.01108), with the teacher in the loop or cached.

    # online: the teacher runs in the loop (eval mode, no gradient)
    python -m lub_fast.distill --teacher T_DIR --student.model=small --data SHARDS --output RUN
    # two steps: 1) the teacher's outputs over every training micro-batch, 2) the student on them
    python -m lub_fast.distill --teacher T_DIR --data SHARDS --cache-teacher CACHE --train.total_steps=N
    python -m lub_fast.distill --from-cache CACHE --student.model=small --data SHARDS --output RUN --train.total_steps=N

``--teacher``: an HF directory with an MLM head (bert, roberta, albert, electra generator), or a
``lub_fast.pretrain`` run directory (its ``hf/`` export). ``--student.model``: an HF directory to
continue from (the seed's recipe: a base model), or a size preset (tiny/small/base/large) of the
teacher's family with the teacher's vocabulary, positions and activation, shaped by
``--student.*`` overrides. A preset student whose widths (hidden, intermediate, embedding size,
heads) equal the teacher's is initialised from it as DistilBERT was (``--student.init=auto``;
``teacher`` insists, ``random`` declines): embeddings, embedding projection and MLM head copied,
student layer ``i`` of ``n`` from teacher layer ``round(i * (N - 1) / (n - 1))`` of ``N`` (round
half up; ``n = 1``: layer 0), which for 6 of 12 layers gives DistilBERT's ``[0, 2, 4, 7, 9, 11]``;
ALBERT counts its unique (shared) layers.

Data: shard directories from ``python -m lub_fast.prepare --vocab TEACHER`` (its vocab.txt, else
its tokenizer.json's WordPiece vocabulary, as ``lub_fast.from_pretrained`` reads it); examples,
masking and micro-batch order are those of ``lub_fast.pretrain`` (pure functions of the seed and
the example index), with no sentence-pair task. Step 1 (``--cache-teacher DIR``) writes the
teacher's top-k logits and log-normaliser at the masked positions of the
``total_steps x grad_accum_steps`` micro-batches of every rank (plus its last hidden states when
``--loss.alpha_cos`` > 0), resumable: run the same command again after an interruption. Step 2
(``--from-cache DIR``) reads them memory-mapped and proves, batch by batch, that its data and masks
are the ones the teacher saw. Same world size and batch size in both steps. Loss, top-k KL and
defaults: ``lub_fast.objectives.distill``; cache format: ``lub_fast.distill_cache``; teacher,
student and step 1: ``lub_fast.distillation``.

On the shared training loop (AMP, DDP under torchrun, exact resume with ``--resume``, logs,
plots); the student is exported with the vocabulary to ``RUN/hf``.
"""

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

# A training command is an application, so it may set process state: idle OpenMP threads sleep
# instead of spinning (on a shared CPU a demo step took 3.8 s spinning, 0.46 s passive). It must be
# set before torch loads; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lub_fast import distillation as dl
from lub_fast.config_cli import (
    ConfigError,
    check_fields,
    describe,
    field_error,
    option,
    output_dir,
    resolve_config,
)
from lub_fast.data.loader import make_batches, make_eval_fn, masking_config
from lub_fast.distill_cache import CacheError, CacheReader, CacheSection
from lub_fast.errors import EXIT_CODES_HELP, Preempted, run_command
from lub_fast.lock import output_lock
from lub_fast.objectives.distill import LossSection
from lub_fast.runs import export_hf
from lub_fast.sections import DataSection, MaskingSection
from lub_fast.train import (
    TrainConfig,
    barrier,
    init_distributed,
    shutdown_distributed,
    train,
)


@dataclass(frozen=True)
class DistillConfig:
    teacher: str | None = option(None, "teacher: HF directory or lub_fast pretrain run (optional with --from-cache)")
    output: str = option(
        "runs/distill", "run directory: checkpoints, logs, plots, HF export of the student", check=output_dir
    )
    cache_teacher: str | None = option(
        None, "step 1: write the teacher cache into this directory, then stop", check=output_dir
    )
    from_cache: str | None = option(None, "step 2: distill from this teacher cache")
    student: dl.StudentSection = field(default_factory=dl.StudentSection)
    data: DataSection = field(default_factory=DataSection)
    masking: MaskingSection = field(default_factory=MaskingSection)
    loss: LossSection = field(default_factory=LossSection)
    cache: CacheSection = field(default_factory=CacheSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-4, warmup_steps=100, max_grad_norm=5.0))

    def __post_init__(self):
        check_fields(self, command=True)
        if self.cache_teacher and self.from_cache:
            raise ConfigError("--cache-teacher (step 1) and --from-cache (step 2) are two runs: give one of them")
        if self.masking.max_predictions > self.data.max_seq_len:
            raise field_error(self, "masking.max_predictions", f"<= data.max_seq_len = {self.data.max_seq_len}", command=True)

    @property
    def mode(self) -> str:
        return "cache-teacher" if self.cache_teacher else "from-cache" if self.from_cache else "online"


def _pipeline(cfg: DistillConfig, env):
    """Dataset, collator and the loop's ``batches`` for this rank; the eval function."""
    from lub_fast.data.collator import MaskingCollator
    from lub_fast.data.dataset import PretrainDataset
    from lub_fast.data.parts import expand
    from lub_fast.data.shards import ShardError

    if not cfg.data.data:
        raise dl.DistillError("no training data: pass --data SHARD_DIR ... (made by python -m lub_fast.prepare)")
    common = {"max_seq_len": cfg.data.max_seq_len, "pair": None, "short_seq_prob": cfg.data.short_seq_prob, "seed": cfg.data.seed}
    try:
        dataset = PretrainDataset(
            expand(cfg.data.data), rank=env.rank, world_size=env.world_size, verify_checksums=cfg.data.verify, **common
        )
        eval_set = PretrainDataset(
            expand(cfg.data.eval_data), rank=0, world_size=1, shuffle=False,
            verify_checksums=cfg.data.verify and env.rank == 0, **common,
        ) if cfg.data.eval_data else None
    except (ShardError, ValueError) as error:
        raise dl.DistillError(f"--data: {error}") from None
    if eval_set is not None and Path(eval_set.vocab_path).read_bytes() != Path(dataset.vocab_path).read_bytes():
        raise dl.DistillError("--data.eval_data was prepared with another vocabulary than --data")
    masking = masking_config(dataset, cfg.masking.mode, cfg.masking, cfg.data.seed, cfg.data.max_seq_len)
    batches = make_batches(dataset, MaskingCollator(masking), cfg.data.batch_size, cfg.data.num_workers)
    eval_fn = None
    if eval_set is not None:
        eval_collator = MaskingCollator(dataclasses.replace(masking, seed=cfg.data.seed + 1))
        eval_fn = make_eval_fn(eval_set, eval_collator, cfg.data.batch_size, cfg.data.eval_batches)
    return dataset, batches, eval_fn


def run(cfg: DistillConfig, resume: str | None = None) -> dict:
    """Distill as ``cfg`` says (step 1, step 2 or online); returns a summary dict."""
    from lub_fast.data.tokenizer import file_sha256
    from lub_fast.models import EncoderConfig
    from lub_fast.objectives.distill import DistillObjective

    env = init_distributed(cfg.train.device)
    main = env.rank == 0
    mode = cfg.mode
    if mode != "from-cache" and not cfg.teacher:
        raise dl.DistillError("--teacher is required (except in step 2, --from-cache)")
    dataset, batches, eval_fn = _pipeline(cfg, env)
    data_sha = file_sha256(dataset.vocab_path)
    teacher = dl.load_masked_lm(cfg.teacher, "teacher") if cfg.teacher else None
    identity = dl.cache_identity(cfg, dataset, env.world_size)
    micro_batches = cfg.train.total_steps * cfg.train.grad_accum_steps

    if mode == "cache-teacher":
        dl.check_vocabularies(dl.model_vocab_info(teacher, cfg.teacher, "teacher"), None, dataset.vocab_size, data_sha)
        header = dl.cache_header(cfg, teacher, identity, micro_batches)
        if main:
            per_row = cfg.cache.top_k * (int(header["values_dtype"][-1]) + int(header["indices_dtype"][-1])) + 4
            print(f"lub_fast.distill: step 1, teacher cache of {micro_batches} micro-batches x {cfg.data.batch_size} "
                  f"examples per rank into {cfg.cache_teacher} ({per_row} bytes per masked token, k={cfg.cache.top_k}, "
                  f"hidden states: {header['hidden']})")
        return dl.cache_teacher(cfg, teacher, batches, header, env)

    reader = None
    if mode == "from-cache":
        try:
            reader = CacheReader(cfg.from_cache, env.rank, env.world_size)
        except CacheError as error:
            raise dl.DistillError(str(error)) from None
        dl.check_cache(cfg, reader, identity, micro_batches)
        cached_teacher = reader.header["teacher"]
        if teacher is not None and dl.weights_sha256(teacher) != cached_teacher["weights_sha256"]:
            raise dl.DistillError(f"--teacher {cfg.teacher} is not the teacher that made --from-cache {cfg.from_cache} (weights differ)")
        teacher_config = EncoderConfig.from_hf(cached_teacher["config"])
        tvocab = {"vocab_size": cached_teacher["vocab_size"], "vocab_sha256": cached_teacher["vocab_sha256"]}
    else:
        teacher_config, tvocab = teacher.config, dl.model_vocab_info(teacher, cfg.teacher, "teacher")
    student, how = dl.build_student(cfg, teacher_config, teacher)
    student_path = cfg.student.model if cfg.student.model not in dl.SIZES else None
    dl.check_vocabularies(tvocab, dl.model_vocab_info(student, student_path, "student"), dataset.vocab_size, data_sha)
    if cfg.data.max_seq_len > student.config.max_position_embeddings - student.config.position_offset:
        raise dl.DistillError(f"--data.max_seq_len {cfg.data.max_seq_len} exceeds the student's positions")
    if cfg.loss.alpha_cos > 0 and student.config.hidden_size != teacher_config.hidden_size:
        raise dl.DistillError(
            f"--loss.alpha_cos {cfg.loss.alpha_cos}: the cosine loss needs equal hidden sizes, the student has "
            f"{student.config.hidden_size} and the teacher {teacher_config.hidden_size} (set --loss.alpha_cos=0)"
        )
    objective = DistillObjective(student, teacher if mode == "online" else None, **dataclasses.asdict(cfg.loss))
    if reader is not None:
        batches = dl.with_cache(batches, reader)
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
    barrier()
    return summary


def parse_args(argv) -> tuple[DistillConfig, str | None]:
    """Command line -> ``(config, resume)``; raises ``ConfigError``."""
    parser = argparse.ArgumentParser(
        prog="python -m lub_fast.distill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options (--section.field=value; --field=value for the fields above the sections):\n  "
        + "\n  ".join(describe(DistillConfig())) + "\n\n" + EXIT_CODES_HELP,
    )
    parser.add_argument("--config", help="start from a saved config.json (options apply on top)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue the training run in --output from its latest (or this) checkpoint")
    cfg, rest = resolve_config(DistillConfig(), argv)
    return cfg, parser.parse_args(rest).resume


def main(argv=None) -> int:
    """Entry point; returns the exit status (see ``--help``)."""
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
