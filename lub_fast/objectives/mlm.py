"""Masked language modelling, with optional next-sentence (BERT, Devlin et al. 2019) or
sentence-order prediction (ALBERT, Lan et al. 2020).

The batch comes from ``lub_fast.data.collator.MaskingCollator``: the masking (whole-word, n-gram or
token) is already applied, and ``masked_positions``/``masked_labels`` name the predicted tokens, so
the MLM logits are computed at those positions only (``[M, vocab]`` instead of ``[B, S, vocab]``).

Token-level losses are means over the tokens of the whole data-parallel micro-batch: in training
under ``torch.distributed`` each rank divides its sum by the masked-token count summed over ranks
(one scalar ``all_reduce`` in ``mean_scale``) and multiplies by the world size, so DDP's gradient
averaging yields the gradient of the global mean. A 2-rank run then computes what one process does with both halves in
one batch, whatever the per-rank masked counts (a mean of per-rank means would weigh a rank's
tokens by the inverse of its count).
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lub_fast.models.heads import MaskedLM, PreTraining
from lub_fast.ops.wwm import IGNORE_INDEX

PAIR_LABEL_KEYS = ("sentence_order_label", "next_sentence_label")


def mean_scale(keep: Tensor, training: bool) -> Tensor:
    """fp32 scalar that turns a sum over the ``keep`` positions of this rank into the mean over the
    global micro-batch: ``world_size / (keep.sum() summed over ranks)`` in training under
    ``torch.distributed`` (one ``all_reduce``), else ``1 / keep.sum()``; a count of 0 counts as 1."""
    count = keep.sum().to(torch.float32)
    world = 1
    if training and dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        world = dist.get_world_size()
    return world / count.clamp(min=1.0)


def masked_sum(values: Tensor, keep: Tensor) -> Tensor:
    """Sum of ``values`` where ``keep`` is True (still connected to the graph when nothing is kept)."""
    return torch.where(keep, values, torch.zeros_like(values)).sum()


def masked_accuracy(logits: Tensor, labels: Tensor, scale: Tensor | None = None) -> Tensor:
    """Fraction of labelled rows (label != -100) whose arg-max is the label; 0 when none. ``scale``
    (``mean_scale`` of the labelled rows) makes it the global micro-batch's fraction."""
    keep = labels != IGNORE_INDEX
    hits = (logits.detach().argmax(-1) == labels) & keep
    return hits.sum().float() * (mean_scale(keep, False) if scale is None else scale)


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
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch.get("token_type_ids"),
            masked_positions=positions,
            sparse_last_layer=True,
        )
        keep = labels != IGNORE_INDEX
        scale = mean_scale(keep, self.training)
        token_loss = nn.functional.cross_entropy(out.logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
        mlm_loss = masked_sum(token_loss, keep) * scale
        metrics = {
            "mlm_loss": mlm_loss.detach(),
            "mlm_acc": masked_accuracy(out.logits, labels, scale),
            "num_masked": labels.new_tensor(labels.numel()),
        }
        loss = mlm_loss
        pair_key = self.pair_key(batch)
        if pair_key is not None:
            pair_logits = (out.sop_logits if out.sop_logits is not None else out.seq_relationship_logits).float()
            pair_labels = batch[pair_key].view(-1)
            pair_loss = nn.functional.cross_entropy(pair_logits, pair_labels)
            loss = loss + pair_loss
            metrics["pair_loss"] = pair_loss.detach()
            metrics["pair_acc"] = (pair_logits.detach().argmax(-1) == pair_labels).float().mean()
        return loss, metrics
