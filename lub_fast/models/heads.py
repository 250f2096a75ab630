"""Task heads and the models that put them on the encoder.

Heads follow the papers' definitions in HF ``transformers`` 5's layout (``modeling_bert.py``,
``modeling_roberta.py``, ``modeling_albert.py``, ``modeling_electra.py``), numerically:

- MLM (Devlin et al. 2019): ``dense -> GELU -> LayerNorm -> x @ E^T + bias`` with the decoder tied to
  the word embeddings ``E`` (ALBERT/ELECTRA project to ``embedding_size`` first). RoBERTa's LM head
  and the ELECTRA generator always use exact GELU; BERT/ALBERT use ``hidden_act``. Logits are
  computed only at the ``masked_positions`` asked for, or at every real token for HF parity.
- NSP (BERT) / SOP (ALBERT, Lan et al. 2020): a 2-way classifier on the pooler output (ALBERT adds
  classifier dropout before it).
- ELECTRA discriminator (Clark et al. 2020): replaced-token detection, ``dense -> act -> 1`` per token.
  The ELECTRA generator is ``MaskedLM`` with an electra config; ``ElectraPair`` ties its embeddings to
  the discriminator's.
- Sequence classification/regression: BERT/ALBERT ``dropout -> linear`` on the pooler; RoBERTa and
  ELECTRA ``dropout -> dense -> tanh|gelu -> dropout -> linear`` on the first token.
- Token classification: ``dropout -> linear`` per token. Span-extraction QA: ``linear -> 2`` per token.

Losses match HF's definitions, computed over real tokens only (HF also counts padded positions whose
label is not -100; collators label padding -100, where the two agree). Per-token outputs are padded
back to ``[B, S, ...]`` with zeros at padding, except QA logits, which are ``finfo.min`` there so that
no answer can start or end on padding.

Family differences come from ``EncoderConfig`` properties (``mlm_gelu_approximate``,
``classifier_activation``, ``pretraining_head``, ``has_pooler``). Every model here has ``config``
(``EncoderConfig``), ``encoder`` (``Encoder``), ``task`` (the key of ``hf.ARCHITECTURES``) and
``save_pretrained(dir, tokenizer=None, labels=None)`` (``lub_fast.models.save``); models hold
weights only: the vocabulary and label names travel as arguments of ``save_pretrained`` and are
read back with ``lub_fast.models.load.read_tokenizer_files``/``read_labels``.
"""

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lub_fast.models.config import EncoderConfig
from lub_fast.models.encoder import Encoder, EncoderOutput, init_weights
from lub_fast.models.save import save_pretrained as _save_pretrained
from lub_fast.ops.bias_gelu import bias_gelu
from lub_fast.ops.wwm import IGNORE_INDEX


@dataclass
class ModelOutput:
    """What a model returns. ``encoder`` holds the unpadded states; ``last_hidden_state`` and
    ``pooler_output`` are read through it. Fields a model does not produce stay None.

    ``logits``: MLM ``[M, V]`` at ``masked_positions`` or ``[B, S, V]``; RTD ``[B, S]``; sequence
    ``[B, C]``; token ``[B, S, C]``. ``PreTraining`` names its outputs as transformers'
    ``BertForPreTraining``/``AlbertForPreTraining`` do: ``prediction_logits`` (the MLM logits, also
    in ``logits``) and ``seq_relationship_logits`` ``[B, 2]`` (BERT's NSP) or ``sop_logits``
    ``[B, 2]`` (ALBERT's SOP). ``start_logits``/``end_logits`` ``[B, S]`` (QA). ``loss``: the sum
    of the losses whose labels were given.
    """

    encoder: EncoderOutput
    loss: Tensor | None = None
    logits: Tensor | None = None
    prediction_logits: Tensor | None = None
    seq_relationship_logits: Tensor | None = None
    sop_logits: Tensor | None = None
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None

    @property
    def last_hidden_state(self) -> Tensor:
        return self.encoder.last_hidden_state

    @property
    def pooler_output(self) -> Tensor | None:
        return self.encoder.pooler_output


class MLMHead(nn.Module):
    """``x [N, hidden] -> [N, vocab]``: ``LN(gelu(W x + b)) @ E^T + bias`` with ``E`` passed in (tied)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.approximate = config.mlm_gelu_approximate
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.norm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        h = bias_gelu(F.linear(x, self.dense.weight), self.dense.bias, self.approximate)
        return F.linear(self.norm(h), word_embeddings, self.bias)


class RTDHead(nn.Module):
    """ELECTRA discriminator: ``x [T, hidden] -> [T]`` replaced-token logits."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.approximate = config.gelu_approximate
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = bias_gelu(F.linear(x, self.dense.weight), self.dense.bias, self.approximate)
        return self.out(h).squeeze(-1)


class ClassificationHead(nn.Module):
    """``[B, hidden] -> [B, num_labels]``: ``dropout -> out`` on the pooler output, or with
    ``config.classifier_activation`` ``dropout -> dense -> tanh | gelu -> dropout -> out`` on the
    first token's state."""

    def __init__(self, config: EncoderConfig, num_labels: int):
        super().__init__()
        self.config = config
        self.activation = {None: None, "tanh": torch.tanh, "gelu": F.gelu}[config.classifier_activation]
        self.dense = nn.Linear(config.hidden_size, config.hidden_size) if self.activation else None
        self.out = nn.Linear(config.hidden_size, num_labels)

    def forward(self, x: Tensor) -> Tensor:
        p = self.config.classifier_dropout
        x = F.dropout(x, p, self.training)
        if self.dense is not None:
            x = F.dropout(self.activation(self.dense(x)), p, self.training)
        return self.out(x)


class _Model(nn.Module):
    """Shared plumbing: the encoder, head initialisation, the MLM head's forward and HF export."""

    task = ""

    def __init__(self, config: EncoderConfig, add_pooler: bool):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, add_pooler=add_pooler)

    def _init_heads(self, *heads: nn.Module) -> None:
        for head in heads:
            head.apply(functools.partial(init_weights, std=self.config.initializer_range))

    def save_pretrained(self, path, tokenizer=None, labels=None) -> None:
        """Write an HF directory; see ``lub_fast.models.save.save_pretrained``."""
        _save_pretrained(self, path, tokenizer=tokenizer, labels=labels)

    def _encode_mlm(self, input_ids, attention_mask, token_type_ids, position_ids, labels, masked_positions,
                    sparse_last_layer):  # fmt: skip
        """(encoder output, MLM logits, MLM loss) as ``MaskedLM.forward`` documents them."""
        sparse = masked_positions if sparse_last_layer else None  # the last layer at the masked positions only
        out = self.encoder(input_ids, attention_mask, token_type_ids, position_ids, sparse)
        return (out, *self._mlm(out, labels, masked_positions))

    def _mlm(self, out: EncoderOutput, labels: Tensor | None, masked_positions: Tensor | None):
        """(logits, loss): ``[M, V]`` at ``masked_positions`` with ``labels [M]``, else ``[B, S, V]``
        (zeros at padding) with ``labels [B, S]``; the loss is over real, labelled tokens."""
        word = self.encoder.embeddings.word.weight
        if masked_positions is not None:
            logits = self.mlm(out.at(masked_positions), word)
            if labels is not None and labels.shape != masked_positions.shape:
                raise ValueError(
                    f"with masked_positions {tuple(masked_positions.shape)}, labels must be the "
                    f"masked labels of the same shape; got {tuple(labels.shape)}"
                )
            loss = None if labels is None else F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
            return logits, loss
        token_logits = self.mlm(out.hidden, word)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(token_logits.float(), out.unpadded.unpad(labels), ignore_index=IGNORE_INDEX)
        return out.unpadded.pad(token_logits), loss


class EncoderModel(_Model):
    """The bare encoder (HF ``BertModel`` etc.); a pooler where ``config.has_pooler`` unless disabled."""

    task = "base"

    def __init__(self, config: EncoderConfig, add_pooler: bool | None = None):
        super().__init__(config, config.has_pooler if add_pooler is None else add_pooler)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> ModelOutput:
        return ModelOutput(self.encoder(input_ids, attention_mask, token_type_ids, position_ids))


class MaskedLM(_Model):
    """Masked language model (HF ``*ForMaskedLM``; with an electra config, the ELECTRA generator).

    ``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
    masked_positions=None)``: with ``masked_positions`` (int64 ``[M]``, flat indices ``b * S + s`` of
    real tokens) the logits are ``[M, vocab]`` at those positions only and ``labels`` are ``[M]``;
    without, logits are ``[B, S, vocab]`` and ``labels`` ``[B, S]`` (-100 = ignored). ``loss`` is the
    mean cross entropy over labelled tokens. ``sparse_last_layer=True`` (with ``masked_positions``;
    what the training objectives use) runs the encoder's last layer at those positions only: the
    same logits, less compute, but then only ``output.encoder.at(masked_positions)`` holds final
    states (no ``last_hidden_state``).
    """

    task = "masked_lm"

    def __init__(self, config: EncoderConfig):
        super().__init__(config, add_pooler=False)
        self.mlm = MLMHead(config)
        self._init_heads(self.mlm)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                masked_positions=None, sparse_last_layer=False) -> ModelOutput:  # fmt: skip
        out, logits, loss = self._encode_mlm(
            input_ids, attention_mask, token_type_ids, position_ids, labels, masked_positions, sparse_last_layer
        )
        return ModelOutput(out, loss=loss, logits=logits)


class PreTraining(_Model):
    """MLM + NSP (BERT) or SOP (ALBERT) on the pooler (HF ``BertForPreTraining``/``AlbertForPreTraining``).

    ``forward(..., labels=None, masked_positions=None, pair_labels=None, sparse_last_layer=False)``:
    MLM as in ``MaskedLM`` (with ``sparse_last_layer``, the last layer at the masked positions and
    the first tokens only);
    ``pair_labels`` int64 ``[B]`` (NSP: 0 = B follows A; SOP: 0 = original order). ``loss`` is the
    sum of the losses whose labels are given.
    """

    task = "pretraining"

    def __init__(self, config: EncoderConfig):
        if config.pretraining_head not in ("nsp", "sop"):
            raise ValueError(f"PreTraining (MLM + NSP/SOP) is for bert and albert, not {config.family}")
        super().__init__(config, add_pooler=True)
        self.mlm = MLMHead(config)
        self.pair = nn.Linear(config.hidden_size, 2)
        self._init_heads(self.mlm, self.pair)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                masked_positions=None, pair_labels=None, sparse_last_layer=False) -> ModelOutput:  # fmt: skip
        out, logits, mlm_loss = self._encode_mlm(
            input_ids, attention_mask, token_type_ids, position_ids, labels, masked_positions, sparse_last_layer
        )
        sop = self.config.pretraining_head == "sop"
        pooled = out.pooler_output
        if sop:  # ALBERT's SOP head drops out the pooler output first
            pooled = F.dropout(pooled, self.config.classifier_dropout, self.training)
        pair_logits = self.pair(pooled)
        pair_loss = None if pair_labels is None else F.cross_entropy(pair_logits.float(), pair_labels.view(-1))
        parts = [x for x in (mlm_loss, pair_loss) if x is not None]
        pair_name = "sop_logits" if sop else "seq_relationship_logits"
        return ModelOutput(
            out, loss=sum(parts) if parts else None, logits=logits, prediction_logits=logits, **{pair_name: pair_logits}
        )


class ElectraDiscriminator(_Model):
    """ELECTRA replaced-token detection (HF ``ElectraForPreTraining``).

    ``logits [B, S]`` (zeros at padding); ``labels [B, S]`` (1 = replaced) give the mean binary
    cross entropy over real tokens.
    """

    task = "discriminator"

    def __init__(self, config: EncoderConfig):
        if config.pretraining_head != "rtd":
            raise ValueError(f"ElectraDiscriminator needs an electra config, got {config.family}")
        super().__init__(config, add_pooler=False)
        self.rtd = RTDHead(config)
        self._init_heads(self.rtd)

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None
    ) -> ModelOutput:
        out = self.encoder(input_ids, attention_mask, token_type_ids, position_ids)
        token_logits = self.rtd(out.hidden)
        loss = None
        if labels is not None:
            target = out.unpadded.unpad(labels).to(torch.float32)
            loss = F.binary_cross_entropy_with_logits(token_logits.float(), target)
        return ModelOutput(out, loss=loss, logits=out.unpadded.pad(token_logits))


class SequenceClassification(_Model):
    """Sequence classification or regression (HF ``*ForSequenceClassification``).

    ``logits [B, num_labels]``. Loss as HF: ``problem_type`` "regression" (MSE; the default when
    ``num_labels == 1``), "single_label_classification" (cross entropy; default for int labels) or
    "multi_label_classification" (BCE with logits; default for float labels).
    """

    task = "sequence_classification"

    def __init__(self, config: EncoderConfig, num_labels: int = 2, problem_type: str | None = None):
        super().__init__(config, add_pooler=config.classifier_activation is None)
        self.num_labels = num_labels
        self.problem_type = problem_type
        self.classifier = ClassificationHead(config, num_labels)
        self._init_heads(self.classifier)

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None
    ) -> ModelOutput:
        out = self.encoder(input_ids, attention_mask, token_type_ids, position_ids)
        features = out.pooler_output if out.pooler_output is not None else out.unpadded.first_tokens(out.hidden)
        logits = self.classifier(features)
        loss = None if labels is None else self._loss(logits, labels)
        return ModelOutput(out, loss=loss, logits=logits)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        problem = self.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


class TokenClassification(_Model):
    """Per-token classification (NER; HF ``*ForTokenClassification``): ``logits [B, S, num_labels]``,
    ``labels [B, S]`` (-100 ignored) give the mean cross entropy over real tokens."""

    task = "token_classification"

    def __init__(self, config: EncoderConfig, num_labels: int = 2):
        super().__init__(config, add_pooler=False)
        self.num_labels = num_labels
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self._init_heads(self.classifier)

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None
    ) -> ModelOutput:
        out = self.encoder(input_ids, attention_mask, token_type_ids, position_ids)
        token_logits = self.classifier(F.dropout(out.hidden, self.config.classifier_dropout, self.training))
        loss = None
        if labels is not None:
            target = out.unpadded.unpad(labels)
            loss = F.cross_entropy(token_logits.float(), target, ignore_index=IGNORE_INDEX)
        return ModelOutput(out, loss=loss, logits=out.unpadded.pad(token_logits))


class QuestionAnswering(_Model):
    """Span extraction (CMRC2018; HF ``*ForQuestionAnswering``): ``start_logits``/``end_logits
    [B, S]`` (``finfo.min`` at padding). ``start_positions``/``end_positions`` int64 ``[B]`` give HF's
    loss: positions clamped to ``[0, S]``, ``S`` ignored, mean of the two cross entropies."""

    task = "question_answering"

    def __init__(self, config: EncoderConfig):
        super().__init__(config, add_pooler=False)
        self.num_labels = 2
        self.qa = nn.Linear(config.hidden_size, 2)
        self._init_heads(self.qa)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        start_positions=None,
        end_positions=None,
    ) -> ModelOutput:
        out = self.encoder(input_ids, attention_mask, token_type_ids, position_ids)
        token_logits = self.qa(out.hidden)
        padded = out.unpadded.pad(token_logits, fill=torch.finfo(token_logits.dtype).min)
        start_logits, end_logits = padded.unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]
            start = start_positions.view(-1).clamp(0, ignored)
            end = end_positions.view(-1).clamp(0, ignored)
            loss = (
                F.cross_entropy(start_logits.float(), start, ignore_index=ignored)
                + F.cross_entropy(end_logits.float(), end, ignore_index=ignored)
            ) / 2
        return ModelOutput(out, loss=loss, start_logits=start_logits, end_logits=end_logits)


class ElectraPair(nn.Module):
    """ELECTRA generator (``MaskedLM``, electra config) and discriminator sharing one ``Embeddings``
    module (word, position, token type embeddings and their LayerNorm), as in ELECTRA's
    ``run_pretraining.py``; each keeps its own embedding projection. The generator's MLM decoder is
    thus tied to the shared word embeddings."""

    def __init__(self, generator: MaskedLM, discriminator: ElectraDiscriminator):
        super().__init__()
        gen, disc = generator.config, discriminator.config
        shared = ("family", "vocab_size", "embedding_size", "max_position_embeddings", "type_vocab_size",
                  "pad_token_id", "layer_norm_eps")  # fmt: skip
        differing = [
            f"{name}: {getattr(gen, name)} vs {getattr(disc, name)}"
            for name in shared
            if getattr(gen, name) != getattr(disc, name)
        ]
        if differing:
            raise ValueError(f"ElectraPair: generator and discriminator embeddings differ ({'; '.join(differing)})")
        generator.encoder.embeddings = discriminator.encoder.embeddings
        self.generator = generator
        self.discriminator = discriminator

    def save_pretrained(self, path, tokenizer=None) -> None:
        """Write ``path/generator`` and ``path/discriminator`` HF directories, each with the
        ``tokenizer`` files (see ``lub_fast.models.save.save_pretrained``)."""
        for name, model in (("generator", self.generator), ("discriminator", self.discriminator)):
            model.save_pretrained(os.path.join(path, name), tokenizer=tokenizer)
