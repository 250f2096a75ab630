"""TensorFlow-1 checkpoints (Google BERT, ALBERT, ELECTRA; bert4keras) without TensorFlow.

``load_tf1_checkpoint(path)`` -> ``(hf_config, state_dict, info)`` in HF names;
``save_tf1_checkpoint(directory, hf_config, state_dict, family)`` writes Google's names (``load``,
``save``). The tensor-bundle format lives in ``bundle`` (its index table in ``table``, checksums in
``crc``), the name and config mapping in ``names``.
"""

from lub_fast.tf1.bundle import BundleReader, TF1CheckpointError, write_bundle
from lub_fast.tf1.load import TF1LoadInfo, load_tf1_checkpoint
from lub_fast.tf1.save import save_tf1_checkpoint

__all__ = [
    "BundleReader",
    "TF1CheckpointError",
    "TF1LoadInfo",
    "load_tf1_checkpoint",
    "save_tf1_checkpoint",
    "write_bundle",
]
