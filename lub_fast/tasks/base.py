"""The fine-tuning task protocol: what ``lub_fast.tasks.run`` asks of each kind of task.

A ``Task`` reads a data file into ``TaskData``, turns it into model rows (``Split``), names the
head its model needs (``Head``), turns the model's outputs into per-row results and those into
predictions per example, scores them against the gold labels and writes them in the task's
submission format. One implementation per kind, each next to its reader:
``ClassificationTask`` and ``RegressionTask`` (``lub_fast.tasks.classification``), ``SpanTask``
(``lub_fast.tasks.cmrc2018``), ``NerTask`` (``lub_fast.tasks.ner``).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lub_fast.tasks.io import TaskData


@dataclass(frozen=True)
class Head:
    """The task model a ``Task`` trains: ``task``, the ``lub_fast.models.from_pretrained`` head
    (``sequence_classification``, ``token_classification``, ``question_answering``);
    ``num_labels`` (None: the head has a fixed output); ``problem_type``, the loss HF records in
    ``config.json``; ``labels``, the ``id2label`` names of the export (None: HF's defaults)."""

    task: str
    num_labels: int | None = None
    problem_type: str | None = None
    labels: tuple | None = None


@dataclass
class Split:
    """One data file ready for the model: ``data`` (``TaskData``), ``rows`` (one dict of lists and
    numbers per model input, labels included when the file has them) and, for tasks whose rows
    are windows of a longer text, ``windows``: per row what ``Task.decode`` needs to map it back
    (a ``QAFeature`` for CMRC 2018, ``(example index, owned positions)`` for NER)."""

    data: TaskData
    rows: list
    windows: list | None = None


class Task(Protocol):
    """One kind of fine-tuning task (see the module docstring). ``prediction_suffix``: the
    predictions file's suffix (``.jsonl``, or ``.json`` for CMRC 2018)."""

    prediction_suffix: str

    def read(self, path: str, labels: tuple | None, training: bool = False) -> TaskData:
        """The examples of ``path``; ``labels``: the training set's label set (None for the training
        file, whose labels are the set); ``training``: keep only what the model can train on."""

    def features(self, data: TaskData, tokenizer) -> Split:
        """Model rows of ``data`` (an HF ``tokenizers.Tokenizer`` with BERT's specials)."""

    def head(self, labels: tuple | None) -> Head:
        """The task model for the training set's ``labels``."""

    def row_outputs(self, output, lengths: list[int]) -> list:
        """Per-row results (numpy) of one batch's model ``output``; ``lengths``: each row's tokens."""

    def decode(self, split: Split, outputs: list) -> list | dict:
        """Predictions per example from the ``row_outputs`` of every row of ``split``."""

    def score(self, split: Split, predictions) -> dict:
        """The task's metrics of ``predictions`` against the gold labels of ``split``."""

    def write_predictions(self, path: Path, split: Split, predictions, submission: bool = False) -> None:
        """``predictions`` to ``path`` in the task's format; ``submission``: as the benchmark's
        upload (CLUE's label strings, CLUENER's lines without text)."""


def backend_tokenizer(tokenizer):
    # a transformers PreTrainedTokenizerFast wraps a tokenizers.Tokenizer
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def special_id(tokenizer, token):
    """Vocabulary id of a special token such as '[CLS]'; ValueError when the vocab lacks it."""
    i = backend_tokenizer(tokenizer).token_to_id(token)
    if i is None:
        raise ValueError(f"tokenizer has no {token!r} token")
    return i


def load_tokenizer(model_dir):
    """The model directory's tokenizer as an HF ``tokenizers.Tokenizer`` (no specials added).

    ``tokenizer.json`` when present (its truncation and padding turned off), else ``vocab.txt``
    through BERT's Chinese pipeline (``lub_fast.data.tokenizer.hf_tokenizer``). Both are checked by
    ``lub_fast.data.tokenizer.model_vocab``: a ``tokenizer.json`` that is not WordPiece, or that
    disagrees with ``vocab.txt``, raises ``VocabularyError``.
    """
    from tokenizers import Tokenizer

    from lub_fast.data.tokenizer import hf_tokenizer, model_vocab

    path = Path(model_dir)
    model_vocab(path)
    if (path / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return tokenizer
    if (path / "vocab.txt").exists():
        return hf_tokenizer(path / "vocab.txt")
    raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")
