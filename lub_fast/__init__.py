"""lub_fast: pretraining, distillation and fine-tuning of Chinese BERT-family encoders.

Whole-word masking with jieba word boundaries, one encoder for BERT, RoBERTa, ALBERT and ELECTRA
that runs on unpadded tokens, and checkpoints exchanged with HuggingFace Transformers.
"""

import os

__version__ = "0.1.0"

# OpenMP threads that spin at barriers (libgomp's default) stall whenever another process holds a
# core: on a shared 2-core machine a tiny-model pretraining step (32x128) took 3.8 s with 2 spinning
# threads, 0.46 s with passive waiting and 0.67 s on 1 thread. OpenMP reads this once when torch
# loads it, so it is set here, before any lub_fast module imports torch; a value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def from_pretrained(path, **kwargs):
    """Load an HF directory (bert, roberta, albert, electra) or a TF-1 checkpoint into the lub_fast
    model of that family (``lub_fast.models.load.from_pretrained``); ``model.save_pretrained(dir)``
    writes it back as an HF directory."""
    from lub_fast.models.load import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
