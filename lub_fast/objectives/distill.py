"""Pretraining distillation: DistilBERT's triple loss (Sanh et al. 2019, arXiv 1910.01108).

    loss = alpha_ce * KL(teacher_T || student_T) * T^2 + alpha_mlm * MLM + alpha_cos * COS

as ``Distiller.step`` of huggingface/transformers ``examples/research_projects/distillation``
computes it, with the defaults of its published training command (``--alpha_ce 5.0 --alpha_mlm 2.0
--alpha_cos 1.0``, ``--temperature 2.0``):

- KL: at the masked positions (DistilBERT's ``--restrict_ce_to_mask``; only there does the teacher
  see what the student must predict, and only there does step 1 cache the teacher). Per position
  ``sum_v p_t(v) (log p_t(v) - log p_s(v))`` with ``p = softmax(logits / T)``, averaged over the
  masked positions of the micro-batch (``KLDivLoss(reduction="batchmean")``), times ``T^2`` so that
  its gradients keep their scale when ``T`` changes (Hinton et al. 2015).
- MLM: cross entropy of the student's logits (``T = 1``) against the original tokens.
- COS: ``mean(1 - cos(h_s, h_t))`` between the student's and the teacher's last hidden states
  (``CosineEmbeddingLoss`` with target 1), over all real tokens (DistilBERT) or only the masked
  positions (``cos_positions="masked"``, 20x less to cache). Needs equal hidden sizes.

The teacher comes from a cache (step 1 of the two-step recipe, ``lub_fast.distill_cache``) or runs
in the loop ("online", no gradient, eval mode). A cache keeps the ``k`` largest teacher logits
``z_1..z_k`` of each masked position (indices ``i_1..i_k``) and the log-normaliser
``L = logsumexp_v(z_v / T)`` over the whole vocabulary. From them the teacher's true
log-probabilities at the top ``k`` are ``log p_j = z_j / T - L``; the mass outside them,
``r_t = 1 - sum_j p_j``, is one more bucket, matched by the student's mass outside the same
indices, ``r_s = sum_{v not in top k} p_s(v)``. ``kl_topk`` is the KL divergence between these two
``k + 1``-outcome distributions:

    KL_k = sum_j p_j (log p_j - log p_s(i_j)) + r_t (log r_t - log r_s)

It is never larger than the full KL (the data-processing inequality: merging outcomes can only lose
information), its gradient pulls the student's top-``k`` probabilities to the teacher's exact
values and its remaining mass to the teacher's remaining mass, and with ``k`` = vocabulary size
(``r_t = r_s = 0``, the bucket term dropped) it is the full KL: a float32 cache with ``k = V``
reproduces online distillation to float rounding.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lub_fast.config_cli import check_fields, field_error, option


@dataclass(frozen=True)
class LossSection:
    alpha_ce: float = option(
        5.0, "weight of KL(teacher_T || student_T) * T^2 at masked positions (DistilBERT 5.0)", ge=0
    )
    alpha_mlm: float = option(2.0, "weight of the student's MLM cross entropy (DistilBERT 2.0)", ge=0)
    alpha_cos: float = option(1.0, "weight of 1 - cos(student, teacher last hidden states) (DistilBERT 1.0)", ge=0)
    temperature: float = option(2.0, "softmax temperature T of the KL term (DistilBERT 2.0)", gt=0)
    cos_positions: Literal["all", "masked"] = option(
        "all", "cosine loss over all real tokens (DistilBERT) or the masked positions (a 20x smaller cache)"
    )

    def __post_init__(self):
        check_fields(self)
        if self.alpha_ce == self.alpha_mlm == self.alpha_cos == 0:
            raise field_error(self, "alpha_ce", "> 0 when alpha_mlm and alpha_cos are 0: the loss would be 0")

from lub_fast.models.heads import MaskedLM
from lub_fast.objectives.mlm import masked_accuracy

COS_POSITIONS = ("all", "masked")
# Batch keys that carry cached teacher outputs (``lub_fast.distill_cache.CacheReader.entries``).
TEACHER_KEYS = ("teacher_values", "teacher_indices", "teacher_lognorm", "teacher_hidden")


def kl_full(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2`` x mean over rows of ``KL(softmax(t / T) || softmax(s / T))``; both ``[M, V]``.
    A 0-d float32 tensor (0 and still connected to the student's graph when ``M == 0``)."""
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / student_logits.shape[0]
    return kl * temperature**2


def kl_topk(student_logits: Tensor, values: Tensor, indices: Tensor, lognorm: Tensor, temperature: float) -> Tensor:
    """``T^2`` x mean over rows of ``KL_k`` (the module docstring) from a cache's top-``k`` entries.

    ``student_logits`` ``[M, V]``; ``values`` ``[M, k]`` the teacher's raw logits (any float dtype),
    ``indices`` int64 ``[M, k]`` their vocabulary ids (distinct per row), ``lognorm`` ``[M]``
    ``logsumexp(teacher_logits / T)`` over the whole vocabulary, at the same ``temperature``.
    """
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    vocab, k = student_logits.shape[1], values.shape[1]
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = values.float() / temperature - lognorm.float()[:, None]
    pt = log_pt.exp()
    kl = (pt * (log_pt - log_s.gather(1, indices))).sum(dim=1)
    if k < vocab:
        # fp16 logits round the top-k mass by ~1e-3 relative: clamp the teacher's rest at 0.
        rest_t = (1.0 - pt.sum(dim=1)).clamp(min=0.0)
        log_rest_s = torch.logsumexp(log_s.scatter(1, indices, float("-inf")), dim=1)
        bucket = torch.xlogy(rest_t, rest_t) - rest_t * log_rest_s
        kl = kl + torch.where(rest_t > 0, bucket, torch.zeros_like(bucket))
    return kl.mean() * temperature**2


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """``mean(1 - cos(h_s, h_t))`` over rows of ``[N, H]`` (``CosineEmbeddingLoss``, target 1)."""
    if student_hidden.shape[0] == 0:
        return student_hidden.float().sum() * 0.0
    return (1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()


class DistillObjective(nn.Module):
    """The student ``MaskedLM`` (``self.model``, what checkpoints hold and ``export_hf`` writes)
    trained on DistilBERT's loss against a cached or an online teacher.

    ``teacher``: a ``MaskedLM`` run in eval mode under ``no_grad`` when the batch carries no cached
    outputs (``TEACHER_KEYS``); it is not a submodule, so it is neither optimized nor checkpointed
    nor put in train mode by the loop, but ``.to()`` moves it with the student. With neither a
    cache nor a teacher (or ``alpha_ce == alpha_cos == 0``) only the MLM term is computed.

    Batch: the ``MaskingCollator`` keys, plus for a cache ``teacher_values`` ``[M, k]``,
    ``teacher_indices`` int64 ``[M, k]``, ``teacher_lognorm`` ``[M]`` and, when ``alpha_cos > 0``,
    ``teacher_hidden`` ``[N, H]`` (N: real tokens for ``cos_positions="all"``, else ``M``).
    Metrics: ``mlm_loss``, ``mlm_acc``, ``num_masked``; with a teacher also ``kl_loss``,
    ``cos_loss`` and ``teacher_acc`` (the teacher's top-1 accuracy on the masked tokens).
    """

    def __init__(
        self,
        student: MaskedLM,
        teacher: MaskedLM | None = None,
        *,
        alpha_ce: float = 5.0,
        alpha_mlm: float = 2.0,
        alpha_cos: float = 1.0,
        temperature: float = 2.0,
        cos_positions: str = "all",
    ):
        super().__init__()
        if not isinstance(student, MaskedLM):
            raise TypeError(f"DistillObjective needs a MaskedLM student, got {type(student).__name__}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if min(alpha_ce, alpha_mlm, alpha_cos) < 0 or alpha_ce + alpha_mlm + alpha_cos <= 0:
            raise ValueError(f"loss weights must be >= 0 and not all 0, got {alpha_ce}, {alpha_mlm}, {alpha_cos}")
        if cos_positions not in COS_POSITIONS:
            raise ValueError(f"cos_positions must be one of {COS_POSITIONS}, got {cos_positions!r}")
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if alpha_cos > 0 and teacher.config.hidden_size != student.config.hidden_size:
                raise ValueError(
                    f"the cosine loss compares hidden states: the teacher's hidden size "
                    f"{teacher.config.hidden_size} differs from the student's {student.config.hidden_size} "
                    "(set alpha_cos to 0)"
                )
        self.model = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the class docstring
        self.alpha_ce, self.alpha_mlm, self.alpha_cos = alpha_ce, alpha_mlm, alpha_cos
        self.temperature = temperature
        self.cos_positions = cos_positions

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    @property
    def uses_teacher(self) -> bool:
        return self.alpha_ce > 0 or self.alpha_cos > 0

    def forward(self, batch) -> tuple[Tensor, dict]:
        positions, labels = batch["masked_positions"], batch["masked_labels"]
        inputs = dict(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch.get("token_type_ids"),
        )
        all_tokens = self.alpha_cos > 0 and self.cos_positions == "all"
        out = self.model(**inputs, masked_positions=positions, sparse_last_layer=not all_tokens)
        logits = out.logits
        if labels.numel() > 0:
            mlm_loss = F.cross_entropy(logits.float(), labels)
        else:
            mlm_loss = logits.float().sum() * 0.0
        metrics = {
            "mlm_loss": mlm_loss.detach(),
            "mlm_acc": masked_accuracy(logits, labels),
            "num_masked": torch.tensor(labels.numel()),
        }
        loss = self.alpha_mlm * mlm_loss
        cached = "teacher_values" in batch
        if not self.uses_teacher or (not cached and self.teacher is None):
            return loss, metrics

        if cached:
            kl = kl_topk(logits, batch["teacher_values"], batch["teacher_indices"], batch["teacher_lognorm"], self.temperature)
            top1 = batch["teacher_indices"][:, 0]
            teacher_hidden = batch.get("teacher_hidden")
        else:
            with torch.no_grad():
                t_out = self.teacher(**inputs, masked_positions=positions, sparse_last_layer=not all_tokens)
            kl = kl_full(logits, t_out.logits, self.temperature)
            top1 = t_out.logits.argmax(-1)
            teacher_hidden = t_out.encoder.hidden if all_tokens else t_out.encoder.at(positions)
        loss = loss + self.alpha_ce * kl
        metrics["kl_loss"] = kl.detach()
        metrics["teacher_acc"] = (top1 == labels).sum().float() / max(1, labels.numel())
        if self.alpha_cos > 0:
            if teacher_hidden is None:
                raise ValueError("alpha_cos > 0 but the batch's cached teacher outputs have no hidden states")
            student_hidden = out.encoder.hidden if all_tokens else out.encoder.at(positions)
            if teacher_hidden.shape != student_hidden.shape:
                raise ValueError(
                    f"teacher hidden states {tuple(teacher_hidden.shape)} do not match the student's "
                    f"{tuple(student_hidden.shape)} ({self.cos_positions} positions)"
                )
            cos = cosine_loss(student_hidden, teacher_hidden)
            loss = loss + self.alpha_cos * cos
            metrics["cos_loss"] = cos.detach()
        return loss, metrics
