"""Corpus cleaning before segmentation and WordPiece: the text BERT's Chinese tokenizer expects.

Follows ``BasicTokenizer._clean_text`` of google-research/bert ``tokenization.py`` (Devlin et al.
2019) as HF ``tokenizers``' ``BertNormalizer(clean_text=True)`` implements it: U+FFFD and the
control, format, private-use and surrogate characters (Unicode Cc, Cf, Co, Cs: NUL, the BOM U+FEFF,
the zero-width characters U+200B-U+200D and U+2060, ...) except tab, LF and CR are removed; every
whitespace character (tab, newline, U+00A0, U+3000, ...) becomes one space, runs of spaces collapse
and the ends are stripped, so a line of only whitespace or format characters becomes empty.

Invalid UTF-8 policy (the reader in ``lub_fast.prepare`` applies it): by default each invalid byte
sequence decodes to U+FFFD, which cleaning then removes, and the line is counted per file; strict
mode stops with ``file:line``.

Long lines are split into sentences at Chinese sentence punctuation (。！？!? and ellipses, with
closing quotes and brackets kept on the sentence they close); a sentence still longer than the limit
is split at clause punctuation (；;，,：:) into pieces packed up to the limit, and a clause longer
than the limit is cut every ``max_chars`` characters. Splitting is linear in the line length, so a
10 MB line costs what ten thousand 1 kB lines cost.

Traditional-to-simplified conversion uses OpenCC's ``t2s`` table through the ``opencc`` module
(``opencc-python-reimplemented``, an optional dependency).
"""

import functools
import re
import sys
import unicodedata

# Sentence-final punctuation (a run of it ends one sentence) and the closers that stay with it.
_SENTENCE_END = re.compile(r"(?:[。！？!?]+|…+|\.{3,})[”’\"'」』）)》〉】〕\]]*")
_CLAUSE_END = re.compile(r"[；;，,：:]+")


@functools.lru_cache(maxsize=1)
def _removed_chars():
    """Regex matching what HF BertNormalizer(clean_text) deletes: Cc, Cf, Co, Cs but tab, LF, CR."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        ch = chr(cp) if cp <= sys.maxunicode else ""
        drop = bool(ch) and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs") and ch not in "\t\n\r"
        if drop and start is None:
            start = cp
        elif not drop and start is not None:
            ranges.append((start, cp - 1))
            start = None
    parts = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return re.compile(f"[{parts}]")


def clean_line(text):
    """Clean one line as BERT's tokenizer does.

    Returns ``(cleaned, removed)``: the cleaned text (single spaces, stripped; empty when nothing is
    left) and the number of control/format characters removed (U+FFFD is removed but not counted
    here: the reader counts invalid UTF-8 itself).
    """
    text, removed = _removed_chars().subn("", text)
    if "\ufffd" in text:
        text = text.replace("\ufffd", "")
    return " ".join(text.split()), removed


def _pieces(text, pattern):
    """Split after every match of ``pattern``; the pieces concatenate back to ``text``."""
    out, start = [], 0
    for m in pattern.finditer(text):
        out.append(text[start : m.end()])
        start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def split_sentences(text, max_chars):
    """Split a cleaned line into sentences of at most ``max_chars`` characters.

    Returns ``(sentences, long_sentences, hard_cuts)``: the stripped non-empty sentences, how many
    sentences were longer than ``max_chars`` (split at clause punctuation), and how many times a
    clause had to be cut at a character position (no punctuation within ``max_chars``).
    """
    sentences, long_sentences, hard_cuts = [], 0, 0
    for sentence in _pieces(text, _SENTENCE_END):
        if len(sentence) <= max_chars:
            sentences.append(sentence)
            continue
        long_sentences += 1
        piece = ""
        for clause in _pieces(sentence, _CLAUSE_END):
            while len(clause) > max_chars:
                if piece:
                    sentences.append(piece)
                    piece = ""
                sentences.append(clause[:max_chars])
                clause = clause[max_chars:]
                hard_cuts += 1
            if len(piece) + len(clause) > max_chars:
                sentences.append(piece)
                piece = ""
            piece += clause
        if piece:
            sentences.append(piece)
    stripped = (s.strip() for s in sentences)
    return [s for s in stripped if s], long_sentences, hard_cuts


def looks_binary(head):
    """True when the first bytes of a (decompressed) file hold a NUL byte: binary, or UTF-16/32."""
    return b"\x00" in head


@functools.lru_cache(maxsize=1)
def _t2s_converter():
    try:
        from opencc import OpenCC
    except ImportError as e:
        raise RuntimeError("--t2s needs OpenCC's Python module: pip install opencc-python-reimplemented") from e
    return OpenCC("t2s")


def to_simplified(text):
    """Traditional to simplified Chinese with OpenCC's ``t2s`` conversion."""
    return _t2s_converter().convert(text)
