"""Pretraining objectives: each an ``nn.Module`` that owns its models and returns ``(loss, metrics)``
for the training loop (``lub_fast.train``)."""

from lub_fast.objectives.electra import ElectraObjective
from lub_fast.objectives.mlm import MaskedLMObjective

__all__ = ["ElectraObjective", "MaskedLMObjective"]
