"""Finding and opening raw inputs, and reading them as documents in chunks (``lub_fast.prepare``).

Formats: ``.txt`` (one sentence or paragraph a line, a blank line between documents) and ``.jsonl``
(one JSON object a line, the document in ``"text"``), either gzip-compressed (recognised by its
magic bytes); directories are searched recursively, globs expanded. Files are UTF-8, or UTF-16 /
UTF-32 as ``clean.sniff_encoding`` recognises them (re-encoded to UTF-8 on the fly); binary files
are skipped. FIFOs, sockets, devices and broken symbolic links found in a directory are skipped and
named (named on their own they are an error). A line longer than the chunk size is read in pieces
cut after sentence ends, so memory stays bounded inside a line too.
"""

import codecs
import dataclasses
import errno
import glob
import gzip
import os
import stat
import zlib
from collections import Counter

from lub_fast.data.clean import last_sentence_end, sniff_encoding
from lub_fast.errors import UsageError

INPUT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
LINE_LIMIT = 16 << 20  # bytes of a JSON line read whole; a longer one is dropped and named
NAMED_FIRST = 5  # entries named per reason in the summary, then a count
_SAMPLE_BYTES = 8192  # the first bytes of a file that decide its encoding


class PrepareError(UsageError):
    """Bad input or output directory: the one-line message names the file (and line) and the rule."""


def input_kind(path):
    """"jsonl" for .jsonl/.json files (compressed or not), else "txt"."""
    name = path.removesuffix(".gz")
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


def open_input(path):
    """(decompressed binary stream, raw file for progress); gzip is recognised by its magic bytes."""
    raw = open(path, "rb")
    magic = raw.read(2)
    raw.seek(0)
    return (gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw), raw


def _head(path):
    """The first bytes of a file, decompressed."""
    stream, raw = open_input(path)
    with raw, stream:
        return stream.read(_SAMPLE_BYTES)


# An undecodable UTF-16/32 code unit becomes a lone surrogate, which UTF-8 ("surrogatepass") writes
# as bytes that are not valid UTF-8: the reader counts the line as invalid, or stops under --strict.
codecs.register_error("lub_fast.lone_surrogate", lambda error: ("\udcff", error.end))


class _Stream:
    """A wrapper of a binary stream ``self.stream`` that closes it."""

    def close(self):
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Recoded(_Stream):
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



def _open_text(path, encoding):
    """(stream of UTF-8 bytes, raw file for progress): UTF-16/32 is re-encoded on the fly."""
    stream, raw = open_input(path)
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


_PROBE = 4096  # bytes of a line read to tell whether it is blank; a longer line is not


@dataclasses.dataclass(frozen=True)
class Segment:
    """Bytes ``[start, stop)`` of input file ``file_index``.

    A segment owns the lines that start in ``[document_start(start), document_start(stop))`` (see
    ``_document_start``), so that the segments of a file own each of its lines exactly once, whoever
    reads them; a file that is not split (``whole``: compressed, UTF-16/32, binary or unreadable) is
    one segment ``[0, size)`` read from the start.
    """

    file_index: int
    start: int
    stop: int
    whole: bool


@dataclasses.dataclass(frozen=True)
class Unit:
    """The unit of parallel work: consecutive segments of about ``chunk_kb`` KB of input, in order."""

    index: int
    segments: tuple
    size: int  # input bytes


def _splittable(path):
    """True for an uncompressed UTF-8 file: one that can be read from any line on."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SAMPLE_BYTES)
    except OSError:
        return False
    return head[:2] != b"\x1f\x8b" and sniff_encoding(head)[0] == "utf-8"


def plan_units(files, chunk_bytes):
    """The units of ``files``: a function of their sizes and kinds alone (every worker count, every
    part of a ``--part`` run and every resume plans the same). Uncompressed UTF-8 files are cut every
    ``chunk_bytes`` of the concatenated input; other files are whole segments; small files share a unit."""
    units, segments, size = [], [], 0
    for file_index, path in enumerate(files):
        total = os.path.getsize(path)
        if total and _splittable(path):
            pos = 0
            while pos < total:
                stop = min(total, pos + chunk_bytes - size)
                segments.append(Segment(file_index, pos, stop, False))
                size += stop - pos
                pos = stop
                if size >= chunk_bytes:
                    units.append(Unit(len(units), tuple(segments), size))
                    segments, size = [], 0
        else:
            segments.append(Segment(file_index, 0, total, True))
            size += total
            if size >= chunk_bytes:
                units.append(Unit(len(units), tuple(segments), size))
                segments, size = [], 0
    if segments:
        units.append(Unit(len(units), tuple(segments), size))
    return units


def _next_line(f, pos, size):
    """The offset after the first newline at or after ``pos`` (``size`` when there is none)."""
    f.seek(pos)
    while True:
        block = f.read(1 << 16)
        if not block:
            return size
        end = block.find(b"\n")
        if end >= 0:
            return pos + end + 1
        pos += len(block)


def _blank_before(f, pos):
    """True when the line that ends just before ``pos`` (a line start > 0) is blank."""
    lo = max(0, pos - 1 - _PROBE)
    f.seek(lo)
    before = f.read(pos - 1 - lo)
    newline = before.rfind(b"\n")
    if newline < 0 and lo > 0:
        return False  # longer than the probe: not blank
    return not before[newline + 1 :].decode("utf-8", "replace").strip()


def _document_start(f, pos, size, window, jsonl):
    """Where the segment boundary at byte ``pos`` of an uncompressed UTF-8 file falls: ``(offset,
    cut)``.

    The first line start at or after ``pos`` whose line before is blank, among the lines that start
    before ``pos + window``; else (a document longer than the window around ``pos``) the first line
    start at or after ``pos``, where the document is cut (``cut`` True). For JSON lines every line
    start is a document start. A pure function of the file's bytes, and non-decreasing in ``pos``,
    which is what lets two workers agree on a boundary without talking.
    """
    first = _next_line(f, pos - 1, size)
    if jsonl or first >= size:
        return first, False
    start, blank = first, _blank_before(f, first)
    while not blank and start < size and start < pos + window:
        f.seek(start)
        line = f.readline(_PROBE)
        if len(line) == _PROBE and not line.endswith(b"\n"):
            start = _next_line(f, start + _PROBE, size)
            continue
        start += len(line)
        blank = not line.decode("utf-8", "replace").strip()
    return (start, False) if blank else (first, True)


def line_number(path, offset, relative):
    """The line number in ``path`` of line ``relative`` (1-based) counted from byte ``offset`` (a
    line start): for the messages that name a line; reads the file up to ``offset``."""
    if offset == 0:
        return relative
    newlines = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 20))
            newlines += block.count(b"\n")
            offset -= len(block)
    return newlines + relative


class _Bounded(_Stream):
    """A binary file read from a line start up to the line that starts at ``stop``."""

    def __init__(self, stream, stop):
        self.stream, self.stop, self.at_line_start = stream, stop, True

    def readline(self, size):
        if self.at_line_start and self.stream.tell() >= self.stop:
            return b""
        data = self.stream.readline(size)
        self.at_line_start = data.endswith(b"\n")
        return data


class Reader:
    """Reads units: decodes, groups lines into documents and documents into chunks, and counts.

    A document is ``(file index, offset, first line, [line, ...], [index of a line continuing the
    one before, ...])``; ``first`` counts from the line at byte ``offset`` (``line_number`` gives the
    file's line number). ``counts``, ``named`` (the first few entries per reason) and
    ``invalid_utf8`` (lines per file) add up over the units read.
    """

    def __init__(self, files, config):
        self.files = files
        self.config = config
        self.counts = Counter()
        self.invalid_utf8 = Counter()
        self.named = {}

    def note(self, reason, entry):
        """Count ``reason`` and name ``entry`` ("path (why)", or a function giving it) if it is among
        the first few."""
        self.counts[reason] += 1
        named = self.named.setdefault(reason, [])
        if len(named) < NAMED_FIRST:
            named.append(entry() if callable(entry) else entry)

    def chunks(self, unit):
        """The documents of ``unit`` in lists of about ``chunk_kb`` KB (the last one shorter)."""
        chunk_bytes = self.config.chunk_kb * 1024
        docs, size = [], 0
        for segment in unit.segments:
            for doc in self._documents(segment, chunk_bytes):
                docs.append(doc[:5])
                size += doc[5]
                if size >= chunk_bytes:
                    yield docs
                    docs, size = [], 0
        if docs:
            yield docs

    def _open(self, segment, path, jsonl, max_doc_bytes):
        """(stream of UTF-8 bytes, raw file, offset of its first line, what its encoding is called),
        or None when the segment has nothing to read (noted)."""
        if not segment.whole:
            raw = open(path, "rb")
            size = os.path.getsize(path)
            (start, cut), stop = (0, False), size
            if segment.start:
                start, cut = _document_start(raw, segment.start, size, max_doc_bytes, jsonl)
            if segment.stop < size:
                stop = _document_start(raw, segment.stop, size, max_doc_bytes, jsonl)[0]
            if start >= stop:
                raw.close()
                return None
            self.counts["documents_split"] += cut
            raw.seek(start)
            return _Bounded(raw, stop), raw, start, "UTF-8"
        try:
            head = _head(path)
        except (OSError, EOFError, zlib.error) as e:
            self._corrupt(path, 0, e)
            return None
        encoding, why = sniff_encoding(head)
        if encoding is None:
            if self.config.strict:
                raise PrepareError(f"{path}: {why} (--strict)")
            self.note("binary_files", f"{path} ({why})")
            return None
        if why:
            self.note("decoded_files", f"{path} ({why})")
        stream, raw = _open_text(path, encoding)
        return stream, raw, 0, "UTF-8" if encoding == "utf-8" else encoding.upper()

    def _documents(self, segment, max_doc_bytes):
        """(file index, offset, first line, lines, continued, bytes) per document of one segment.

        A .txt line longer than ``max_doc_bytes`` comes in pieces (``_raw_lines``); ``continued``
        lists the indices of the lines that are later pieces of the line before them, which the
        workers count once, as one line.
        """
        file_index = segment.file_index
        path = self.files[file_index]
        jsonl = input_kind(path) == "jsonl"
        opened = self._open(segment, path, jsonl, max_doc_bytes)
        if opened is None:
            return
        stream, raw_file, offset, what = opened

        def where(lineno):
            return f"{path}:{line_number(path, offset, lineno)}"

        piece_bytes = LINE_LIMIT if jsonl else min(LINE_LIMIT, max_doc_bytes)
        lines, continued, first, size, lineno, sent, invalid = [], [], 0, 0, 0, 0, 0
        with raw_file, stream:
            try:
                for lineno, raw, piece in _raw_lines(stream, piece_bytes, jsonl):
                    self.counts["lines_read"] += not piece
                    if raw is None:
                        if self.config.strict:
                            raise PrepareError(f"{where(lineno)}: JSON line over {LINE_LIMIT >> 20} MiB (--strict)")
                        self.note("long_json_lines", lambda n=lineno: where(n))
                        continue
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        if self.config.strict:
                            raise PrepareError(
                                f"{where(lineno)}: invalid {what} at byte {e.start} of the line (--strict)"
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
                            yield file_index, offset, first, lines, continued, size
                            lines, continued, size = [], [], 0
                        continue
                    if piece and sent != lineno:  # the line's first pieces were blank: it is no blank line
                        self.counts["blank"] -= 1
                    if jsonl:
                        yield file_index, offset, lineno, [text], [], len(raw)
                        continue
                    if lines and size >= max_doc_bytes:
                        self.counts["documents_split"] += 1
                        yield file_index, offset, first, lines, continued, size
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
                yield file_index, offset, first, lines, continued, size

    def _corrupt(self, path, lineno, error):
        if self.config.strict:
            raise PrepareError(f"{path}:{lineno + 1}: corrupt or truncated compressed file ({error}) (--strict)")
        self.note("corrupt_files", f"{path}:{lineno + 1} ({error})")
