"""Fine-tune an encoder on a Chinese task and evaluate it: ``python -m lub_fast.finetune``.

    python -m lub_fast.finetune --task afqmc --model chinese-roberta-wwm-ext --output runs/afqmc \\
        --data.train=afqmc/train.json --data.dev=afqmc/dev.json --data.test=afqmc/test.json \\
        --train.precision=bf16 --finetune.layer_decay=0.9

The command parses the config and runs ``lub_fast.tasks.run.finetune`` (the recipe, the outputs,
resume); tasks, readers, metrics and submission formats are ``lub_fast.tasks``. Every option of
the run is one field of ``FinetuneConfig`` with one spelling: ``--task``, ``--model``,
``--output``, and ``--SECTION.FIELD=VALUE`` for the sections ``data`` (the files and how to read
them), ``finetune`` (the recipe) and ``train`` (the loop); ``--config output/config.json`` starts
from a saved run's config (also one written before the ``data`` section). Prints the task, best
step and dev/test metrics as one json line.

Exit status: 0 done; 2 bad arguments or data (one line naming the file and line); 143 stopped by
SIGTERM after saving a checkpoint (continue with ``--resume``).
"""

import argparse
import dataclasses
import json
import os
import sys

# A training command is an application, so it may set process state: idle OpenMP threads sleep
# instead of spinning (on a shared CPU a demo step took 3.8 s spinning, 0.46 s passive). It must be
# set before torch loads; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lub_fast.config_cli import ConfigError, apply_overrides, describe, split_overrides
from lub_fast.errors import EXIT_CODES_HELP, run_command
from lub_fast.lock import output_lock
from lub_fast.tasks import TASKS
from lub_fast.tasks.run import (
    MOVED_TO_DATA,
    FinetuneConfig,
    default_config,
    finetune,
    load_run_config,
)
from lub_fast.train import shutdown_distributed

_DERIVED = ("train.total_steps", "train.warmup_steps", "train.eval_every")
_SECTIONS = ("--data.", "--finetune.", "--train.")
# the flags of earlier versions, now --data.FIELD: named in the error, so that an old command line says how to fix it
_RENAMED = tuple(f"--{name.replace('_', '-')}" for name in MOVED_TO_DATA.values())


def _parser() -> argparse.ArgumentParser:
    rows = "\n".join(
        f"  {s.name:<15}{s.kind:<15}{s.metric:<10}{s.lr:<8g}{s.epochs:<8}{s.batch_size:<7}{s.max_seq_len}"
        for s in TASKS.values()
    )
    overrides = [
        line
        for line in describe(default_config("classification"))
        if line.startswith(_SECTIONS) and not line.startswith(tuple(f"--{d}=" for d in _DERIVED))
    ]
    parser = argparse.ArgumentParser(
        prog="python -m lub_fast.finetune",
        description="Fine-tune an encoder (an HF directory) on a Chinese task; write metrics, predictions and "
        "the best model as an HF directory.\n\nRequired: --task (or --config), --model, --output, --data.train, "
        "--data.dev. The flags of earlier versions (--train FILE, --dev, --test, --labels, --text-fields, "
        "--label-field, --scheme, --skip-bad) are the --data.* fields below.\n\n"
        "Task defaults (--train.lr, --finetune.epochs, --finetune.batch_size, --finetune.max_seq_len):\n"
        + f"  {'task':<15}{'kind':<15}{'metric':<10}{'lr':<8}{'epochs':<8}{'batch':<7}max_seq_len\n"
        + rows,
        epilog="Overrides (--section.field=VALUE; total_steps, warmup_steps and eval_every are derived):\n  "
        + "\n  ".join(overrides)
        + "\n\n"
        + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--task", choices=sorted(TASKS), help="the task (sets the defaults above)")
    add("--model", help="HF model directory (bert, roberta, albert, electra; base, MLM or task checkpoint)")
    add("--output", metavar="DIR", help="output directory (checkpoints, metrics, predictions, best_model/)")
    add("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
        help="continue the run in --output: from its latest checkpoint, or from this one")  # fmt: skip
    add("--config", metavar="FILE", help="start from a saved config (output/config.json) instead of the task defaults")
    return parser


def resolve(argv) -> tuple[FinetuneConfig, str | None]:
    """Command line -> ``(config, resume)``. Raises ``ConfigError`` for bad or missing arguments."""
    overrides, rest = split_overrides(argv)
    renamed = [arg.partition("=")[0] for arg in rest if arg.partition("=")[0] in _RENAMED]
    if renamed:
        field = renamed[0].removeprefix("--").replace("-", "_")
        raise ConfigError(f"{renamed[0]} is now --data.{field}=VALUE: the files and how to read them are --data.*")
    args = _parser().parse_args(rest)
    derived = [o.partition("=")[0] for o in overrides if o.partition("=")[0] in _DERIVED]
    if derived:
        raise ConfigError(f"{derived[0]} is derived (from --finetune.epochs, warmup_ratio, eval_every); do not set it")
    if args.config:
        config = load_run_config(args.config)
    elif args.task:
        config = default_config(args.task)
    else:
        raise ConfigError("--task is required (or --config)")
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume") and v is not None}
    try:
        config = dataclasses.replace(config, **flags)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    config = apply_overrides(config, overrides)
    required = {"--model": config.model, "--data.train": config.data.train, "--data.dev": config.data.dev,
                "--output": config.output}  # fmt: skip
    missing = [flag for flag, value in required.items() if not value]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    return config, args.resume


def main(argv=None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""

    def body():
        try:
            config, resume = resolve(sys.argv[1:] if argv is None else argv)
            with output_lock(config.output, "finetune"):
                report = finetune(config, resume)
            if report is not None:
                summary = {k: v for k, v in report.items() if k in ("task", "best_step", "dev", "test")}
                print(json.dumps(summary, ensure_ascii=False))
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from None
        finally:
            shutdown_distributed()

    return run_command("finetune", body)


if __name__ == "__main__":
    sys.exit(main())
