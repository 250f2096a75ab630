"""Config sections that more than one command reads: the data, masking and model-shape fields of
``pretrain`` and ``distill``, defined once; a command's config composes them (and subclasses one
to add its own fields or narrow a choice). Field syntax and checks: ``lub_fast.config_cli``."""

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lub_fast.config_cli import check_fields, option


@dataclass(frozen=True)
class DataSection:
    data: tuple[str, ...] = option((), "training shard directories (python -m lub_fast.prepare)")
    eval_data: tuple[str, ...] = option((), "held-out shard directories (masked-token accuracy)")
    max_seq_len: int = option(128, "tokens per example, [CLS] and [SEP] included", ge=8)
    batch_size: int = option(32, "examples per micro-batch per rank", ge=1)
    short_seq_prob: float = option(0.1, "probability of a shorter target length (BERT's short_seq_prob)", ge=0, le=1)
    seed: int = option(12345, "seed of example order, pairs and masking", ge=0)
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
class ShapeSection:
    """Overrides of a size preset's shape; ``None`` keeps the preset's value. A subclass adds the
    preset's name; each of its fields that defaults to ``None`` is an override too."""

    num_hidden_layers: int | None = option(None, "override the preset's layer count", ge=1)
    hidden_size: int | None = option(None, "override the preset's hidden size", ge=1)
    num_attention_heads: int | None = option(None, "override the preset's head count", ge=1)
    intermediate_size: int | None = option(None, "override the preset's feed-forward size", ge=1)
    embedding_size: int | None = option(None, "factorized embedding size (ALBERT, ELECTRA)", ge=1)
    hidden_dropout_prob: float | None = option(None, "override the preset's hidden dropout", ge=0, lt=1)
    attention_probs_dropout_prob: float | None = option(None, "override the preset's attention dropout", ge=0, lt=1)
    initializer_range: float | None = option(None, "override the preset's initial weight std (BERT: 0.02)", gt=0)

    def __post_init__(self):
        check_fields(self)

    def overrides(self) -> dict:
        """``EncoderConfig.preset`` keyword arguments: the override fields that are set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.default is None and getattr(self, f.name) is not None}
