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
document longer than the chunk size is split into documents of about that size. ``.jsonl``: one
JSON object a line, the document in its ``"text"`` field. Every kept line is split into sentences
at Chinese sentence punctuation (``lub_fast.data.clean``).
"""

import argparse
import dataclasses
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from lub_fast.data.clean import clean_line, looks_binary, split_sentences, to_simplified
from lub_fast.data.segment import SEGMENTERS, Segmenter, segmenter_settings
from lub_fast.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    SHARD_FILES,
    VOCAB_FILE,
    ShardWriter,
    expected_sizes,
    shard_name,
    token_dtype,
    write_json_atomic,
)
from lub_fast.data.tokenizer import WordPieceTokenizer, file_sha256, tokenizer_settings
from lub_fast.data.tokenizer import build_vocab as build_vocab_fn
from lub_fast.errors import EXIT_CODES_HELP, UsageError, run_command
from lub_fast.lock import output_lock

PREPARE_FILE = "prepare.json"
INPUT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
LINE_LIMIT = 16 << 20  # bytes read at once; a longer line is read (and split) in pieces
_BINARY_PROBE = 8192

# Counter keys, in the order the summary prints them, with their labels.
DROPPED = {
    "blank": "blank lines",
    "empty_after_cleaning": "lines empty after cleaning",
    "malformed_json": "malformed JSON lines",
    "no_text_field": "JSON lines without a string 'text'",
    "too_short": "sentences shorter than --min-chars",
    "no_tokens": "sentences without tokens",
    "empty_documents": "documents with nothing left",
    "binary_files": "binary files skipped",
    "corrupt_files": "corrupt compressed files (rest of file skipped)",
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
    min_chars: int = 2
    max_sentence_chars: int = 256
    shard_size_mb: float = 256.0
    chunk_kb: int = 1024

    def __post_init__(self):
        if self.segmenter not in SEGMENTERS:
            raise PrepareError(f"--segmenter must be one of {', '.join(SEGMENTERS)}, got {self.segmenter!r}")
        if self.min_chars < 1 or self.max_sentence_chars < self.min_chars:
            raise PrepareError(
                f"need 1 <= --min-chars ({self.min_chars}) <= --max-sentence-chars ({self.max_sentence_chars})"
            )
        if self.shard_size_mb <= 0 or self.chunk_kb <= 0:
            raise PrepareError("--shard-size and --chunk-size must be positive")


@dataclasses.dataclass(frozen=True)
class PrepareSummary:
    """What ``prepare_corpus`` did: output, totals, and every count of kept/dropped/fixed input."""

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

    def format(self):
        c = self.counts
        lines = [
            f"prepared {self.files} files ({self.input_bytes / 1e6:.1f} MB) into {self.output_dir}: "
            f"{self.shards} shards ({self.shards_skipped} already complete, skipped) in {self.seconds:.1f} s",
            f"kept: {self.documents:,} documents, {self.sentences:,} sentences, {self.tokens:,} tokens "
            f"from {c.get('lines_kept', 0):,} of {c.get('lines_read', 0):,} lines",
            "dropped: " + (", ".join(f"{label} {c[k]:,}" for k, label in DROPPED.items() if c.get(k)) or "nothing"),
            "fixed: " + (", ".join(f"{label} {c[k]:,}" for k, label in FIXED.items() if c.get(k)) or "nothing"),
        ]
        for path, n in self.invalid_utf8_by_file.items():
            lines.append(f"  invalid UTF-8 replaced in {n:,} lines of {path}")
        tokens = max(self.tokens, 1)
        lines.append(
            f"words: {c.get('word_mismatches', 0):,} segmentation/token mismatches "
            f"({100 * c.get('word_mismatches', 0) / tokens:.2f}% of tokens, tokens win), "
            f"[UNK] {c.get('unk_tokens', 0):,} ({100 * c.get('unk_tokens', 0) / tokens:.2f}%)"
        )
        if not self.documents:
            lines.append("warning: no documents were written")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- input files


def _input_kind(path):
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith((".jsonl", ".json")) else "txt"


def find_inputs(inputs):
    """Files named by ``inputs`` (files, directories searched recursively for .txt/.jsonl[.gz], globs)."""
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
            files.extend(sorted(found))
        elif os.path.isfile(item):
            files.append(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise PrepareError(f"{item}: no file matches")
            files.extend(find_inputs(matches))
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
        return stream.read(_BINARY_PROBE)


def _split_utf8(raw):
    """Split bytes before a trailing incomplete UTF-8 character: (complete part, incomplete tail)."""
    i = len(raw) - 1
    while i > 0 and len(raw) - i < 4 and (raw[i] & 0xC0) == 0x80:
        i -= 1
    lead = raw[i]
    need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return (raw[:i], raw[i:]) if i + need > len(raw) else (raw, b"")


def _raw_lines(stream):
    """(line number, bytes) of each line; a line over LINE_LIMIT comes in pieces with one number."""
    lineno, carry = 1, b""
    while True:
        raw = carry + stream.readline(LINE_LIMIT)
        carry = b""
        if not raw:
            return
        if raw.endswith(b"\n"):
            yield lineno, raw
            lineno += 1
        else:
            raw, carry = _split_utf8(raw)
            if raw:
                yield lineno, raw
            elif carry:  # a stream ending inside a character
                yield lineno, carry
                return


@dataclasses.dataclass
class _Chunk:
    index: int
    docs: list  # (file index, first line number, [line, ...])
    progress_bytes: int


class _Reader:
    """Reads the files in order, decodes, groups lines into documents and documents into chunks."""

    def __init__(self, files, config):
        self.files = files
        self.config = config
        self.counts = Counter()
        self.invalid_utf8 = Counter()

    def chunks(self):
        chunk_bytes = self.config.chunk_kb * 1024
        docs, size, index, done_bytes = [], 0, 0, 0
        for file_index, path in enumerate(self.files):
            for doc in self._documents(file_index, path, chunk_bytes):
                docs.append(doc[:3])
                size += doc[3]
                if size >= chunk_bytes:
                    yield _Chunk(index, docs, self._position(path, done_bytes))
                    docs, size, index = [], 0, index + 1
            done_bytes += os.path.getsize(path)
        if docs:
            yield _Chunk(index, docs, done_bytes)

    def _position(self, path, done_bytes):
        return done_bytes + (self._raw.tell() if self._raw and not self._raw.closed else os.path.getsize(path))

    def _documents(self, file_index, path, max_doc_bytes):
        """(file index, first line, lines, bytes) per document of one file."""
        self._raw = None
        try:
            head = _head(path)
        except (OSError, EOFError, zlib.error) as e:
            self._corrupt(path, 0, e)
            return
        if looks_binary(head):
            if self.config.strict:
                raise PrepareError(f"{path}: binary file (NUL bytes: UTF-16 or not text) (--strict)")
            self.counts["binary_files"] += 1
            return
        jsonl = _input_kind(path) == "jsonl"
        stream, self._raw = _open(path)
        lines, first, size, lineno = [], 0, 0, 0
        with self._raw, stream:
            try:
                for lineno, raw in _raw_lines(stream):
                    self.counts["lines_read"] += 1
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        if self.config.strict:
                            raise PrepareError(
                                f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line (--strict)"
                            ) from None
                        text = raw.decode("utf-8", "replace")
                        self.counts["invalid_utf8"] += 1
                        self.invalid_utf8[path] += 1
                    if not text.strip():
                        self.counts["blank"] += 1
                        if lines:
                            yield file_index, first, lines, size
                            lines, size = [], 0
                    elif jsonl:
                        yield file_index, lineno, [text], len(raw)
                    else:
                        if lines and size >= max_doc_bytes:
                            self.counts["documents_split"] += 1
                            yield file_index, first, lines, size
                            lines, size = [], 0
                        if not lines:
                            first = lineno
                        lines.append(text)
                        size += len(raw)
            except (OSError, EOFError, zlib.error) as e:
                self._corrupt(path, lineno, e)
            if lines:
                yield file_index, first, lines, size

    def _corrupt(self, path, lineno, error):
        if self.config.strict:
            raise PrepareError(f"{path}:{lineno + 1}: corrupt or truncated compressed file ({error}) (--strict)")
        self.counts["corrupt_files"] += 1


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
    if not jsonl:
        return lines
    try:
        obj = json.loads(lines[0])
    except json.JSONDecodeError as e:
        if strict:
            raise PrepareError(f"{path}:{first}: malformed JSON ({e.msg} at column {e.colno}) (--strict)") from None
        counts["malformed_json"] += 1
        return []
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        if strict:
            raise PrepareError(f"{path}:{first}: no string field 'text' (--strict)")
        counts["no_text_field"] += 1
        return []
    return obj["text"].splitlines()


def _clean_chunk(docs):
    """Sentences of a chunk: (sentences, document index of each sentence, counts)."""
    config, files = _STATE["config"], _STATE["files"]
    counts = Counter()
    sentences, owner = [], []
    for d, (file_index, first, lines) in enumerate(docs):
        path = files[file_index]
        jsonl = _input_kind(path) == "jsonl"
        doc_sentences = 0
        for line in _document_lines(path, jsonl, first, lines, counts, config.strict):
            if config.t2s:
                converted = to_simplified(line)
                counts["t2s"] += converted != line
                line = converted
            text, removed = clean_line(line)
            counts["control_chars"] += removed > 0
            if not text:
                counts["empty_after_cleaning"] += not jsonl
                continue
            pieces, long_sentences, hard_cuts = split_sentences(text, config.max_sentence_chars)
            kept = [p for p in pieces if len(p) >= config.min_chars]
            counts["long_lines"] += long_sentences
            counts["hard_cuts"] += hard_cuts
            counts["too_short"] += len(pieces) - len(kept)
            counts["lines_kept"] += bool(kept) and not jsonl
            sentences.extend(kept)
            doc_sentences += len(kept)
        owner.extend([d] * doc_sentences)
        counts["lines_kept"] += jsonl and doc_sentences > 0
    return sentences, owner, counts


def _vocab_chunk(docs):
    return _clean_chunk(docs)[0]


def _process_chunk(docs):
    """Token ids, word starts, tokens per sentence, sentences per document, counts of one chunk."""
    tokenizer, segmenter = _STATE["tokenizer"], _STATE["segmenter"]
    sentences, owner, counts = _clean_chunk(docs)
    text = "\n".join(sentences)
    ids, starts, word_start, mismatches = tokenizer.encode_words(text, segmenter.boundaries(text))
    lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
    sentence_starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1])) if len(sentences) else lengths
    tokens_per_sentence = np.bincount(
        np.searchsorted(sentence_starts, starts, side="right") - 1, minlength=len(sentences)
    )
    keep = tokens_per_sentence > 0
    sentences_per_doc = np.bincount(np.asarray(owner, dtype=np.int64)[keep], minlength=len(docs))
    counts["no_tokens"] += int(np.count_nonzero(~keep))
    counts["empty_documents"] += int(np.count_nonzero(sentences_per_doc == 0))
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
    """Delete shard files numbered ``first`` and up (complete or not) and meta.json."""
    for name in os.listdir(output_dir):
        if name.startswith("shard-") and name[6:11].isdigit() and int(name[6:11]) >= first or name == META_FILE:
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

    Exactly one of ``vocab`` (a bert-base-chinese-format vocab.txt) and ``build_vocab`` (train a
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
    if vocab is not None and not os.path.isfile(vocab):
        raise PrepareError(f"{vocab}: no such vocabulary file")
    if build_vocab is not None and build_vocab <= 10:
        raise PrepareError(f"--build-vocab {build_vocab}: too small for a vocabulary")
    if user_dict is not None and not os.path.isfile(user_dict):
        raise PrepareError(f"{user_dict}: no such user dictionary")
    if t2s:
        to_simplified("")  # fail now, not in a worker, when OpenCC is missing
    files = find_inputs(inputs)
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
        vocab_sha256 = file_sha256(vocab)
        if previous is not None and previous["vocab_sha256"] != vocab_sha256:
            raise PrepareError(f"{output_dir}: holds shards of another vocabulary; use --overwrite or another --output")
        if not (os.path.isfile(vocab_path) and file_sha256(vocab_path) == vocab_sha256):
            shutil.copyfile(vocab, vocab_path + ".tmp")
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
        nargs="+",
        metavar="INPUT",
        help=".txt (one sentence or paragraph a line, a blank line between documents), .jsonl "
        "(one document a line in a 'text' field), .gz of either, directories (searched for those) "
        "or quoted globs",
    )
    p.add_argument("--output", required=True, help="shard directory to write (created; vocab.txt is copied into it)")
    v = p.add_mutually_exclusive_group(required=True)
    v.add_argument("--vocab", help="vocab.txt in bert-base-chinese's format (e.g. a released model's)")
    v.add_argument(
        "--build-vocab", type=int, metavar="N", help="train a WordPiece vocabulary of about N tokens on the corpus"
    )
    p.add_argument(
        "--segmenter",
        choices=SEGMENTERS,
        default="jieba",
        help="word boundaries for whole-word masking: jieba (HMM off); rjieba (same words, ~20x faster); "
        "none (WordPiece words: each Chinese character is a word)",
    )
    p.add_argument("--user-dict", help="jieba-format user dictionary (word [freq] [tag] per line) for jieba/rjieba")
    p.add_argument("--workers", type=int, default=1, help="processes; the output is identical for any number")
    p.add_argument("--shard-size", type=float, default=256.0, metavar="MB", help="token ids per shard file, in MiB")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=1024,
        metavar="KB",
        help="input per unit of parallel work (bounds memory per worker; shards end at chunk ends)",
    )
    p.add_argument("--t2s", action="store_true", help="convert traditional to simplified Chinese (needs opencc)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop with file:line at invalid UTF-8, malformed JSON, binary or corrupt files "
        "(default: replace or drop, and count in the summary)",
    )
    p.add_argument("--min-chars", type=int, default=2, help="drop sentences shorter than this (after cleaning)")
    p.add_argument(
        "--max-sentence-chars",
        type=int,
        default=256,
        help="split longer sentences at clause punctuation, then every this many characters",
    )
    p.add_argument("--overwrite", action="store_true", help="delete shards of other settings in --output first")
    return p


def main(argv=None):
    """CLI entry point; returns the exit status."""
    args = _parser().parse_args(argv)

    def body():
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
