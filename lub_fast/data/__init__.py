"""Corpus pipeline for Chinese pretraining: cleaning, word segmentation, WordPiece, shards, examples.

``lub_fast.prepare`` (``python -m lub_fast.prepare``) turns raw text into a shard directory
(``shards``); ``PretrainDataset`` (``dataset``) builds BERT-style examples from it with word-start
flags that the whole-word masking collator consumes. Nothing here imports torch.
"""

from lub_fast.data.dataset import PretrainDataset
from lub_fast.data.shards import ShardError, open_shards

__all__ = ["PretrainDataset", "ShardError", "open_shards"]
