"""The teacher cache of two-step distillation: the teacher's outputs at every masked position of
every training micro-batch, written once (step 1) and memory-mapped by the student's run (step 2).

Layout of a cache directory::

    cache.json                 header: format, version, what the cache was made from (data
                               signature, dataset and masking settings, batch size, world size,
                               micro-batches per rank), the teacher (weights sha256, config,
                               vocab sha256), k, temperature, dtypes, hidden-state positions
    rank-00000/                one directory per rank of the run that will read it
        values.bin             [R, k] top-k teacher logits, little-endian float16 (or float32),
                               largest first
        indices.bin            [R, k] their vocabulary ids, uint16 (vocab <= 65,536) or int32
        lognorm.bin            [R] float32 logsumexp(logits / T) over the whole vocabulary
        hidden.bin             [N, H] last-layer teacher states, dtype of values.bin (only with a
                               hidden-state loss)
        batches.bin            per micro-batch (rows_end, hidden_rows_end, fingerprint): int64,
                               int64, uint64; micro-batch m owns rows [rows_end[m-1], rows_end[m])
        progress.json          the valid prefix (micro-batches, rows, hidden rows), rewritten
                               atomically after the data files are fsynced
        complete.json          written last: counts, size and sha256 of every file

R counts masked positions, N the hidden-state rows (real tokens, or masked positions). Writing
appends in micro-batch order; a crash leaves bytes past ``progress.json``, which a resumed writer
truncates before appending again, so the finished files are byte-identical to an uninterrupted
run. Each micro-batch's ``fingerprint`` (64-bit BLAKE2b of its input ids, attention mask, masked
positions and labels) lets step 2 prove that it sees the very batches the teacher saw.
Sizes per masked position: ``k * (2 + 2) + 4`` bytes with float16 values and uint16 ids.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lub_fast.config_cli import check_fields, option
from lub_fast.data.shards import write_json_atomic
from lub_fast.errors import UsageError

FORMAT = "lub_fast-teacher-cache"
VERSION = 1
HEADER_FILE = "cache.json"
_BATCH_DTYPE = np.dtype([("rows", "<i8"), ("hidden_rows", "<i8"), ("fingerprint", "<u8")])
_FILES = ("values", "indices", "lognorm", "hidden", "batches")


@dataclass(frozen=True)
class CacheSection:
    """How step 1 writes the cache (``distill --cache.*``)."""

    top_k: int = option(64, "teacher logits kept per masked position (the vocabulary size: all)", ge=1)
    values_dtype: Literal["float16", "float32"] = option("float16", "dtype of the cached logits and hidden states")
    flush_every: int = option(64, "micro-batches between durable progress marks (resume points)", ge=1)

    def __post_init__(self):
        check_fields(self)


class CacheError(UsageError, ValueError):
    """A cache that is missing, incomplete, corrupt, or made from other data, masks or teacher."""


def rank_dir(directory, rank: int) -> Path:
    return Path(directory) / f"rank-{rank:05d}"


def indices_dtype(vocab_size: int) -> str:
    """``"<u2"`` when every id fits in 16 bits, else ``"<i4"``."""
    return "<u2" if vocab_size <= 65536 else "<i4"


def fingerprint(batch: dict) -> int:
    """64-bit BLAKE2b of a micro-batch's ``input_ids``, ``attention_mask``, ``masked_positions`` and
    ``masked_labels`` (CPU tensors): equal batches, equal masks."""
    h = hashlib.blake2b(digest_size=8)
    for key in ("input_ids", "attention_mask", "masked_positions", "masked_labels"):
        value = batch[key].to(torch.int64).contiguous()
        h.update(np.asarray(value.shape, dtype="<i8").tobytes())
        h.update(value.numpy().astype("<i8", copy=False).tobytes())
    return int.from_bytes(h.digest(), "little")


def read_header(directory) -> dict:
    path = Path(directory) / HEADER_FILE
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{path}: missing (not a teacher cache; make one with --cache-teacher)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise CacheError(f"{path}: unreadable ({error})") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CacheError(
            f"{path}: format {header.get('format')!r} version {header.get('version')!r}, "
            f"this lub_fast reads {FORMAT!r} version {VERSION}"
        )
    return header


def differences(old, new, prefix: str = "") -> list[str]:
    """``"key: old vs new"`` for every leaf where two JSON-like dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} (cache) vs {new!r} (now)"]


def write_header(directory, header: dict) -> None:
    """Create the cache's ``cache.json``, or check that an existing one (a cache being resumed)
    says the same; raises ``CacheError`` listing the differences otherwise."""
    directory = Path(directory)
    header = {"format": FORMAT, "version": VERSION, **header}
    if (directory / HEADER_FILE).exists():
        diffs = differences(read_header(directory), json.loads(json.dumps(header)))
        if diffs:
            raise CacheError(
                f"{directory} holds a teacher cache of other settings ({'; '.join(diffs)}): "
                "choose another directory or delete it"
            )
        return
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(directory / HEADER_FILE), header)


def _shapes(header: dict) -> dict:
    """Per file: (numpy dtype, trailing shape of one row)."""
    return {
        "values": (np.dtype(header["values_dtype"]), (header["k"],)),
        "indices": (np.dtype(header["indices_dtype"]), (header["k"],)),
        "lognorm": (np.dtype("<f4"), ()),
        "hidden": (np.dtype(header["values_dtype"]), (header["hidden_size"],)),
        "batches": (_BATCH_DTYPE, ()),
    }


def _row_bytes(header: dict) -> dict:
    return {name: dtype.itemsize * int(np.prod(shape)) for name, (dtype, shape) in _shapes(header).items()}


def _files(header: dict) -> tuple[str, ...]:
    return tuple(f for f in _FILES if f != "hidden" or header["hidden"] != "none")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CacheWriter:
    """Appends one rank's micro-batches to ``directory/rank-XXXXX`` (``write_header`` first).

    Opening it resumes: files are cut back to ``progress.json``'s valid prefix and
    ``micro_batches_done`` says where to continue; a finished rank has ``complete`` set.
    """

    def __init__(self, directory, rank: int, flush_every: int = 64):
        self.header = read_header(directory)
        self.dir = rank_dir(directory, rank)
        self.flush_every = max(1, flush_every)
        self.row_bytes = _row_bytes(self.header)
        self.names = _files(self.header)
        self.complete = (self.dir / "complete.json").exists()
        self.micro_batches_done = self.rows = self.hidden_rows = 0
        self._files = {}
        if self.complete:
            self.micro_batches_done = self.header["micro_batches"]
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        progress = self.dir / "progress.json"
        if progress.exists():
            state = json.loads(progress.read_text(encoding="utf-8"))
            self.micro_batches_done, self.rows, self.hidden_rows = state["micro_batches"], state["rows"], state["hidden_rows"]
        counts = self._counts()
        for name in self.names:
            path = self.dir / f"{name}.bin"
            f = open(path, "r+b" if path.exists() else "w+b")
            f.truncate(counts[name] * self.row_bytes[name])
            f.seek(0, os.SEEK_END)
            self._files[name] = f
        self._since_flush = 0

    def _counts(self) -> dict:
        return {"values": self.rows, "indices": self.rows, "lognorm": self.rows, "hidden": self.hidden_rows,
                "batches": self.micro_batches_done}

    def append(self, batch_fingerprint: int, values, indices, lognorm, hidden=None) -> None:
        """One micro-batch: ``values``/``indices`` ``[M, k]``, ``lognorm`` ``[M]`` (tensors or arrays,
        converted to the header's dtypes), ``hidden`` ``[N, H]`` when the cache keeps states."""
        h = self.header
        if self.micro_batches_done >= h["micro_batches"]:
            raise CacheError(f"{self.dir}: already holds all {h['micro_batches']} micro-batches")
        arrays = {
            "values": _numpy(values, h["values_dtype"]),
            "indices": _numpy(indices, h["indices_dtype"]),
            "lognorm": _numpy(lognorm, "<f4"),
        }
        rows = arrays["values"].shape[0]
        if arrays["values"].shape != (rows, h["k"]) or arrays["indices"].shape != (rows, h["k"]) or arrays["lognorm"].shape != (rows,):
            raise ValueError(
                f"CacheWriter.append: values {arrays['values'].shape}, indices {arrays['indices'].shape} and "
                f"lognorm {arrays['lognorm'].shape} must be [M, k={h['k']}], [M, k], [M]"
            )
        if "hidden" in self.names:
            if hidden is None or hidden.shape[1:] != (h["hidden_size"],):
                raise ValueError(f"CacheWriter.append: this cache keeps hidden states [N, {h['hidden_size']}]")
            arrays["hidden"] = _numpy(hidden, h["values_dtype"])
            self.hidden_rows += arrays["hidden"].shape[0]
        self.rows += rows
        record = np.zeros(1, _BATCH_DTYPE)
        record[0] = (self.rows, self.hidden_rows, batch_fingerprint)
        arrays["batches"] = record
        for name in self.names:
            self._files[name].write(arrays[name].tobytes())
        self.micro_batches_done += 1
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Make everything appended so far durable and mark it valid (``progress.json``)."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        write_json_atomic(
            str(self.dir / "progress.json"),
            {"micro_batches": self.micro_batches_done, "rows": self.rows, "hidden_rows": self.hidden_rows},
        )
        self._since_flush = 0

    def finish(self) -> dict:
        """After the last micro-batch: flush, checksum every file, write ``complete.json``."""
        if self.complete:
            return json.loads((self.dir / "complete.json").read_text(encoding="utf-8"))
        if self.micro_batches_done != self.header["micro_batches"]:
            raise CacheError(
                f"{self.dir}: {self.micro_batches_done} of {self.header['micro_batches']} micro-batches written"
            )
        self.flush()
        self.close()
        files = {}
        for name in self.names:
            path = self.dir / f"{name}.bin"
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        summary = {"micro_batches": self.micro_batches_done, "rows": self.rows, "hidden_rows": self.hidden_rows,
                   "files": files}
        write_json_atomic(str(self.dir / "complete.json"), summary)
        self.complete = True
        return summary

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


def _numpy(x, dtype: str) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x.to(torch.int64)
        x = x.numpy()
    return np.ascontiguousarray(x, dtype=np.dtype(dtype))


class CacheReader:
    """One rank's finished cache, memory-mapped. ``entries(m)`` gives micro-batch ``m``'s teacher
    outputs as the batch keys ``DistillObjective`` reads; ``check(m, batch)`` proves the batch is
    the one the teacher saw."""

    def __init__(self, directory, rank: int, world_size: int, verify_checksums: bool = False):
        self.directory = Path(directory)
        self.header = read_header(directory)
        h = self.header
        if h["world_size"] != world_size:
            raise CacheError(
                f"{directory} was written for {h['world_size']} process(es) (each rank caches its own "
                f"micro-batches); this run has {world_size}: run step 2 with the same world size"
            )
        self.dir = rank_dir(directory, rank)
        done = self.dir / "complete.json"
        if not done.exists():
            raise CacheError(f"{self.dir}: incomplete (no complete.json): run --cache-teacher again to finish it")
        summary = json.loads(done.read_text(encoding="utf-8"))
        if summary["micro_batches"] != h["micro_batches"]:
            raise CacheError(f"{done}: {summary['micro_batches']} micro-batches, the header says {h['micro_batches']}")
        counts = {"values": summary["rows"], "indices": summary["rows"], "lognorm": summary["rows"],
                  "hidden": summary["hidden_rows"], "batches": summary["micro_batches"]}
        self.arrays = {}
        for name in _files(h):
            path = self.dir / f"{name}.bin"
            dtype, shape = _shapes(h)[name]
            expected = counts[name] * _row_bytes(h)[name]
            if not path.exists() or path.stat().st_size != expected:
                size = path.stat().st_size if path.exists() else "no"
                raise CacheError(f"{path}: {size} bytes, complete.json's counts need {expected} (truncated or corrupt)")
            if verify_checksums and _sha256(path) != summary["files"][path.name]["sha256"]:
                raise CacheError(f"{path}: sha256 differs from complete.json (corrupt)")
            if counts[name]:
                self.arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=(counts[name], *shape))
            else:  # numpy cannot map an empty file
                self.arrays[name] = np.zeros((0, *shape), dtype)
        self.micro_batches = summary["micro_batches"]

    def _span(self, m: int, column: str) -> tuple[int, int]:
        ends = self.arrays["batches"][column]
        return (int(ends[m - 1]) if m else 0), int(ends[m])

    def check(self, m: int, batch: dict) -> None:
        """Raise ``CacheError`` unless micro-batch ``m`` exists and ``batch`` is the one cached."""
        if m >= self.micro_batches:
            raise CacheError(
                f"{self.dir} holds {self.micro_batches} micro-batches per rank; micro-batch {m} was asked for "
                "(step 2 trains at most as many steps x grad_accum_steps as step 1 cached)"
            )
        if fingerprint(batch) != int(self.arrays["batches"]["fingerprint"][m]):
            raise CacheError(
                f"{self.dir}: micro-batch {m} differs from the one the teacher saw (other data, examples or "
                "masks than the cache was made from)"
            )

    def entries(self, m: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``m``: ``teacher_values`` ``[M, k]`` (the cache's dtype), ``teacher_indices``
        int64 ``[M, k]``, ``teacher_lognorm`` float32 ``[M]``, and ``teacher_hidden`` ``[N, H]`` (the
        cache's dtype) when cached."""
        r0, r1 = self._span(m, "rows")
        out = {
            "teacher_values": torch.from_numpy(np.array(self.arrays["values"][r0:r1])),
            "teacher_indices": torch.from_numpy(self.arrays["indices"][r0:r1].astype(np.int64)),
            "teacher_lognorm": torch.from_numpy(np.array(self.arrays["lognorm"][r0:r1])),
        }
        if "hidden" in self.arrays:
            h0, h1 = self._span(m, "hidden_rows")
            out["teacher_hidden"] = torch.from_numpy(np.array(self.arrays["hidden"][h0:h1]))
        return out
