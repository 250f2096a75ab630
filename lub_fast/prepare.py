"""``python -m lub_fast.prepare``: raw Chinese text -> shards for pretraining with whole-word masking.

Pipeline (see ``lub_fast.data``): read (.txt, .jsonl, .gz of either, directories, globs) -> decode
UTF-8 (invalid bytes replaced and counted per file, or ``--strict``: stop at file:line) -> clean as
BERT's tokenizer -> optional traditional-to-simplified (OpenCC) -> split into sentences -> segment
words (jieba / rjieba, HMM off / none) -> WordPiece (HF tokenizers, bert-base-chinese's
vocab.txt format, or ``--build-vocab N``) -> word-start flags -> shards (``lub_fast.data.shards``).

Streaming and parallel. The input is cut into chunks of about ``--chunk-size`` KB at document
boundaries (a function of the input alone); ``--workers`` processes handle chunks and the results
are written in input order, at most ``2 x workers`` chunks in flight, straight to the shard files.
Memory is therefore bounded by the chunk size, not the corpus, and the output is byte-identical for
any worker count. A shard closes after the chunk that brings it to ``--shard-size`` MB of token
ids. Its header, written last and atomically, marks it complete: a re-run with the same settings
skips complete shards (reading, not processing, their chunks) and goes on from there.

Input format. ``.txt``: one sentence or paragraph a line, a blank line between documents; a
document longer than the chunk size is split into documents of about that size, and a line longer
than it is read in pieces cut after sentence ends (memory stays bounded inside a line) and counted
as one line (kept when a sentence of its pieces in the chunk of its first piece is). ``.jsonl``: one
JSON object a line, the document in its ``"text"`` field; a line over 16 MiB is dropped and named.
Every kept line is split into sentences at Chinese sentence punctuation (``lub_fast.data.clean``).
Files are UTF-8, or UTF-16/UTF-32 (decoded) as ``clean.sniff_encoding`` recognises them; binary
files are skipped. In input directories FIFOs, sockets, devices and broken symbolic links are
skipped (named on the command line they are an error).

Accounting. Every line read is kept or dropped for one reason (``LINE_DROPS``), so that
``lines_read == lines_kept + sum(lines_dropped)``; ``summary.json`` in the output holds these
counts, the sentences and documents dropped, what was fixed, and the files (or lines) skipped or
repaired by name (the first few per reason, then a count). The printed summary is made from it.

``--verify DIR``: check a shard directory (sizes, index, ids, sha256 of every file) and exit 0, or
2 with one line naming the shard file.
"""

import argparse
import codecs
import dataclasses
import errno
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import pickle
import stat
import sys
import tempfile
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from lub_fast.config_cli import ConfigError, check_fields, check_value, field_error, option
from lub_fast.config_cli import output_dir as output_dir_check
from lub_fast.data.clean import clean_line, last_sentence_end, sniff_encoding, split_sentences, to_simplified
from lub_fast.data.segment import SEGMENTERS, Segmenter, segmenter_settings
from lub_fast.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    SHARD_FILES,
    VOCAB_FILE,
    ShardWriter,
    expected_sizes,
    open_shards,
    shard_name,
    token_dtype,
    write_json_atomic,
)
from lub_fast.data.tokenizer import WordPieceTokenizer, check_vocab_file, file_sha256, tokenizer_settings
from lub_fast.data.tokenizer import build_vocab as build_vocab_fn
from lub_fast.errors import EXIT_CODES_HELP, UsageError, run_command
from lub_fast.lock import output_lock

PREPARE_FILE = "prepare.json"
SUMMARY_FILE = "summary.json"
INPUT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
LINE_LIMIT = 16 << 20  # bytes of a JSON line read whole; a longer one is dropped and named
_SAMPLE_BYTES = 8192  # the first bytes of a file that decide its encoding
_NAMED_FIRST = 5  # entries named per reason in the summary, then a count

# Counter keys, in the order the summary prints them, with their labels. Every line read is kept
# or dropped for one of LINE_DROPS: lines_read == lines_kept + sum(LINE_DROPS).
LINE_DROPS = {
    "blank": "blank",
    "empty_after_cleaning": "empty after cleaning",
    "short_lines": "every sentence shorter than --min-chars",
    "no_token_lines": "no sentence with tokens",
    "malformed_json": "malformed JSON",
    "no_text_field": "JSON without a string 'text'",
    "long_json_lines": f"JSON over {LINE_LIMIT >> 20} MiB",
}
SENTENCE_DROPS = {"too_short": "shorter than --min-chars", "no_tokens": "without tokens"}
# Files (or lines) skipped or repaired, named in the summary: the first few, then a count.
NAMED = {
    "special_files": "special files skipped (FIFO, socket, device)",
    "broken_links": "dangling or looping symbolic links skipped",
    "binary_files": "binary files skipped",
    "corrupt_files": "corrupt compressed files (rest of the file skipped)",
    "long_json_lines": f"JSON lines over {LINE_LIMIT >> 20} MiB dropped",
    "decoded_files": "UTF-16/UTF-32 files decoded",
}
FIXED = {
    "invalid_utf8": "lines with invalid UTF-8 replaced",
    "control_chars": "lines with control/zero-width characters removed",
    "long_lines": "sentences split at clause punctuation",
    "hard_cuts": "hard cuts of over-long clauses",
    "documents_split": "documents split at the chunk size",
    "t2s": "lines converted to simplified",
}


class PrepareError(UsageError):
    """Bad input or output directory: the one-line message names the file (and line) and the rule."""


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What ``prepare`` does with the text; all fields but ``strict`` determine the output."""

    segmenter: str = "jieba"
    user_dict: str | None = None
    t2s: bool = False
    strict: bool = False
    min_chars: int = option(2, flag="--min-chars", ge=1)
    max_sentence_chars: int = option(256, flag="--max-sentence-chars", ge=1)
    shard_size_mb: float = option(256.0, flag="--shard-size", gt=0)
    chunk_kb: int = option(1024, flag="--chunk-size", ge=1)

    def __post_init__(self):
        if self.segmenter not in SEGMENTERS:
            raise PrepareError(f"--segmenter must be one of {', '.join(SEGMENTERS)}, got {self.segmenter!r}")
        try:
            check_fields(self)
            if self.max_sentence_chars < self.min_chars:
                raise field_error(self, "max_sentence_chars", f">= --min-chars = {self.min_chars}")
        except ConfigError as error:
            raise PrepareError(str(error)) from None


@dataclasses.dataclass(frozen=True)
class PrepareSummary:
    """What ``prepare_corpus`` did: output, totals, and every count of kept/dropped/fixed input.

    ``report`` is what ``summary.json`` in the output holds (a function of the inputs and settings);
    ``format()`` prints it.
    """

    output_dir: str
    files: int
    input_bytes: int
    shards: int
    shards_skipped: int
    documents: int
    sentences: int
    tokens: int
    counts: dict
    invalid_utf8_by_file: dict
    seconds: float
    report: dict

    def format(self):
        r = self.report
        lines = [
            f"prepared {r['files']} files ({r['input_bytes'] / 1e6:.1f} MB) into {self.output_dir}: "
            f"{r['shards']} shards ({self.shards_skipped} already complete, skipped) in {self.seconds:.1f} s",
            f"kept: {r['documents']:,} documents, {r['sentences']:,} sentences, {r['tokens']:,} tokens "
            f"from {r['lines_kept']:,} of {r['lines_read']:,} lines",
            "lines dropped: " + _listing(r["lines_dropped"], LINE_DROPS),
            "sentences dropped: " + _listing(r["sentences_dropped"], SENTENCE_DROPS)
            + f"; documents with nothing left {r['empty_documents']:,}",
            "fixed: " + _listing(r["fixed"], FIXED),
        ]
        for key, label in NAMED.items():
            named = r["named"][key]
            if named["count"]:
                lines.append(f"{label} {named['count']:,}: " + _first_few(named))
        invalid = r["named"]["invalid_utf8_files"]
        lines.extend(f"  invalid UTF-8 replaced in {entry}" for entry in invalid["first"])
        if invalid["count"] > len(invalid["first"]):
            lines.append(f"  ... and in {invalid['count'] - len(invalid['first']):,} more files")
        tokens = max(r["tokens"], 1)
        lines.append(
            f"words: {r['word_mismatches']:,} segmentation/token mismatches "
            f"({100 * r['word_mismatches'] / tokens:.2f}% of tokens, tokens win), "
            f"[UNK] {r['unk_tokens']:,} ({100 * r['unk_tokens'] / tokens:.2f}%)"
        )
        if not r["documents"]:
            lines.append("warning: no documents were written")
        return "\n".join(lines)


def _listing(counts, labels):
    return ", ".join(f"{label} {counts[k]:,}" for k, label in labels.items() if counts.get(k)) or "nothing"


def _first_few(named):
    more = named["count"] - len(named["first"])
    return "; ".join(named["first"]) + (f"; ... and {more:,} more" if more > 0 else "")


def _named(count, entries):
    return {"count": count, "first": list(entries[:_NAMED_FIRST])}


def _report(files, input_bytes, headers, counts, named, invalid_utf8_by_file):
    """What summary.json holds: totals, every line kept or dropped by reason, named files."""
    c = Counter(counts)
    invalid = [f"{n:,} lines of {path}" for path, n in invalid_utf8_by_file.items()]
    return {
        "files": files,
        "input_bytes": input_bytes,
        "shards": len(headers),
        "documents": sum(h["num_documents"] for h in headers),
        "sentences": sum(h["num_sentences"] for h in headers),
        "tokens": sum(h["num_tokens"] for h in headers),
        "lines_read": c["lines_read"],
        "lines_kept": c["lines_kept"],
        "lines_dropped": {k: c[k] for k in LINE_DROPS},
        "sentences_dropped": {k: c[k] for k in SENTENCE_DROPS},
        "empty_documents": c["empty_documents"],
        "fixed": {k: c[k] for k in FIXED},
        "named": dict(
            {k: _named(c[k], named.get(k, [])) for k in NAMED},
            invalid_utf8_files=_named(len(invalid), invalid),
        ),
        "word_mismatches": c["word_mismatches"],
        "unk_tokens": c["unk_tokens"],
    }


# ----------------------------------------------------------------------------- input files


def _input_kind(path):
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith((".jsonl", ".json")) else "txt"


def _not_regular(path):
    """Why ``path`` is no regular file to read ("a FIFO", "a dangling symbolic link", ...), else None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a dangling symbolic link (to {os.readlink(path)})" if os.path.islink(path) else "gone"
    except OSError as e:
        return "a symbolic link loop" if e.errno == errno.ELOOP else f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    return "a socket" if stat.S_ISSOCK(mode) else "a device or other special file"


def _listed(paths, skipped):
    """The regular files among ``paths`` found in a directory or by a glob; the others go to
    ``skipped`` as (reason, "path (why)"), or raise ``PrepareError`` when ``skipped`` is None."""
    regular = []
    for path in paths:
        why = _not_regular(path)
        if why is None:
            regular.append(path)
        elif skipped is None:
            raise PrepareError(f"{path}: {why}, not a file to read: remove it from the input directory")
        else:
            reason = "special_files" if why.startswith(("a FIFO", "a socket", "a device")) else "broken_links"
            skipped.append((reason, f"{path} ({why})"))
    return regular


def find_inputs(inputs, skipped=None):
    """Files named by ``inputs`` (files, directories searched recursively for .txt/.jsonl[.gz], globs).

    A FIFO, socket or device, a dangling symbolic link or a symbolic-link loop found in a directory
    or by a glob is skipped and appended to ``skipped`` as ``(reason, "path (why)")`` (reason
    "special_files" or "broken_links"); without ``skipped`` it is an error, as it always is when
    named on its own.
    """
    files = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = [
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if name.endswith(INPUT_SUFFIXES)
            ]
            files.extend(_listed(sorted(found), skipped))
        elif os.path.isfile(item):
            files.append(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise PrepareError(f"{item}: no file matches")
            for match in matches:
                files.extend(find_inputs([match], skipped) if os.path.isdir(match) else _listed([match], skipped))
        elif os.path.lexists(item):
            raise PrepareError(f"{item}: {_not_regular(item)}, not a file to read: give a regular file")
        else:
            raise PrepareError(f"{item}: no such file or directory")
    seen, unique = set(), []
    for path in files:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(key)
    return unique


def _open(path):
    """(decompressed binary stream, raw file for progress); gzip is recognised by its magic bytes."""
    raw = open(path, "rb")
    magic = raw.read(2)
    raw.seek(0)
    return (gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw), raw


def _head(path):
    """The first bytes of a file, decompressed."""
    stream, raw = _open(path)
    with raw, stream:
        return stream.read(_SAMPLE_BYTES)


# An undecodable UTF-16/32 code unit becomes a lone surrogate, which UTF-8 ("surrogatepass") writes
# as bytes that are not valid UTF-8: the reader counts the line as invalid, or stops under --strict.
codecs.register_error("lub_fast.lone_surrogate", lambda error: ("\udcff", error.end))


class _Recoded:
    """A UTF-16/32 binary stream read as UTF-8 bytes, with ``readline(size)`` as a binary file's."""

    def __init__(self, stream, encoding):
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder(encoding)("lub_fast.lone_surrogate")
        self.buffer, self.pos, self.eof = b"", 0, False

    def readline(self, size):
        while True:
            end = self.buffer.find(b"\n", self.pos, self.pos + size)
            if end >= 0 or self.eof or len(self.buffer) - self.pos >= size:
                break
            data = self.stream.read(1 << 16)
            self.eof = not data
            text = self.decoder.decode(data, final=self.eof)
            self.buffer = self.buffer[self.pos :] + text.encode("utf-8", "surrogatepass")
            self.pos = 0
        stop = end + 1 if end >= 0 else min(self.pos + size, len(self.buffer))
        line, self.pos = self.buffer[self.pos : stop], stop
        return line

    def close(self):
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_text(path, encoding):
    """(stream of UTF-8 bytes, raw file for progress): UTF-16/32 is re-encoded on the fly."""
    stream, raw = _open(path)
    return (stream if encoding == "utf-8" else _Recoded(stream, encoding)), raw


def _split_utf8(raw):
    """Split bytes before a trailing incomplete UTF-8 character: (complete part, incomplete tail)."""
    i = len(raw) - 1
    while i > 0 and len(raw) - i < 4 and (raw[i] & 0xC0) == 0x80:
        i -= 1
    lead = raw[i]
    need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return (raw[:i], raw[i:]) if i + need > len(raw) else (raw, b"")


def _raw_lines(stream, piece_bytes, whole):
    """(line number, bytes, continued) of each line of a binary stream.

    A line longer than ``piece_bytes`` comes in pieces of at most that size under one number,
    ``continued`` True for all but the first: each piece ends after its last sentence end, else
    between two characters, so that memory stays bounded inside a line too. With ``whole`` (JSON
    lines, which cannot be cut) such a line comes once as ``(number, None, False)`` and the rest of
    it is skipped.
    """
    lineno, carry, continued = 1, b"", False
    while True:
        want = piece_bytes - len(carry)
        data = stream.readline(want)
        raw, carry = carry + data, b""
        if not raw:
            return
        if raw.endswith(b"\n") or len(data) < want:  # a whole line, or the stream's last
            yield lineno, raw, continued
            lineno, continued = lineno + 1, False
        elif whole:
            while data and not data.endswith(b"\n"):
                data = stream.readline(piece_bytes)
            yield lineno, None, False
            lineno += 1
        else:
            cut = last_sentence_end(raw) or len(_split_utf8(raw)[0]) or len(raw)
            raw, carry = raw[:cut], raw[cut:]
            yield lineno, raw, continued
            continued = True


@dataclasses.dataclass
class _Chunk:
    index: int
    docs: list  # (file index, first line number, [line, ...], [index of a line continuing the one before, ...])
    progress_bytes: int


class _Reader:
    """Reads the files in order, decodes, groups lines into documents and documents into chunks."""

    def __init__(self, files, config):
        self.files = files
        self.config = config
        self.counts = Counter()
        self.invalid_utf8 = Counter()
        self.named = {}

    def note(self, reason, entry):
        """Count ``reason`` and name ``entry`` ("path (why)") if it is among the first few."""
        self.counts[reason] += 1
        named = self.named.setdefault(reason, [])
        if len(named) < _NAMED_FIRST:
            named.append(entry)

    def chunks(self):
        chunk_bytes = self.config.chunk_kb * 1024
        docs, size, index, done_bytes = [], 0, 0, 0
        for file_index, path in enumerate(self.files):
            for doc in self._documents(file_index, path, chunk_bytes):
                docs.append(doc[:4])
                size += doc[4]
                if size >= chunk_bytes:
                    yield _Chunk(index, docs, self._position(path, done_bytes))
                    docs, size, index = [], 0, index + 1
            done_bytes += os.path.getsize(path)
        if docs:
            yield _Chunk(index, docs, done_bytes)

    def _position(self, path, done_bytes):
        return done_bytes + (self._raw.tell() if self._raw and not self._raw.closed else os.path.getsize(path))

    def _documents(self, file_index, path, max_doc_bytes):
        """(file index, first line, lines, continued, bytes) per document of one file.

        A .txt line longer than ``max_doc_bytes`` comes in pieces (``_raw_lines``); ``continued``
        lists the indices of the lines that are later pieces of the line before them, which the
        workers count once, as one line.
        """
        self._raw = None
        try:
            head = _head(path)
        except (OSError, EOFError, zlib.error) as e:
            self._corrupt(path, 0, e)
            return
        encoding, why = sniff_encoding(head)
        if encoding is None:
            if self.config.strict:
                raise PrepareError(f"{path}: {why} (--strict)")
            self.note("binary_files", f"{path} ({why})")
            return
        if why:
            self.note("decoded_files", f"{path} ({why})")
        what = "UTF-8" if encoding == "utf-8" else encoding.upper()
        jsonl = _input_kind(path) == "jsonl"
        stream, self._raw = _open_text(path, encoding)
        piece_bytes = LINE_LIMIT if jsonl else min(LINE_LIMIT, max_doc_bytes)
        lines, continued, first, size, lineno, sent, invalid = [], [], 0, 0, 0, 0, 0
        with self._raw, stream:
            try:
                for lineno, raw, piece in _raw_lines(stream, piece_bytes, jsonl):
                    self.counts["lines_read"] += not piece
                    if raw is None:
                        if self.config.strict:
                            raise PrepareError(f"{path}:{lineno}: JSON line over {LINE_LIMIT >> 20} MiB (--strict)")
                        self.note("long_json_lines", f"{path}:{lineno}")
                        continue
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        if self.config.strict:
                            raise PrepareError(
                                f"{path}:{lineno}: invalid {what} at byte {e.start} of the line (--strict)"
                            ) from None
                        text = raw.decode("utf-8", "replace")
                        if invalid != lineno:  # once per line, however many pieces
                            self.counts["invalid_utf8"] += 1
                            self.invalid_utf8[path] += 1
                            invalid = lineno
                    if not text.strip():
                        if piece:  # whitespace inside a long line
                            continue
                        self.counts["blank"] += 1
                        if lines:
                            yield file_index, first, lines, continued, size
                            lines, continued, size = [], [], 0
                        continue
                    if piece and sent != lineno:  # the line's first pieces were blank: it is no blank line
                        self.counts["blank"] -= 1
                    if jsonl:
                        yield file_index, lineno, [text], [], len(raw)
                        continue
                    if lines and size >= max_doc_bytes:
                        self.counts["documents_split"] += 1
                        yield file_index, first, lines, continued, size
                        lines, continued, size = [], [], 0
                    if not lines:
                        first = lineno
                    if piece and sent == lineno:
                        continued.append(len(lines))
                    lines.append(text)
                    size += len(raw)
                    sent = lineno
            except (OSError, EOFError, zlib.error) as e:
                self._corrupt(path, lineno, e)
            if lines:
                yield file_index, first, lines, continued, size

    def _corrupt(self, path, lineno, error):
        if self.config.strict:
            raise PrepareError(f"{path}:{lineno + 1}: corrupt or truncated compressed file ({error}) (--strict)")
        self.note("corrupt_files", f"{path}:{lineno + 1} ({error})")


# ----------------------------------------------------------------------------- workers

_STATE = {}


def _init_worker(config, files, tokenizer):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers is the parallelism
    _STATE.update(
        config=config,
        files=files,
        tokenizer=tokenizer,
        segmenter=Segmenter(config.segmenter, config.user_dict) if tokenizer is not None else None,
    )


def _init_worker_from_file(path):
    with open(path, "rb") as f:
        _init_worker(*pickle.load(f))


def _document_lines(path, jsonl, first, lines, counts, strict):
    """The text lines of a document; None (the reason counted) for a JSON line that holds none."""
    if not jsonl:
        return lines
    try:
        obj = json.loads(lines[0])
    except json.JSONDecodeError as e:
        if strict:
            raise PrepareError(f"{path}:{first}: malformed JSON ({e.msg} at column {e.colno}) (--strict)") from None
        counts["malformed_json"] += 1
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        if strict:
            raise PrepareError(f"{path}:{first}: no string field 'text' (--strict)")
        counts["no_text_field"] += 1
        return None
    return obj["text"].splitlines()


# Why an input line with no sentence kept is dropped, by how far it got: nothing left after cleaning,
# sentences all too short, sentences that got no token.
_LINE_LEVELS = ("empty_after_cleaning", "short_lines", "no_token_lines")


def _clean_chunk(docs):
    """Clean and split a chunk: ``(sentences, owner, source, levels, not_documents, counts)``.

    ``owner``: the document of each sentence; ``source``: the input line (a .txt line or a JSON
    line) of each sentence, an index into ``levels`` (-1 for a piece of a line that began in an
    earlier chunk, which counts it); ``levels``: per input line, how far it got (``_LINE_LEVELS``)
    should none of its sentences get a token; ``not_documents``: JSON lines without a document.
    """
    config, files = _STATE["config"], _STATE["files"]
    counts = Counter()
    sentences, owner, source, levels = [], [], [], []
    not_documents, line = 0, -1
    for d, (file_index, first, lines, continued) in enumerate(docs):
        path = files[file_index]
        jsonl = _input_kind(path) == "jsonl"
        text_lines = _document_lines(path, jsonl, first, lines, counts, config.strict)
        if text_lines is None:
            not_documents += 1
            continue
        if jsonl:
            levels.append(0)
            line = len(levels) - 1
        continued = set(continued)
        for i, text in enumerate(text_lines):
            if not jsonl and i not in continued:
                levels.append(0)
                line = len(levels) - 1
            if config.t2s:
                converted = to_simplified(text)
                counts["t2s"] += converted != text
                text = converted
            text, removed = clean_line(text)
            counts["control_chars"] += removed > 0
            if not text:
                continue
            pieces, long_sentences, hard_cuts = split_sentences(text, config.max_sentence_chars)
            kept = [p for p in pieces if len(p) >= config.min_chars]
            counts["long_lines"] += long_sentences
            counts["hard_cuts"] += hard_cuts
            counts["too_short"] += len(pieces) - len(kept)
            if line >= 0:
                levels[line] = max(levels[line], 2 if kept else 1)
            sentences.extend(kept)
            owner.extend([d] * len(kept))
            source.extend([line] * len(kept))
    return sentences, owner, source, levels, not_documents, counts


def _vocab_chunk(docs):
    return _clean_chunk(docs)[0]


def _process_chunk(docs):
    """Token ids, word starts, tokens per sentence, sentences per document, counts of one chunk."""
    tokenizer, segmenter = _STATE["tokenizer"], _STATE["segmenter"]
    sentences, owner, source, levels, not_documents, counts = _clean_chunk(docs)
    text = "\n".join(sentences)
    ids, starts, word_start, mismatches = tokenizer.encode_words(text, segmenter.boundaries(text))
    lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
    sentence_starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1])) if len(sentences) else lengths
    tokens_per_sentence = np.bincount(
        np.searchsorted(sentence_starts, starts, side="right") - 1, minlength=len(sentences)
    )
    keep = tokens_per_sentence > 0
    sentences_per_doc = np.bincount(np.asarray(owner, dtype=np.int64)[keep], minlength=len(docs))
    kept_lines = np.zeros(len(levels), dtype=bool)
    kept_source = np.asarray(source, dtype=np.int64)[keep]
    kept_lines[kept_source[kept_source >= 0]] = True
    levels = np.asarray(levels, dtype=np.int64)
    counts["lines_kept"] += int(np.count_nonzero(kept_lines))
    for level, reason in enumerate(_LINE_LEVELS):
        counts[reason] += int(np.count_nonzero(~kept_lines & (levels == level)))
    counts["no_tokens"] += int(np.count_nonzero(~keep))
    counts["empty_documents"] += int(np.count_nonzero(sentences_per_doc == 0)) - not_documents
    counts["word_mismatches"] += mismatches
    counts["unk_tokens"] += int(np.count_nonzero(ids == tokenizer.unk_id))
    dtype = token_dtype(tokenizer.vocab_size)
    return (
        ids.astype(dtype),
        word_start,
        tokens_per_sentence[keep],
        sentences_per_doc[sentences_per_doc > 0],
        counts,
    )


class _CorpusSentences:
    """The cleaned sentences of the corpus, read afresh on every iteration (vocabulary training)."""

    def __init__(self, files, config, workers):
        self.files, self.config, self.workers = files, config, workers

    def __iter__(self):
        chunks = _Reader(self.files, self.config).chunks()
        for _, sentences in _run(chunks, _vocab_chunk, self.workers, (self.config, self.files, None)):
            yield from sentences


def _run(chunks, worker_fn, workers, init_args):
    """(chunk, worker_fn(chunk.docs)) in input order; at most 2 x workers chunks in flight."""
    if workers <= 1:
        _init_worker(*init_args)
        for chunk in chunks:
            yield chunk, worker_fn(chunk.docs)
        return
    # A dead worker (killed, out of memory, or a __main__ that spawn cannot re-import, as a script
    # read from stdin) breaks the pool and is reported, where multiprocessing.Pool would hang. The
    # initializer's arguments (the vocabulary, the file list) travel through a file: spawn writes
    # the pickled process object into a pipe whose read end the parent keeps open until the write
    # ends, so a child that dies before reading more than the pipe's 64 KiB blocks the parent for
    # good (CPython's popen_spawn_posix).
    context = multiprocessing.get_context("spawn")
    with tempfile.NamedTemporaryFile(prefix="lub_fast-prepare-", suffix=".pkl") as init_file:
        pickle.dump(init_args, init_file, protocol=pickle.HIGHEST_PROTOCOL)
        init_file.flush()
        try:
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker_from_file, initargs=(init_file.name,)
            ) as pool:
                pending = deque()
                for chunk in chunks:
                    pending.append((chunk, pool.submit(worker_fn, chunk.docs)))
                    if len(pending) >= 2 * workers:
                        chunk, result = pending.popleft()
                        yield chunk, result.result()
                while pending:
                    chunk, result = pending.popleft()
                    yield chunk, result.result()
        except BrokenProcessPool as error:
            raise PrepareError(
                f"a worker process died ({error}); with --workers > 1 the main module must be importable "
                "(not a script read from stdin), or use --workers 1"
            ) from None


# ----------------------------------------------------------------------------- output directory


def _settings(config, files, build_vocab):
    """Everything that determines the shards except the vocabulary's hash."""
    out_config = dataclasses.asdict(config)
    del out_config["strict"]
    if config.user_dict is not None:
        out_config["user_dict"] = file_sha256(config.user_dict)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": out_config,
        "build_vocab": build_vocab,
        "inputs": [[path, os.path.getsize(path)] for path in files],
        "tokenizer": tokenizer_settings(),
        "segmenter": segmenter_settings(config.segmenter, config.user_dict),
    }


def _sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _differences(old, new):
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def _remove_shards(output_dir, first):
    """Delete shard files numbered ``first`` and up (complete or not), meta.json and summary.json."""
    for name in os.listdir(output_dir):
        if name.startswith("shard-") and name[6:11].isdigit() and int(name[6:11]) >= first or name in (
            META_FILE,
            SUMMARY_FILE,
        ):
            os.remove(os.path.join(output_dir, name))


def _remove_all(output_dir):
    """Delete everything prepare wrote in ``output_dir`` (other files stay)."""
    _remove_shards(output_dir, 0)
    for name in (PREPARE_FILE, VOCAB_FILE):
        if os.path.exists(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))


def _complete_shards(output_dir, settings_sha256):
    """Headers of the complete shards 0, 1, ... written with these settings."""
    headers = []
    while True:
        path = os.path.join(output_dir, f"{shard_name(len(headers))}.json")
        try:
            with open(path, encoding="utf-8") as f:
                header = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return headers
        if header.get("settings_sha256") != settings_sha256:
            return headers
        sizes = expected_sizes(header)
        for kind in SHARD_FILES:
            file_path = os.path.join(output_dir, header["files"][kind]["name"])
            if not os.path.isfile(file_path) or os.path.getsize(file_path) != sizes[kind]:
                return headers
        headers.append(header)


# ----------------------------------------------------------------------------- entry points


def _vocab_data(vocab):
    """The vocab.txt bytes of ``--vocab``: a vocab.txt file as it is, or a model directory's (or a
    tokenizer.json file's) vocabulary as ``lub_fast.data.tokenizer.model_vocab`` reads it."""
    from lub_fast.data.tokenizer import TOKENIZER_JSON, VocabularyError, model_vocab, vocab_bytes, vocab_from_files

    try:
        if os.path.isdir(vocab):
            found = model_vocab(vocab)
            if found is None:
                raise PrepareError(f"{vocab}: a directory without vocab.txt or tokenizer.json")
            tokens, source = found
            vocab = source
            if source.endswith(TOKENIZER_JSON):
                return vocab_bytes(tokens)
        if not os.path.isfile(vocab):
            raise PrepareError(f"{vocab}: no such vocabulary file")
        with open(vocab, "rb") as f:
            data = f.read()
        if os.path.basename(vocab) == TOKENIZER_JSON:
            return vocab_bytes(vocab_from_files({TOKENIZER_JSON: data}, os.path.dirname(vocab)))
        return data
    except VocabularyError as error:
        raise PrepareError(str(error)) from None


def prepare_corpus(
    inputs,
    output_dir,
    *,
    vocab=None,
    build_vocab=None,
    segmenter="jieba",
    user_dict=None,
    workers=1,
    shard_size_mb=256.0,
    chunk_kb=1024,
    t2s=False,
    strict=False,
    min_chars=2,
    max_sentence_chars=256,
    overwrite=False,
    progress=False,
):
    """Prepare ``inputs`` (paths, directories, globs) into the shard directory ``output_dir``.

    Exactly one of ``vocab`` (a bert-base-chinese-format vocab.txt, or a model directory: see
    ``_vocab_data``) and ``build_vocab`` (train a
    WordPiece vocabulary of about that many entries on the cleaned corpus) is needed. A re-run with
    the same arguments skips complete shards; other settings in a used directory raise
    ``PrepareError`` unless ``overwrite``. Returns a ``PrepareSummary``.
    """
    started = time.perf_counter()
    config = PrepareConfig(
        segmenter=segmenter,
        user_dict=os.fspath(user_dict) if user_dict is not None else None,
        t2s=t2s,
        strict=strict,
        min_chars=min_chars,
        max_sentence_chars=max_sentence_chars,
        shard_size_mb=shard_size_mb,
        chunk_kb=chunk_kb,
    )
    if (vocab is None) == (build_vocab is None):
        raise PrepareError("give exactly one of --vocab FILE and --build-vocab N")
    try:
        # the command-line options that are not PrepareConfig fields, before anything is written
        check_value("output", os.fspath(output_dir), check=output_dir_check)
        check_value("vocab", vocab, check=check_vocab_file)
        check_value("build-vocab", build_vocab, gt=10)
        check_value("workers", workers, ge=1)
    except ConfigError as error:
        raise PrepareError(str(error)) from None
    vocab_data = _vocab_data(vocab) if vocab is not None else None
    if user_dict is not None and not os.path.isfile(user_dict):
        raise PrepareError(f"{user_dict}: no such user dictionary")
    if t2s:
        to_simplified("")  # fail now, not in a worker, when OpenCC is missing
    skipped = []
    files = find_inputs(inputs, skipped)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if overwrite:
        _remove_all(output_dir)

    vocab_path = os.path.join(output_dir, VOCAB_FILE)
    base = _settings(config, files, build_vocab)
    previous = None
    if os.path.isfile(os.path.join(output_dir, PREPARE_FILE)):
        with open(os.path.join(output_dir, PREPARE_FILE), encoding="utf-8") as f:
            previous = json.load(f)["settings"]
        old_base = {k: v for k, v in previous.items() if k != "vocab_sha256"}
        if old_base != base:
            raise PrepareError(
                f"{output_dir}: holds shards prepared with other settings "
                f"(differs in: {', '.join(_differences(old_base, base))}); use --overwrite or another --output"
            )
    if vocab is not None:
        vocab_sha256 = hashlib.sha256(vocab_data).hexdigest()
        if previous is not None and previous["vocab_sha256"] != vocab_sha256:
            raise PrepareError(f"{output_dir}: holds shards of another vocabulary; use --overwrite or another --output")
        if not (os.path.isfile(vocab_path) and file_sha256(vocab_path) == vocab_sha256):
            with open(vocab_path + ".tmp", "wb") as f:
                f.write(vocab_data)
            os.replace(vocab_path + ".tmp", vocab_path)
    elif previous is not None and os.path.isfile(vocab_path) and file_sha256(vocab_path) == previous["vocab_sha256"]:
        vocab_sha256 = previous["vocab_sha256"]
    else:
        try:
            build_vocab_fn(_CorpusSentences(files, config, workers), build_vocab, vocab_path)
        except ValueError as e:
            raise PrepareError(f"{output_dir}: {e}") from None
        vocab_sha256 = file_sha256(vocab_path)
    settings = dict(base, vocab_sha256=vocab_sha256)
    settings_sha256 = _sha256_json(settings)
    write_json_atomic(
        os.path.join(output_dir, PREPARE_FILE), {"settings": settings, "settings_sha256": settings_sha256}
    )

    tokenizer = WordPieceTokenizer(vocab_path)
    dtype = token_dtype(tokenizer.vocab_size)
    complete = _complete_shards(output_dir, settings_sha256)
    _remove_shards(output_dir, len(complete))
    skip_chunks = sum(h["num_chunks"] for h in complete)
    shard_tokens = max(1, int(config.shard_size_mb * (1 << 20)) // dtype.itemsize)
    extra = {"vocab_sha256": vocab_sha256, "settings_sha256": settings_sha256, "token_dtype": dtype.str}

    reader = _Reader(files, config)
    for reason, entry in skipped:
        reader.note(reason, entry)
    headers = list(complete)
    tail_counts = Counter()
    total_bytes = sum(os.path.getsize(p) for p in files)
    progress_bar = _ProgressBar(total_bytes, progress)

    def pending_chunks():
        for chunk in reader.chunks():
            if chunk.index < skip_chunks:
                progress_bar.update(chunk.progress_bytes, 0)
                continue
            yield chunk

    writer, first_chunk, end_chunk, shard_counts = None, skip_chunks, skip_chunks, Counter()
    try:
        for chunk, (ids, word_start, tokens_per_sentence, sentences_per_doc, counts) in _run(
            pending_chunks(), _process_chunk, workers, (config, files, tokenizer)
        ):
            if writer is None:
                writer = ShardWriter(output_dir, len(headers), dtype)
            writer.append(ids, word_start, tokens_per_sentence, sentences_per_doc)
            shard_counts += counts
            end_chunk = chunk.index + 1
            progress_bar.update(chunk.progress_bytes, len(sentences_per_doc))
            if writer.num_tokens >= shard_tokens:
                headers.append(_close(writer, extra, first_chunk, end_chunk, shard_counts))
                writer, first_chunk, shard_counts = None, end_chunk, Counter()
        if writer is not None and writer.num_documents:
            headers.append(_close(writer, extra, first_chunk, end_chunk, shard_counts))
            writer = None
        else:
            tail_counts = shard_counts
    finally:
        progress_bar.close()
        if writer is not None:
            writer.abort()

    counts = Counter(reader.counts)
    for header in headers:
        counts.update(header["counts"])
    counts.update(tail_counts)
    report = _report(len(files), total_bytes, headers, counts, reader.named, dict(reader.invalid_utf8))
    summary = PrepareSummary(
        output_dir=output_dir,
        files=len(files),
        input_bytes=total_bytes,
        shards=len(headers),
        shards_skipped=len(complete),
        documents=sum(h["num_documents"] for h in headers),
        sentences=sum(h["num_sentences"] for h in headers),
        tokens=sum(h["num_tokens"] for h in headers),
        counts=dict(sorted(counts.items())),
        invalid_utf8_by_file=dict(reader.invalid_utf8),
        seconds=time.perf_counter() - started,
        report=report,
    )
    meta = dict(
        format=FORMAT,
        version=FORMAT_VERSION,
        vocab_file=VOCAB_FILE,
        vocab_sha256=vocab_sha256,
        vocab_size=tokenizer.vocab_size,
        token_dtype=dtype.str,
        settings=settings,
        settings_sha256=settings_sha256,
        shards=[h["name"] for h in headers],
        num_documents=summary.documents,
        num_sentences=summary.sentences,
        num_tokens=summary.tokens,
        counts=summary.counts,
        invalid_utf8_by_file=summary.invalid_utf8_by_file,
    )
    write_json_atomic(os.path.join(output_dir, SUMMARY_FILE), report)
    write_json_atomic(os.path.join(output_dir, META_FILE), meta)
    return summary


def _close(writer, extra, first_chunk, end_chunk, counts):
    header = dict(
        extra, first_chunk=first_chunk, num_chunks=end_chunk - first_chunk, counts=dict(sorted(counts.items()))
    )
    return writer.close(header)


class _ProgressBar:
    """tqdm over input bytes (MB/s) with documents/s; silent when disabled or not on a terminal."""

    def __init__(self, total, enabled):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None if enabled else True)
        self.started = time.perf_counter()
        self.done = self.documents = 0

    def update(self, position, documents):
        self.documents += documents
        if not self.bar.disable:
            self.bar.update(position - self.done)
            rate = self.documents / max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} docs/s", refresh=False)
        self.done = position

    def close(self):
        self.bar.close()


# ----------------------------------------------------------------------------- CLI


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m lub_fast.prepare",
        description="Turn raw Chinese text into shards for whole-word-masking pretraining "
        "(clean, split sentences, segment words, WordPiece, memory-mapped shards).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help=".txt (one sentence or paragraph a line, a blank line between documents), .jsonl "
        "(one document a line in a 'text' field), .gz of either, directories (searched for those) "
        "or quoted globs",
    )
    p.add_argument("--output", help="shard directory to write (created; vocab.txt is copied into it); required")
    p.add_argument(
        "--verify",
        nargs="+",
        metavar="DIR",
        help="only check shard directories: sizes, index, ids and every file's sha256 (exit 0 all good, "
        "2 naming the shard file otherwise)",
    )
    v = p.add_mutually_exclusive_group()
    v.add_argument(
        "--vocab",
        help="vocab.txt in bert-base-chinese's format (e.g. a released model's), or a model directory (its "
        "vocab.txt, else its tokenizer.json's WordPiece vocabulary)",
    )
    v.add_argument(
        "--build-vocab", type=int, metavar="N", help="train a WordPiece vocabulary of about N (> 10) tokens on the corpus"
    )
    p.add_argument(
        "--segmenter",
        choices=SEGMENTERS,
        default="jieba",
        help="word boundaries for whole-word masking: jieba (HMM off); rjieba (same words, ~20x faster); "
        "none (WordPiece words: each Chinese character is a word)",
    )
    p.add_argument("--user-dict", help="jieba-format user dictionary (word [freq] [tag] per line) for jieba/rjieba")
    p.add_argument("--workers", type=int, default=1, help="processes (>= 1); the output is identical for any number")
    p.add_argument("--shard-size", type=float, default=256.0, metavar="MB", help="token ids per shard file, in MiB (> 0)")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=1024,
        metavar="KB",
        help="input per unit of parallel work (>= 1; bounds memory per worker; shards end at chunk ends)",
    )
    p.add_argument("--t2s", action="store_true", help="convert traditional to simplified Chinese (needs opencc)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop with file:line at invalid UTF-8, malformed JSON, binary or corrupt files "
        "(default: replace or drop, and count in the summary)",
    )
    p.add_argument("--min-chars", type=int, default=2, help="drop sentences shorter than this (>= 1, after cleaning)")
    p.add_argument(
        "--max-sentence-chars",
        type=int,
        default=256,
        help="split longer sentences at clause punctuation, then every this many characters (>= --min-chars)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete shards of other settings in --output first")
    return p


def verify_shard_dirs(directories):
    """``--verify DIR ...``: open every shard directory with all checks and checksums; prints one
    line a directory (its shards, bytes and seconds); a problem raises ``ShardError`` naming the
    file (the command's exit status 2)."""
    for directory in directories:
        started = time.perf_counter()
        shards = open_shards(directory, check_tokens=True, check_checksums=True)
        size = sum(os.path.getsize(path) for shard in shards.shards for path in shard.paths.values())
        print(
            f"{directory}: {len(shards.shards)} shards, {shards.num_tokens:,} tokens, {size / 1e9:.2f} GB: "
            f"sizes, index, ids and sha256 checksums good in {time.perf_counter() - started:.1f} s"
        )


def main(argv=None):
    """CLI entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verify:
        if args.inputs or args.output:
            parser.error("--verify DIR checks shard directories: give no INPUT and no --output")
        return run_command("prepare", lambda: verify_shard_dirs(args.verify))
    if not args.inputs or not args.output:
        parser.error("INPUT and --output are required (or --verify DIR)")

    def body():
        check_value("output", args.output, check=output_dir_check)  # before the lock creates the directory
        with output_lock(args.output, "prepare"):
            summary = prepare_corpus(
                args.inputs,
                args.output,
                vocab=args.vocab,
                build_vocab=args.build_vocab,
                segmenter=args.segmenter,
                user_dict=args.user_dict,
                workers=args.workers,
                shard_size_mb=args.shard_size,
                chunk_kb=args.chunk_size,
                t2s=args.t2s,
                strict=args.strict,
                min_chars=args.min_chars,
                max_sentence_chars=args.max_sentence_chars,
                overwrite=args.overwrite,
                progress=True,
            )
        print(summary.format())

    return run_command("prepare", body)


if __name__ == "__main__":
    sys.exit(main())
