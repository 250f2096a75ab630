"""Masked language modelling, with optional next-sentence (BERT, Devlin et al. 2019) or
sentence-order prediction (ALBERT, Lan et al. 2020).

The batch comes from ``lub_fast.data.collator.MaskingCollator``: the masking (whole-word, n-gram or
token) is already applied, and ``masked_positions``/``masked_labels`` name the predicted tokens, so
the MLM logits are computed at those positions only (``[M, vocab]`` instead of ``[B, S, vocab]``).
"""

import torch
from torch import Tensor, nn

from lub_fast.models.heads import MaskedLM, PreTraining

PAIR_LABEL_KEYS = ("sentence_order_label", "next_sentence_label")


def masked_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of labelled rows (label != -100) whose arg-max is the label; 0 when none."""
    keep = labels != -100
    hits = (logits.detach().argmax(-1) == labels) & keep
    return hits.sum().float() / keep.sum().clamp(min=1).float()


class MaskedLMObjective(nn.Module):
    """MLM on ``MaskedLM``; MLM + NSP/SOP on ``PreTraining`` when the batch carries pair labels.

    Metrics: ``mlm_loss``, ``mlm_acc`` (masked-token accuracy), ``num_masked``; with pairs also
    ``pair_loss`` and ``pair_acc``.
    """

    def __init__(self, model: MaskedLM | PreTraining):
        super().__init__()
        if not isinstance(model, (MaskedLM, PreTraining)):
            raise TypeError(f"MaskedLMObjective needs a MaskedLM or PreTraining model, got {type(model).__name__}")
        self.model = model

    def pair_key(self, batch) -> str | None:
        if not isinstance(self.model, PreTraining):
            return None
        return next((k for k in PAIR_LABEL_KEYS if k in batch), None)

    def forward(self, batch) -> tuple[Tensor, dict]:
        positions, labels = batch["masked_positions"], batch["masked_labels"]
        kwargs = dict(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch.get("token_type_ids"),
            masked_positions=positions,
        )
        out = self.model(**kwargs)
        if labels.numel() > 0:
            mlm_loss = nn.functional.cross_entropy(out.logits.float(), labels, ignore_index=-100)
        else:  # nothing masked in this micro-batch: a zero loss that still reaches every parameter
            mlm_loss = out.logits.sum() * 0.0
        metrics = {
            "mlm_loss": mlm_loss.detach(),
            "mlm_acc": masked_accuracy(out.logits, labels),
            "num_masked": torch.tensor(labels.numel()),
        }
        loss = mlm_loss
        pair_key = self.pair_key(batch)
        if pair_key is not None:
            pair_logits = out.seq_relationship_logits.float()
            pair_labels = batch[pair_key].view(-1)
            pair_loss = nn.functional.cross_entropy(pair_logits, pair_labels)
            loss = loss + pair_loss
            metrics["pair_loss"] = pair_loss.detach()
            metrics["pair_acc"] = (pair_logits.detach().argmax(-1) == pair_labels).float().mean()
        return loss, metrics
