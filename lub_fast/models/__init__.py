"""lub_fast models: one encoder for BERT, RoBERTa, ALBERT and ELECTRA, task heads, HF interop.

``EncoderConfig`` (``config.py``) describes a model; ``Encoder`` (``encoder.py``) runs it on unpadded
tokens; the task models (``heads.py``) add heads; ``hf.py`` reads and writes HF directories.
"""

from lub_fast.models.config import EncoderConfig
from lub_fast.models.encoder import Encoder, EncoderOutput, Unpadded
from lub_fast.models.heads import (
    ElectraDiscriminator,
    ElectraPair,
    EncoderModel,
    MaskedLM,
    ModelOutput,
    PreTraining,
    QuestionAnswering,
    SequenceClassification,
    TokenClassification,
)
from lub_fast.models.hf import (
    from_pretrained,
    from_pretrained_electra_pair,
    hf_to_lub,
    lub_to_hf,
    save_pretrained,
)

__all__ = [
    "ElectraDiscriminator",
    "ElectraPair",
    "Encoder",
    "EncoderConfig",
    "EncoderModel",
    "EncoderOutput",
    "MaskedLM",
    "ModelOutput",
    "PreTraining",
    "QuestionAnswering",
    "SequenceClassification",
    "TokenClassification",
    "Unpadded",
    "from_pretrained",
    "from_pretrained_electra_pair",
    "hf_to_lub",
    "lub_to_hf",
    "save_pretrained",
]
