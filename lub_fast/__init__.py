"""lub_fast: pretraining, distillation and fine-tuning of Chinese BERT-family encoders.

Whole-word masking with jieba word boundaries, one encoder for BERT, RoBERTa, ALBERT and ELECTRA
that runs on unpadded tokens, and checkpoints exchanged with HuggingFace Transformers.
"""

__version__ = "0.1.0"


def from_pretrained(path, **kwargs):
    """Load an HF directory (bert, roberta, albert, electra) or a TF-1 checkpoint into the lub_fast
    model of that family (``lub_fast.models.load.from_pretrained``); ``model.save_pretrained(dir)``
    writes it back as an HF directory."""
    from lub_fast.models.load import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
