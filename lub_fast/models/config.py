"""Encoder configuration: one frozen dataclass for BERT, RoBERTa, ALBERT and ELECTRA.

The four families share one post-LayerNorm Transformer encoder (Devlin et al. 2019, BERT); their
differences are fields:

- ALBERT (Lan et al. 2020): factorized embeddings (``embedding_size`` < ``hidden_size`` with an
  ``embedding_size -> hidden_size`` projection) and cross-layer parameter sharing
  (``num_hidden_groups`` groups of ``inner_group_num`` layers; layer ``i`` of
  ``num_hidden_layers`` runs group ``int(i / (num_hidden_layers / num_hidden_groups))``, as in HF's
  ``AlbertTransformer``).
- ELECTRA (Clark et al. 2020): an embedding projection when ``embedding_size != hidden_size``.
- RoBERTa (Liu et al. 2019, HF layout): positions start at ``position_offset = pad_token_id + 1``
  and count only tokens that are not ``pad_token_id``.
- ``type_vocab_size``, ``hidden_act`` (``"gelu"`` exact erf; ``"gelu_new"`` and
  ``"gelu_pytorch_tanh"`` the tanh approximation), ``layer_norm_eps``, dropouts.
- Heads (HF ``transformers`` 5's definitions), properties that follow from the family:
  ``has_pooler``, ``mlm_gelu_approximate``, ``classifier_activation``, ``pretraining_head``.

``from_hf``/``to_hf`` convert to and from the ``config.json`` dictionaries of HF ``transformers``
(``BertConfig``, ``RobertaConfig``, ``AlbertConfig``, ``ElectraConfig``).
"""

import dataclasses
from dataclasses import dataclass

from lub_fast.config_cli import check_fields, field_error, option

FAMILIES = ("bert", "roberta", "albert", "electra")
SIZES = ("tiny", "small", "base", "large")

# HF activation name -> ``approximate`` argument of ``bias_gelu``/``F.gelu``. HF's "gelu_new" is the
# tanh formula written out; it equals torch's tanh GELU within 1 ulp-level rounding (< 1e-6).
GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}

# Chinese vocabularies: bert-base-chinese / HFL releases have 21128 WordPiece tokens.
_CHINESE_VOCAB = 21128
_SMALL_VOCAB = 8192

# (layers, hidden, heads, intermediate) per size.
_SHAPES = {
    "tiny": (2, 128, 2, 512),
    "small": (4, 256, 4, 1024),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}


@dataclass(frozen=True)
class EncoderConfig:
    """Shape and numerics of one encoder. ``None`` fields are resolved in ``__post_init__``:
    ``embedding_size`` -> ``hidden_size``, ``num_hidden_groups`` -> ``num_hidden_layers`` (no
    sharing), ``classifier_dropout`` -> ``hidden_dropout_prob``."""

    family: str = "bert"
    vocab_size: int = option(_CHINESE_VOCAB, ge=1)
    hidden_size: int = option(768, ge=1)
    num_hidden_layers: int = option(12, ge=1)
    num_attention_heads: int = option(12, ge=1)
    intermediate_size: int = option(3072, ge=1)
    embedding_size: int | None = option(None, ge=1)
    num_hidden_groups: int | None = option(None, ge=1)
    inner_group_num: int = option(1, ge=1)
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = option(0.1, ge=0, lt=1)
    attention_probs_dropout_prob: float = option(0.1, ge=0, lt=1)
    classifier_dropout: float | None = option(None, ge=0, lt=1)
    max_position_embeddings: int = option(512, ge=1)
    type_vocab_size: int = option(2, ge=1)
    layer_norm_eps: float = option(1e-12, gt=0)
    pad_token_id: int = option(0, ge=0)
    position_offset: int = option(0, ge=0)
    initializer_range: float = option(0.02, ge=0)

    def __post_init__(self):
        if self.embedding_size is None:
            object.__setattr__(self, "embedding_size", self.hidden_size)
        if self.num_hidden_groups is None:
            object.__setattr__(self, "num_hidden_groups", self.num_hidden_layers)
        if self.classifier_dropout is None:
            object.__setattr__(self, "classifier_dropout", self.hidden_dropout_prob)
        check_fields(self)
        self._validate()

    def _validate(self):
        def fail(rule):
            raise ValueError(f"EncoderConfig({self.family}): {rule}")

        if self.family not in FAMILIES:
            fail(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.hidden_size % self.num_attention_heads:
            raise field_error(self, "hidden_size", f"a multiple of num_attention_heads = {self.num_attention_heads}")
        if self.hidden_act not in GELU_APPROXIMATE:
            fail(f"hidden_act must be one of {tuple(GELU_APPROXIMATE)}, got {self.hidden_act!r}")
        if not 1 <= self.num_hidden_groups <= self.num_hidden_layers:
            fail(
                f"num_hidden_groups {self.num_hidden_groups} must be in [1, num_hidden_layers "
                f"{self.num_hidden_layers}]"
            )
        if self.family != "albert":
            if self.num_hidden_groups != self.num_hidden_layers or self.inner_group_num != 1:
                fail("cross-layer sharing (num_hidden_groups, inner_group_num) is ALBERT only")
        if self.family in ("bert", "roberta") and self.embedding_size != self.hidden_size:
            fail(
                f"embedding_size {self.embedding_size} != hidden_size {self.hidden_size} is "
                "ALBERT/ELECTRA only"
            )
        expected_offset = self.pad_token_id + 1 if self.family == "roberta" else 0
        if self.position_offset != expected_offset:
            fail(
                f"position_offset must be {expected_offset} (RoBERTa: pad_token_id + 1, else 0), "
                f"got {self.position_offset}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_embedding_projection(self) -> bool:
        """ALBERT always maps embeddings to the hidden size; ELECTRA only when the sizes differ."""
        return self.family == "albert" or self.embedding_size != self.hidden_size

    @property
    def has_pooler(self) -> bool:
        """Whether the bare model has BERT's pooler (``dense -> tanh`` on the first token); ELECTRA has none."""
        return self.family != "electra"

    @property
    def mlm_gelu_approximate(self) -> str:
        """The MLM head's GELU: ``hidden_act``'s in BERT/ALBERT, exact in RoBERTa's LM head and the
        ELECTRA generator."""
        return "none" if self.family in ("roberta", "electra") else self.gelu_approximate

    @property
    def classifier_activation(self) -> str | None:
        """Sequence classifier: None for BERT/ALBERT's ``dropout -> linear`` on the pooler output;
        RoBERTa's ``"tanh"`` and ELECTRA's ``"gelu"`` (exact) name the activation of their
        ``dropout -> dense -> act -> dropout -> linear`` on the first token's state."""
        return {"roberta": "tanh", "electra": "gelu"}.get(self.family)

    @property
    def pretraining_head(self) -> str | None:
        """The family's pretraining head besides MLM: ``"nsp"`` (BERT's next sentence prediction),
        ``"sop"`` (ALBERT's sentence order prediction, with classifier dropout before it), ``"rtd"``
        (ELECTRA's replaced-token detection); None for RoBERTa (MLM only)."""
        return {"bert": "nsp", "albert": "sop", "electra": "rtd"}.get(self.family)

    @property
    def num_unique_layers(self) -> int:
        return self.num_hidden_groups * self.inner_group_num

    @property
    def gelu_approximate(self) -> str:
        return GELU_APPROXIMATE[self.hidden_act]

    def layer_schedule(self) -> list[int]:
        """Indices into the unique layers, in the order the forward pass runs them (HF ALBERT order)."""
        order = []
        for i in range(self.num_hidden_layers):
            group = int(i / (self.num_hidden_layers / self.num_hidden_groups))
            order.extend(group * self.inner_group_num + j for j in range(self.inner_group_num))
        return order

    @classmethod
    def preset(cls, family: str, size: str, **changes) -> "EncoderConfig":
        """Named preset ``size`` in ``SIZES`` for ``family`` in ``FAMILIES``; ``changes`` override fields.

        ``small`` is 4 layers, hidden 256, 4 heads, intermediate 1024, vocab 8192 for every family;
        ``tiny`` (2/128/2/512) also has vocab 8192; ``base``/``large`` have the Chinese vocab (21128).
        """
        if family not in FAMILIES or size not in SIZES:
            raise ValueError(f"EncoderConfig.preset: family in {FAMILIES}, size in {SIZES}; got {family!r}, {size!r}")
        layers, hidden, heads, inter = _SHAPES[size]
        fields = dict(
            family=family,
            vocab_size=_SMALL_VOCAB if size in ("tiny", "small") else _CHINESE_VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
        )
        if family == "roberta":
            fields.update(pad_token_id=1, position_offset=2, max_position_embeddings=514, type_vocab_size=1)
        elif family == "albert":
            fields.update(
                embedding_size=min(128, hidden // 2),
                num_hidden_groups=1,
                hidden_act="gelu_new",
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                classifier_dropout=0.1,
            )
        elif family == "electra" and size in ("tiny", "small"):
            fields.update(embedding_size=hidden // 2)
        fields.update(changes)
        return cls(**fields)

    def electra_generator(self, divisor: int = 4) -> "EncoderConfig":
        """The ELECTRA generator for this discriminator config: hidden size, heads and intermediate
        size divided by ``divisor`` (Clark et al. 2020, Sec. 3.2), same embeddings (shared)."""
        if self.family != "electra":
            raise ValueError(f"electra_generator: needs an electra config, got family {self.family!r}")
        return dataclasses.replace(
            self,
            hidden_size=self.hidden_size // divisor,
            num_attention_heads=max(1, self.num_attention_heads // divisor),
            intermediate_size=self.intermediate_size // divisor,
            num_hidden_groups=self.num_hidden_layers,
        )

    # ---- HF config.json -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict) -> "EncoderConfig":
        """From an HF ``config.json`` dict of model_type bert, roberta, albert or electra.

        Chinese "RoBERTa-wwm" releases are model_type ``bert`` and load as family ``bert``.
        """
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"unsupported HF model_type {family!r}; lub_fast loads {FAMILIES}")
        pad = hf.get("pad_token_id")
        pad = {"roberta": 1}.get(family, 0) if pad is None else pad
        fields = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout_prob=hf.get("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob=hf.get("attention_probs_dropout_prob", 0.1),
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=pad,
            position_offset=pad + 1 if family == "roberta" else 0,
            initializer_range=hf.get("initializer_range", 0.02),
        )
        if family == "albert":
            fields.update(
                embedding_size=hf.get("embedding_size", 128),
                num_hidden_groups=hf.get("num_hidden_groups", 1),
                inner_group_num=hf.get("inner_group_num", 1),
                classifier_dropout=hf.get("classifier_dropout_prob", 0.1),
            )
        else:
            fields["classifier_dropout"] = hf.get("classifier_dropout")
        if family == "electra":
            fields["embedding_size"] = hf.get("embedding_size", 128)
        return cls(**fields)

    def to_hf(self) -> dict:
        """The HF ``config.json`` dict (without ``architectures``) for this config's family."""
        hf = dict(
            model_type=self.family,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
            tie_word_embeddings=True,
        )
        if self.family == "albert":
            hf.update(
                embedding_size=self.embedding_size,
                num_hidden_groups=self.num_hidden_groups,
                inner_group_num=self.inner_group_num,
                classifier_dropout_prob=self.classifier_dropout,
            )
        else:
            hf["classifier_dropout"] = self.classifier_dropout
        if self.family == "electra":
            hf["embedding_size"] = self.embedding_size
        return hf
