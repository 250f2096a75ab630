"""Fine-tuning objectives: sequence classification/regression, token classification, span QA.

Each wraps one task model of ``lub_fast.models.heads`` and returns ``(loss, metrics)`` for the
training loop. The losses are the models' own, which are HF ``transformers``' definitions (cross
entropy; MSE for regression; the mean of start and end cross entropies for span extraction, as
Devlin et al. 2019's ``run_squad.py``), so a model fine-tuned here and one fine-tuned with HF
``Trainer`` minimise the same function. Batches are dicts of padded ``[B, S]`` int64 tensors
``input_ids``, ``attention_mask``, ``token_type_ids`` plus the labels the objective names.
"""

from torch import Tensor, nn

from lub_fast.models.heads import QuestionAnswering, SequenceClassification, TokenClassification
from lub_fast.ops.wwm import IGNORE_INDEX


def _inputs(batch) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


class SequenceObjective(nn.Module):
    """``SequenceClassification`` on ``batch["labels"]``: int64 ``[B]`` class ids (cross entropy;
    metric ``accuracy``) or, for a one-output model with ``problem_type="regression"``, float ``[B]``
    scores (MSE; no extra metric: the loss is the MSE)."""

    def __init__(self, model: SequenceClassification):
        super().__init__()
        if not isinstance(model, SequenceClassification):
            raise TypeError(f"SequenceObjective needs a SequenceClassification model, got {type(model).__name__}")
        self.model = model
        self.regression = model.problem_type == "regression"
        if self.regression and model.num_labels != 1:
            raise ValueError(f"regression needs num_labels == 1, got {model.num_labels}")

    def forward(self, batch) -> tuple[Tensor, dict]:
        labels = batch["labels"]
        out = self.model(**_inputs(batch), labels=labels)
        if self.regression:
            return out.loss, {}
        accuracy = (out.logits.detach().argmax(-1) == labels).float().mean()
        return out.loss, {"accuracy": accuracy}


class TokenObjective(nn.Module):
    """``TokenClassification`` on ``batch["labels"]`` int64 ``[B, S]`` (-100: not scored, e.g.
    specials and continuation word pieces). Metrics: ``token_accuracy`` over scored tokens,
    ``num_labelled``."""

    def __init__(self, model: TokenClassification):
        super().__init__()
        if not isinstance(model, TokenClassification):
            raise TypeError(f"TokenObjective needs a TokenClassification model, got {type(model).__name__}")
        self.model = model

    def forward(self, batch) -> tuple[Tensor, dict]:
        labels = batch["labels"]
        out = self.model(**_inputs(batch), labels=labels)
        scored = labels != IGNORE_INDEX
        hits = (out.logits.detach().argmax(-1) == labels) & scored
        count = scored.sum()
        accuracy = hits.sum().float() / count.clamp(min=1).float()
        return out.loss, {"token_accuracy": accuracy, "num_labelled": count.float()}


class SpanObjective(nn.Module):
    """``QuestionAnswering`` on ``batch["start_positions"]``/``batch["end_positions"]`` int64 ``[B]``
    (0, the [CLS] token, when the window does not hold the answer). Metrics: ``start_accuracy``,
    ``end_accuracy`` (arg-max equals the gold position)."""

    def __init__(self, model: QuestionAnswering):
        super().__init__()
        if not isinstance(model, QuestionAnswering):
            raise TypeError(f"SpanObjective needs a QuestionAnswering model, got {type(model).__name__}")
        self.model = model

    def forward(self, batch) -> tuple[Tensor, dict]:
        starts, ends = batch["start_positions"], batch["end_positions"]
        out = self.model(**_inputs(batch), start_positions=starts, end_positions=ends)
        start_hit = (out.start_logits.detach().argmax(-1) == starts).float().mean()
        end_hit = (out.end_logits.detach().argmax(-1) == ends).float().mean()
        return out.loss, {"start_accuracy": start_hit, "end_accuracy": end_hit}


def objective_for(model: nn.Module) -> nn.Module:
    """The objective of a task model (by its class)."""
    if isinstance(model, SequenceClassification):
        return SequenceObjective(model)
    if isinstance(model, TokenClassification):
        return TokenObjective(model)
    if isinstance(model, QuestionAnswering):
        return SpanObjective(model)
    raise TypeError(f"no fine-tuning objective for {type(model).__name__}")

