"""``python -m lub_fast.convert``: checkpoints between HF directories, TensorFlow-1 checkpoints and
lub_fast runs.

Sources (detected): an HF directory (``config.json`` + safetensors/bin), a TF-1 checkpoint (a
directory with ``model.ckpt.index`` + ``bert_config.json``/``albert_config.json``, or a ``model.ckpt``
prefix), or a lub_fast run directory (``python -m lub_fast.pretrain``/``distill`` output: its newest
valid checkpoint, or a given ``checkpoints/step_*`` directory). Targets: ``--to hf`` (default) writes
an HF directory the matching ``transformers`` Auto class loads; ``--to tf1`` writes Google's layout
(``model.ckpt.*``, ``bert_config.json``/``albert_config.json``, ``vocab.txt``) that TensorFlow's
``tf.train.load_checkpoint`` and bert4keras read. An ELECTRA run, or a TF-1 ELECTRA checkpoint that
holds its generator (google-research/electra's), converts to ``DST/generator`` and
``DST/discriminator`` (``--to hf``) or one TF-1 checkpoint holding both (``--to tf1``, as
google-research/electra writes it).

    python -m lub_fast.convert chinese_L-12_H-768_A-12/ bert-base-chinese-hf/
    python -m lub_fast.convert runs/wwm/ exported/ --to tf1
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

from lub_fast.errors import EXIT_CODES_HELP, UsageError, run_command
from lub_fast.lock import output_lock
from lub_fast.models.hf import lub_to_hf
from lub_fast.models.load import (
    from_pretrained,
    from_pretrained_electra_pair,
    read_labels,
    read_tokenizer_files,
    tf1_family,
)
from lub_fast.runs import is_run_dir, run_models


def _models(src):
    """``([(name, model)], tokenizer files, label names)`` to convert: one model, or the ELECTRA
    generator and discriminator of a run or of a TF-1 checkpoint that holds both; the tokenizer
    files that lay beside them (a run's: the vocab.txt it trained on) and an HF classifier's labels."""
    if is_run_dir(src):
        models, vocab = run_models(src)
        return models, {"vocab.txt": Path(vocab).read_bytes()}, None
    if tf1_family(src) == ("electra", True):
        pair = from_pretrained_electra_pair(src)
        return [("generator", pair.generator), ("discriminator", pair.discriminator)], read_tokenizer_files(src), None
    return [("", from_pretrained(src))], read_tokenizer_files(src), read_labels(src)


def convert(src, dst, to: str = "hf") -> list[Path]:
    """Convert ``src`` into ``dst``; returns the written directories."""
    from lub_fast.tf1 import save_tf1_checkpoint

    dst = Path(dst)
    models, tokenizer, labels = _models(src)
    if to == "hf":
        written = []
        for name, model in models:
            model.save_pretrained(dst / name if name else dst, tokenizer=tokenizer, labels=labels)
            written.append(dst / name if name else dst)
        return written
    if to != "tf1":
        raise ValueError(f"--to must be hf or tf1, got {to!r}")

    def hf_parts(model):
        config = model.config.to_hf()
        return config, lub_to_hf(model.state_dict(), model.config, model.task)

    by_name = dict(models)
    main = by_name.get("discriminator") or by_name[""]
    if main.config.family == "roberta":
        raise ValueError("HF RoBERTa (model_type roberta) has no TF-1 layout; Chinese RoBERTa-wwm models are BERT")
    generator = hf_parts(by_name["generator"]) if "generator" in by_name else None
    vocab = None
    if "vocab.txt" in tokenizer:  # read_tokenizer_files makes one of a tokenizer.json's WordPiece
        dst.mkdir(parents=True, exist_ok=True)
        vocab = dst / "vocab.txt"
        vocab.write_bytes(tokenizer["vocab.txt"])
    else:
        warnings.warn(f"lub_fast.convert: {src} has no vocab.txt or tokenizer.json; {dst} is written without a vocab.txt", stacklevel=2)
    config, state = hf_parts(main)
    save_tf1_checkpoint(dst, config, state, main.config.family, vocab_file=vocab, generator=generator)
    return [dst]


def main(argv=None) -> int:
    """Entry point; returns the exit status (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m lub_fast.convert",
        description=__doc__,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="HF directory, TF-1 checkpoint (directory or model.ckpt prefix), or lub_fast run")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--to", choices=("hf", "tf1"), default="hf", help="output format (default: hf)")
    args = parser.parse_args(argv)

    def body():
        _check_json(Path(args.src) / "config.json")
        with output_lock(args.dst, "convert"):
            try:
                written = convert(args.src, args.dst, args.to)
            except UsageError:
                raise
            except (ValueError, FileNotFoundError) as error:
                raise UsageError(str(error)) from None
        for path in written:
            print(f"wrote {path}")

    return run_command("convert", body)


def _check_json(path: Path) -> None:
    """A source's config.json that exists must parse: say which file when it does not."""
    if not path.is_file():
        return
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: not a readable JSON config ({error})") from None


if __name__ == "__main__":
    sys.exit(main())
