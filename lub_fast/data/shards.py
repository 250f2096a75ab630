"""The shard format: memory-mapped token ids, word-start bits and a document/sentence index.

A shard directory written by ``python -m lub_fast.prepare`` holds::

    vocab.txt               the vocabulary the ids index (BERT format)
    meta.json               dataset header: format, version, vocab sha256 and size, token dtype,
                            tokenizer/segmenter/cleaning settings, the shard list, totals, summary
    shard-00000.ids         token ids, little-endian uint16 (vocab < 65,536 entries) else uint32
    shard-00000.wstart      word-start flags, one bit per token (numpy packbits, little bit order)
    shard-00000.sentences   int64 token offset of each sentence start, plus the total (S + 1)
    shard-00000.documents   int64 sentence offset of each document start, plus the total (D + 1)
    shard-00000.json        shard header: counts, sizes and sha256 of the four files; written last
                            and atomically, so its presence marks the shard complete

Every sentence has at least one token and every document at least one sentence. The header also
records ``max_token_id``, the largest id the writer wrote (format version 2; version 1 shards,
which lack it, are read as well).

Opening costs O(number of shards), not O(tokens): ``open_shards`` checks the header, the
vocabulary hash, every file's size against the counts, the index ends and that ``max_token_id`` is
below the vocabulary size, and maps the files without reading them. Reading everything is on
demand: ``check_tokens`` (every id below the vocabulary size, the offsets rising) and the sha256
checksums of the header (``Shard.verify_checksums``: a flipped bit that leaves a valid id, or any
flip in ``.wstart``, passes every other check). ``python -m lub_fast.prepare --verify DIR`` does
both; ``PretrainDataset`` compares the checksums when a run opens its shards (each rank a share,
unless the run turns it off). sha256 stays the checksum: it is the fastest of hashlib's here with
SHA-NI (about 1 s/GB, blake2b about 3.5 s/GB). Any problem raises ``ShardError`` naming the file
and the problem.
"""

import hashlib
import json
import os

import numpy as np

from lub_fast.data.tokenizer import file_sha256, read_vocab
from lub_fast.errors import UsageError

FORMAT = "lub_fast-shards"
FORMAT_VERSION = 2  # 2 (lub_fast 2026-12): shard headers record max_token_id
READ_VERSIONS = (1, 2)  # version 1 shards are read as they are; prepare --verify reads their ids
META_FILE = "meta.json"
VOCAB_FILE = "vocab.txt"
SHARD_FILES = ("ids", "wstart", "sentences", "documents")


class ShardError(UsageError, ValueError):
    """A shard directory is missing, truncated, corrupt or inconsistent; the message names the file."""


def token_dtype(vocab_size):
    """uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size < 65536 else np.dtype("<u4")


def shard_name(index):
    return f"shard-{index:05d}"


def expected_sizes(header):
    """Byte size of each shard file implied by the header's counts."""
    n = header["num_tokens"]
    return {
        "ids": n * np.dtype(header["token_dtype"]).itemsize,
        "wstart": (n + 7) // 8,
        "sentences": (header["num_sentences"] + 1) * 8,
        "documents": (header["num_documents"] + 1) * 8,
    }


def write_json_atomic(path, obj):
    """Write JSON to ``path`` through a temporary file, fsync and rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ShardWriter:
    """Streams one shard to disk: appended arrays go straight to the files (``.tmp`` until closed)."""

    def __init__(self, directory, index, dtype):
        self.directory = directory
        self.index = index
        self.name = shard_name(index)
        self.dtype = np.dtype(dtype)
        self.num_tokens = self.num_sentences = self.num_documents = 0
        self.max_token_id = -1
        self._bits = np.zeros(0, dtype=bool)  # word-start flags not yet packed into a whole byte
        self._files, self._hashes = {}, {}
        for kind in SHARD_FILES:
            self._files[kind] = open(self._path(kind) + ".tmp", "wb")  # noqa: SIM115 (open until close())
            self._hashes[kind] = hashlib.sha256()
        self._write("sentences", np.zeros(1, dtype="<i8"))
        self._write("documents", np.zeros(1, dtype="<i8"))

    def _path(self, kind):
        return os.path.join(self.directory, f"{self.name}.{kind}")

    def _write(self, kind, array):
        data = np.ascontiguousarray(array).tobytes()
        self._files[kind].write(data)
        self._hashes[kind].update(data)

    def append(self, ids, word_start, sentence_lengths, document_sentences):
        """Append documents: ``ids``/``word_start`` per token, tokens per sentence, sentences per document."""
        self._write("ids", ids.astype(self.dtype, copy=False))
        if len(ids):
            self.max_token_id = max(self.max_token_id, int(ids.max()))
        bits = np.concatenate((self._bits, word_start.astype(bool, copy=False)))
        whole = len(bits) // 8 * 8
        self._write("wstart", np.packbits(bits[:whole], bitorder="little"))
        self._bits = bits[whole:]
        self._write("sentences", self.num_tokens + np.cumsum(sentence_lengths, dtype=np.int64))
        self._write("documents", self.num_sentences + np.cumsum(document_sentences, dtype=np.int64))
        self.num_tokens += len(ids)
        self.num_sentences += len(sentence_lengths)
        self.num_documents += len(document_sentences)

    def close(self, extra):
        """Finish the files and write the header (the completion marker); returns the header."""
        if len(self._bits):
            self._write("wstart", np.packbits(self._bits, bitorder="little"))
            self._bits = np.zeros(0, dtype=bool)
        for kind, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self._path(kind) + ".tmp", self._path(kind))
        header = dict(extra)
        header.update(
            format=FORMAT,
            version=FORMAT_VERSION,
            index=self.index,
            name=self.name,
            token_dtype=self.dtype.str,
            num_tokens=self.num_tokens,
            num_sentences=self.num_sentences,
            num_documents=self.num_documents,
            max_token_id=self.max_token_id,
        )
        sizes = expected_sizes(header)
        header["files"] = {
            kind: {"name": f"{self.name}.{kind}", "bytes": sizes[kind], "sha256": self._hashes[kind].hexdigest()}
            for kind in SHARD_FILES
        }
        write_json_atomic(os.path.join(self.directory, f"{self.name}.json"), header)
        return header

    def abort(self):
        """Close and delete the unfinished files."""
        for kind, f in self._files.items():
            f.close()
            os.remove(self._path(kind) + ".tmp")


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ShardError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None


def _memmap(path, dtype, count):
    """A read-only ndarray over the file's pages; a plain ndarray view of the ``np.memmap``, whose
    slices would each run ``memmap.__array_finalize__`` (a third of a dataset example's time)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)).view(np.ndarray)


class Shard:
    """One opened shard: ``ids``, ``sentence_offsets`` and ``document_offsets`` are read-only arrays
    over memory-mapped files (pages are read when touched and shared by every process mapping them).
    Pickling keeps the paths, not the data: a spawned DataLoader worker maps the files again."""

    def __init__(self, directory, header):
        self.directory = directory
        self.header = header
        self.name = header["name"]
        self.num_tokens = header["num_tokens"]
        self.num_sentences = header["num_sentences"]
        self.num_documents = header["num_documents"]
        paths = {kind: os.path.join(directory, header["files"][kind]["name"]) for kind in SHARD_FILES}
        self.paths = paths
        self.ids = _memmap(paths["ids"], np.dtype(header["token_dtype"]), self.num_tokens)
        self.word_start_bits = _memmap(paths["wstart"], np.uint8, (self.num_tokens + 7) // 8)
        self.sentence_offsets = _memmap(paths["sentences"], np.dtype("<i8"), self.num_sentences + 1)
        self.document_offsets = _memmap(paths["documents"], np.dtype("<i8"), self.num_documents + 1)

    def __getstate__(self):
        return {"directory": self.directory, "header": self.header}

    def __setstate__(self, state):
        self.__init__(state["directory"], state["header"])

    def word_start(self, start, stop):
        """Bool word-start flags of tokens ``start:stop``."""
        first = start // 8
        bits = np.unpackbits(self.word_start_bits[first : (stop + 7) // 8], bitorder="little")
        return bits[start - first * 8 : stop - first * 8].astype(bool)

    def verify_checksums(self):
        """Compare every file's sha256 with the header; raises ``ShardError`` on a difference."""
        for kind in SHARD_FILES:
            want = self.header["files"][kind]["sha256"]
            got = file_sha256(self.paths[kind])
            if got != want:
                raise ShardError(
                    f"{self.paths[kind]}: sha256 {got[:12]}... differs from {self.name}.json's {want[:12]}... "
                    "(the file changed after prepare wrote it: a bad disk or copy); copy the shard directory "
                    "again or re-run python -m lub_fast.prepare"
                )


class ShardSet:
    """An opened shard directory: ``shards`` (list of ``Shard``), ``meta``, ``vocab_path``, totals."""

    def __init__(self, directory, meta, shards):
        self.directory = directory
        self.meta = meta
        self.shards = shards
        self.vocab_path = os.path.join(directory, VOCAB_FILE)
        self.vocab_size = meta["vocab_size"]
        self.vocab_sha256 = meta["vocab_sha256"]
        self.num_tokens = sum(s.num_tokens for s in shards)
        self.num_sentences = sum(s.num_sentences for s in shards)
        self.num_documents = sum(s.num_documents for s in shards)

    def verify_checksums(self):
        for shard in self.shards:
            shard.verify_checksums()


def _check_header(path, header, meta):
    for key in ("name", "token_dtype", "num_tokens", "num_sentences", "num_documents", "files"):
        if key not in header:
            raise ShardError(f"{path}: header lacks {key!r}")
    if header.get("format") != FORMAT or header.get("version") != meta.get("version"):
        raise ShardError(
            f"{path}: format {header.get('format')!r} version {header.get('version')!r}, "
            f"meta.json's is {FORMAT!r} version {meta.get('version')!r}"
        )
    if header["version"] >= 2 and not isinstance(header.get("max_token_id"), int):
        raise ShardError(f"{path}: a version {header['version']} header lacks 'max_token_id'")
    for key in ("vocab_sha256", "settings_sha256", "token_dtype"):
        if header.get(key) != meta.get(key):
            raise ShardError(f"{path}: {key} {header.get(key)!r} does not match meta.json's {meta.get(key)!r}")


def open_shards(directory, check_tokens=False, check_checksums=False):
    """Open and validate a shard directory written by ``lub_fast.prepare``, in time and memory
    O(number of shards): headers, file sizes, index ends and the headers' ``max_token_id``.

    ``check_tokens`` reads every id and offset once: ids below the vocabulary size, offsets rising;
    ``check_checksums`` compares sha256 checksums (reads everything). Raises ``ShardError``.
    """
    directory = os.fspath(directory)
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isdir(directory):
        raise ShardError(f"{directory}: not a directory")
    meta = _read_json(meta_path, "prepare did not finish, or this is not a shard directory")
    if meta.get("format") != FORMAT or meta.get("version") not in READ_VERSIONS:
        raise ShardError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"this lub_fast reads {FORMAT!r} versions {', '.join(map(str, READ_VERSIONS))}"
        )
    vocab_path = os.path.join(directory, VOCAB_FILE)
    if not os.path.isfile(vocab_path):
        raise ShardError(f"{vocab_path}: missing")
    if file_sha256(vocab_path) != meta.get("vocab_sha256"):
        raise ShardError(
            f"{vocab_path}: sha256 differs from meta.json's vocab_sha256 (the ids index another vocabulary)"
        )
    try:
        vocab_size = len(read_vocab(vocab_path))
    except ValueError as e:
        raise ShardError(str(e)) from None
    if vocab_size != meta.get("vocab_size") or token_dtype(vocab_size).str != meta.get("token_dtype"):
        raise ShardError(f"{meta_path}: vocab_size/token_dtype do not match {vocab_path} ({vocab_size} entries)")
    shards = []
    for i, name in enumerate(meta.get("shards", [])):
        path = os.path.join(directory, f"{name}.json")
        header = _read_json(path, "shard header")
        _check_header(path, header, meta)
        if header["name"] != name or header.get("index") != i:
            raise ShardError(
                f"{path}: header names shard {header['name']!r} #{header.get('index')}, expected {name!r} #{i}"
            )
        sizes = expected_sizes(header)
        for kind in SHARD_FILES:
            file_path = os.path.join(directory, header["files"][kind]["name"])
            if not os.path.isfile(file_path):
                raise ShardError(f"{file_path}: missing")
            actual = os.path.getsize(file_path)
            if actual != sizes[kind]:
                raise ShardError(
                    f"{file_path}: {actual} bytes, the header's counts need {sizes[kind]} (truncated or mismatched shard)"
                )
        if header.get("max_token_id", -1) >= vocab_size:
            raise ShardError(
                f"{path}: max_token_id {header['max_token_id']} is not below the vocabulary size {vocab_size} "
                f"of {vocab_path} (the shard indexes another vocabulary); re-run python -m lub_fast.prepare"
            )
        shard = Shard(directory, header)
        check_index(shard, full=check_tokens)
        if check_tokens and shard.num_tokens and int(shard.ids.max()) >= vocab_size:
            bad = int(np.flatnonzero(shard.ids >= vocab_size)[0])
            raise ShardError(
                f"{shard.paths['ids']}: token {bad} has id {int(shard.ids[bad])}, not below the vocabulary size {vocab_size}"
            )
        if check_checksums:
            shard.verify_checksums()
        shards.append(shard)
    return ShardSet(directory, meta, shards)


def check_index(shard, full):
    """The index runs from 0 to the header's counts; with ``full`` (reads every offset) it rises."""
    s, d = shard.sentence_offsets, shard.document_offsets
    if s[0] != 0 or s[-1] != shard.num_tokens or (full and shard.num_sentences and np.any(np.diff(s) <= 0)):
        raise ShardError(
            f"{shard.paths['sentences']}: sentence offsets must rise from 0 to num_tokens {shard.num_tokens}"
        )
    if d[0] != 0 or d[-1] != shard.num_sentences or (full and shard.num_documents and np.any(np.diff(d) <= 0)):
        raise ShardError(
            f"{shard.paths['documents']}: document offsets must rise from 0 to num_sentences {shard.num_sentences}"
        )
