"""A lub_fast run directory (what ``pretrain`` and ``distill`` write) and the checkpoints a run
starts from: recognising a run, loading it as a model, loading an init checkpoint, and exporting
the trained model(s) as HF directories with the vocabulary they trained on.

    RUN/config.json          the resolved config (``--config`` takes it back)
    RUN/checkpoints/step_*   ``lub_fast.checkpoint`` directories
    RUN/data/train           raw text prepared for the run (``lub_fast.data.sources``)
    RUN/hf                   the export (ELECTRA: hf/discriminator and hf/generator)
"""

import json
import tempfile
from pathlib import Path

from lub_fast.models.load import (
    from_pretrained,
    from_pretrained_electra_pair,
    tf1_family,
)
from lub_fast.recipes import PretrainConfig, PretrainError, build_objective


def is_run_dir(path) -> bool:
    """A lub_fast pretraining run directory (or one of its checkpoints)."""
    path = Path(path)
    if (path / "manifest.json").exists() and path.parent.name == "checkpoints":
        return True
    config = path / "config.json"
    if not (config.exists() and (path / "checkpoints").is_dir()):
        return False
    try:
        return "recipe" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_run(path):
    """The objective of a lub_fast pretraining run with the weights of its newest valid checkpoint
    (or of the checkpoint directory ``path``), and the run's vocab.txt."""
    from lub_fast import checkpoint as ckpt
    from lub_fast.config_cli import load_config
    from lub_fast.data.tokenizer import read_vocab

    path = Path(path)
    single = (path / "manifest.json").exists()
    run_dir = path.parent.parent if single else path
    cfg = load_config(PretrainConfig, run_dir / "config.json")
    shard_vocabs = [Path(d) / "vocab.txt" for d in cfg.data.data]
    vocab = next((p for p in (run_dir / "data" / "train" / "vocab.txt", *shard_vocabs) if p.exists()), None)
    if vocab is None:
        raise ValueError(f"{run_dir}: cannot find the run's vocab.txt (its training shards are gone)")
    tokens = read_vocab(vocab)
    init = load_init(cfg) if cfg.init_from else None
    objective, _ = build_objective(cfg, len(tokens), {"pad": tokens.index("[PAD]")}, init)
    if single:
        ckpt.load_checkpoint(path, objective)
    elif ckpt.load_latest_checkpoint(path, objective) is None:
        raise ValueError(f"{path}: the run has no valid checkpoint")
    return objective, str(vocab)


def run_models(path) -> tuple[list[tuple[str, object]], str]:
    """``([(name, model)], vocab.txt path)`` of a run: ``[("", model)]``, or the ELECTRA
    ``generator`` and ``discriminator``, and the vocabulary they trained on."""
    objective, vocab = load_run(path)
    if hasattr(objective, "pair"):
        return [("generator", objective.pair.generator), ("discriminator", objective.pair.discriminator)], vocab
    return [("", objective.model)], vocab


def load_model(path, task: str | None = None):
    """A lub_fast model from an HF directory, a TF-1 checkpoint or a lub_fast run (its MLM model;
    for ELECTRA runs the discriminator). ``task`` as ``lub_fast.from_pretrained``."""
    if not is_run_dir(path):
        return from_pretrained(path, task=task)
    models = dict(run_models(path)[0])
    model = models.get("discriminator") or models[""]
    if task not in (None, model.task):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return from_pretrained(tmp, task=task)
    return model


def load_init(cfg: PretrainConfig):
    """What ``cfg.init_from`` continues from, with the recipe's heads: a model, or for ELECTRA the
    ``ElectraPair`` (``DISC_DIR,GEN_DIR``, or one TF-1 checkpoint holding both). An absent head
    (HFL's releases have no MLM head) is initialised and reported by the loader."""
    if cfg.recipe != "electra":
        return _load_init_model(cfg)
    disc_dir, _, gen_dir = cfg.init_from.partition(",")
    tf1 = None if gen_dir else tf1_family(disc_dir)
    if not gen_dir and (tf1 is None or tf1[0] != "electra"):
        _load_init_model(cfg)  # names the family of a non-ELECTRA checkpoint
        raise PretrainError(
            "--recipe electra --init-from needs DISC_DIR,GEN_DIR (the two HF directories) or a "
            "TF-1 ELECTRA checkpoint that holds both"
        )
    try:
        return from_pretrained_electra_pair(disc_dir, gen_dir or None)
    except (FileNotFoundError, ValueError) as error:
        raise PretrainError(f"--init-from {cfg.init_from}: {error}") from None


def _load_init_model(cfg: PretrainConfig):
    path = cfg.init_from.partition(",")[0]
    try:
        model = load_model(path, task=cfg.init_task)
    except (FileNotFoundError, ValueError) as error:
        raise PretrainError(f"--init-from {path}: {error}") from None
    family = model.config.family
    allowed = {"bert": ("bert", "roberta"), "albert": ("albert",), "electra": ("electra",)}[cfg.family]
    if family not in allowed:
        suggestion = {"bert": "roberta or bert", "roberta": "roberta", "albert": "albert", "electra": "electra"}[family]
        raise PretrainError(
            f"--init-from {path} is a {family} checkpoint but --recipe {cfg.recipe} trains "
            f"{cfg.family}: use --recipe {suggestion}"
        )
    return model


def export_hf(objective, vocab_path: str, directory: Path) -> list[Path]:
    """Write the trained model(s) of ``objective`` as HF directories with the vocabulary they
    trained on; returns their paths (ELECTRA: ``discriminator`` and ``generator`` below
    ``directory``)."""
    from lub_fast.objectives import ElectraObjective

    if isinstance(objective, ElectraObjective):
        objective.pair.save_pretrained(directory, tokenizer=vocab_path)
        return [directory / "discriminator", directory / "generator"]
    objective.model.save_pretrained(directory, tokenizer=vocab_path)
    return [directory]
