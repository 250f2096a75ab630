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

Encoding of a file (``sniff_encoding``, on its first 8 KiB): UTF-16 and UTF-32 with a byte-order
mark, and UTF-16 without one (NUL bytes, mostly at even or at odd positions, and the sample decodes
to text as UTF-16 but not as UTF-8), are decoded; a file is binary when at least 5% of the sample are NUL or other C0
control bytes that text does not hold (random or compressed bytes hold about 10%, any 8-bit or
UTF-8 text almost none); anything else is read as UTF-8, so a stray NUL in a text file is a
control character like the others (removed and counted) and a GBK file is text with invalid UTF-8.

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
from collections import Counter

# Sentence-final punctuation (a run of it ends one sentence) and the closers that stay with it.
_SENTENCE_END = re.compile(r"(?:[。！？!?]+|…+|\.{3,})[”’\"'」』）)》〉】〕\]]*")
_CLAUSE_END = re.compile(r"[；;，,：:]+")


def _utf8_any(chars):
    return b"(?:" + b"|".join(re.escape(ch.encode()) for ch in chars) + b")"


# _SENTENCE_END on UTF-8 bytes (UTF-8 is self-synchronising: a match starts and ends between characters).
_SENTENCE_END_UTF8 = re.compile(
    b"(?:" + _utf8_any("。！？!?") + b"+|" + _utf8_any("…") + b"+|\\.{3,})" + _utf8_any("”’\"'」』）)》〉】〕]") + b"*"
)


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


def last_sentence_end(raw):
    """Byte offset just after the last sentence end (punctuation and closers) that ends before the
    end of the UTF-8 bytes ``raw``; 0 when there is none. Where to cut a piece of an over-long line."""
    for window in (1 << 16, len(raw)):
        end = 0
        for m in _SENTENCE_END_UTF8.finditer(raw, max(0, len(raw) - window)):
            if m.end() < len(raw):
                end = m.end()
        if end or window >= len(raw):
            return end
    return 0


# NUL and the C0 controls but tab, LF, VT, FF, CR and ESC: bytes that text almost never holds.
_BINARY_BYTES = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1b")
BINARY_SHARE = 0.05
_BOMS = (  # UTF-32's marks first: UTF-32-LE's begins with UTF-16-LE's
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def _bad_share(sample, encoding):
    """Share of the sample's characters that do not decode, are controls (tab, LF, CR aside),
    unassigned, private-use or surrogates: what text decoded with the wrong codec is full of."""
    unit = 4 if encoding.startswith("utf-32") else 2 if encoding.startswith("utf-16") else 1
    text = sample[: len(sample) // unit * unit].decode(encoding, "replace")
    bad = sum(
        n
        for ch, n in Counter(text).items()
        if ch == "\ufffd" or ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cn", "Co", "Cs")
    )
    return bad / max(len(text), 1)


def sniff_encoding(head):
    """The encoding of a (decompressed) file from its first bytes: ``(encoding, why)``.

    ``encoding`` is a Python codec name ("utf-8"; "utf-16" or "utf-32" after a byte-order mark,
    which the codec consumes; "utf-16-le" or "utf-16-be" without one) or None for a binary file.
    UTF-16 without a mark: at least 0.5% NUL bytes (ASCII has one a character, Chinese text one a
    line and one for each U+xx00 character such as 一), the endianness that decodes with fewer bad
    characters (controls, unassigned: a newline read backwards is the unassigned U+0A00), at most
    1% of them, and at least 5% decoded as UTF-8. ``why``
    says in a few words how it was recognised, for the summary ("" for plain UTF-8).
    """
    for bom, encoding in _BOMS:
        if head.startswith(bom) and _bad_share(head, encoding) <= 0.01:
            return encoding, f"{encoding.upper()} with a byte-order mark"
    nul = head.count(0)
    if nul >= max(2, len(head) // 200):
        share, encoding = min((_bad_share(head, e), e) for e in ("utf-16-le", "utf-16-be"))
        if share <= 0.01 and _bad_share(head, "utf-8") >= 0.05:
            return encoding, f"{encoding.upper()} without a byte-order mark ({nul} NUL bytes in the first {len(head)})"
    binary = len(head) - len(head.translate(None, _BINARY_BYTES))
    if binary and binary >= BINARY_SHARE * len(head):
        return None, f"binary file: {binary} of the first {len(head)} bytes are NUL or control bytes"
    return "utf-8", ""


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
