"""lub_fast models: one encoder for BERT, RoBERTa, ALBERT and ELECTRA, task heads, HF interop.

``EncoderConfig`` (``config.py``) describes a model; ``Encoder`` (``encoder.py``) runs it on unpadded
tokens; the task models (``heads.py``) add heads; ``hf.py`` maps names to and from HF's;
``load.py`` reads HF directories and TF-1 checkpoints, ``save.py`` writes HF directories.
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
from lub_fast.models.hf import hf_to_lub, lub_to_hf
from lub_fast.models.load import (
    from_pretrained,
    from_pretrained_electra_pair,
    read_labels,
    read_tokenizer_files,
)
from lub_fast.models.save import save_pretrained

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
    "read_labels",
    "read_tokenizer_files",
    "save_pretrained",
]
