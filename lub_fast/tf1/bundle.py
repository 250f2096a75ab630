"""Reader and writer of TensorFlow's tensor-bundle checkpoint format (V2), without TensorFlow.

A checkpoint with prefix ``P`` is ``P.index`` plus data files ``P.data-00000-of-0000N``. The index
is a LevelDB-format table (``lub_fast.tf1.table``). Its key ``""`` holds a ``BundleHeaderProto``
(num_shards, endianness, version); every other key is a tensor name whose value is a
``BundleEntryProto`` (dtype, shape, shard_id, offset, size, masked CRC32C of the tensor bytes),
see ``tensorflow/core/protobuf/tensor_bundle.proto`` and
``tensorflow/core/util/tensor_bundle/tensor_bundle.cc``. Both protobufs are decoded and encoded
here by hand (proto3 wire format, fields in number order, defaults omitted, as TensorFlow
serializes them), so a bundle written here is byte-identical to TensorFlow's for the same tensors
written in name order.

Tensors come back as NumPy arrays. bfloat16 has no NumPy type: it is returned as an array of the
structured dtype ``BFLOAT16`` (one little-endian uint16 field per element; ``a.view(np.uint16)``
gives the bits) and accepted in that form by ``write_bundle``. String tensors come back as object
arrays of ``bytes``. Partitioned variables (entries with ``slices``) are listed with
``sliced=True`` and refuse to be read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from lub_fast.errors import UsageError
from lub_fast.tf1.crc import crc32c, mask_crc, unmask_crc
from lub_fast.tf1.table import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_RESTART_INTERVAL,
    build_table,
    get_varint,
    put_varint,
    read_table,
)

BFLOAT16 = np.dtype([("bfloat16", "<u2")])

# DataType enum (tensorflow/core/framework/types.proto) -> NumPy dtype; 7 is DT_STRING.
_TF_TO_NUMPY = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    5: np.dtype("<i2"),
    6: np.dtype("i1"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
    14: BFLOAT16,
    17: np.dtype("<u2"),
    19: np.dtype("<f2"),
    22: np.dtype("<u4"),
    23: np.dtype("<u8"),
}
DT_STRING = 7
_NUMPY_TO_TF = {dtype: code for code, dtype in _TF_TO_NUMPY.items()}
TF_DTYPE_NAMES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
    9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16", 22: "uint32",
    23: "uint64",
}


class TF1CheckpointError(UsageError):
    """A TensorFlow checkpoint is missing, truncated, corrupt or of an unsupported kind."""


# --------------------------------------------------------------------------------------------
# Varints and the protobuf wire format


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of a serialized message; bytes for length-delimited."""
    out = []
    pos, limit = 0, len(buf)
    while pos < limit:
        key, pos = get_varint(buf, pos, limit)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = get_varint(buf, pos, limit)
        elif wire == 1:
            if pos + 8 > limit:
                raise ValueError("truncated fixed64 field")
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = get_varint(buf, pos, limit)
            if pos + length > limit:
                raise ValueError("truncated length-delimited field")
            value, pos = bytes(buf[pos : pos + length]), pos + length
        elif wire == 5:
            if pos + 4 > limit:
                raise ValueError("truncated fixed32 field")
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire} for field {number}")
        out.append((number, wire, value))
    return out


def _put_field_varint(out: bytearray, number: int, value: int) -> None:
    if value:
        put_varint(out, number << 3)
        put_varint(out, value)


def _put_field_bytes(out: bytearray, number: int, value: bytes) -> None:
    put_varint(out, number << 3 | 2)
    put_varint(out, len(value))
    out += value


# --------------------------------------------------------------------------------------------
# Bundle protobufs


@dataclass(frozen=True)
class BundleEntry:
    """One tensor of a bundle, as its ``BundleEntryProto`` describes it."""

    name: str
    dtype: str  # "float32", "bfloat16", "string", ... (TF_DTYPE_NAMES), or "dtype<N>" if unknown
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    masked_crc32c: int
    sliced: bool  # a partitioned variable: data lives in slice entries, not supported here

    @property
    def dtype_code(self) -> int:
        for code, name in TF_DTYPE_NAMES.items():
            if name == self.dtype:
                return code
        return int(self.dtype.removeprefix("dtype"))


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for number, wire, value in _fields(buf):
        if number == 2 and wire == 2:
            size = 0
            for dnum, dwire, dvalue in _fields(value):
                if dnum == 1 and dwire == 0:
                    size = _signed64(dvalue)
            dims.append(size)
        elif number == 3 and wire == 0 and value:
            raise ValueError("shape of unknown rank")
    if any(d < 0 for d in dims):
        raise ValueError(f"shape with unknown dimensions {dims}")
    return tuple(dims)


def _parse_entry(name: str, buf: bytes) -> BundleEntry:
    dtype, shape, shard, offset, size, crc, sliced = 0, (), 0, 0, 0, 0, False
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 2 and wire == 2:
            shape = _parse_shape(value)
        elif number == 3 and wire == 0:
            shard = value
        elif number == 4 and wire == 0:
            offset = _signed64(value)
        elif number == 5 and wire == 0:
            size = _signed64(value)
        elif number == 6 and wire == 5:
            crc = value
        elif number == 7 and wire == 2:
            sliced = True
    dtype_name = TF_DTYPE_NAMES.get(dtype, f"dtype{dtype}")
    return BundleEntry(name, dtype_name, shape, shard, offset, size, crc, sliced)


def _encode_entry(dtype: int, shape: tuple[int, ...], shard: int, offset: int, size: int,
                  crc: int) -> bytes:
    shape_msg = bytearray()
    for dim in shape:
        dim_msg = bytearray()
        _put_field_varint(dim_msg, 1, dim)
        _put_field_bytes(shape_msg, 2, bytes(dim_msg))
    out = bytearray()
    _put_field_varint(out, 1, dtype)
    _put_field_bytes(out, 2, bytes(shape_msg))
    _put_field_varint(out, 3, shard)
    _put_field_varint(out, 4, offset)
    _put_field_varint(out, 5, size)
    if crc:
        put_varint(out, 6 << 3 | 5)
        out += crc.to_bytes(4, "little")
    return bytes(out)


def _encode_header(num_shards: int) -> bytes:
    version = bytearray()
    _put_field_varint(version, 1, 1)  # producer = kTensorBundleVersion; min_consumer 0 omitted
    out = bytearray()
    _put_field_varint(out, 1, num_shards)  # endianness LITTLE = 0 is the default: omitted
    _put_field_bytes(out, 3, bytes(version))
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Bundles


def index_path(prefix: str) -> str:
    return f"{prefix}.index"


def data_path(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


class BundleReader:
    """Reads the tensors of the bundle at ``prefix`` (``prefix.index`` + data files).

    ``entries`` maps tensor names (sorted) to ``BundleEntry``. ``read(name)`` returns a NumPy
    array of the stored shape, after checking the entry's size against its dtype and shape, the
    data file's length and (when ``verify=True``) the CRC32C. Every failure raises
    ``TF1CheckpointError`` naming the file and the tensor."""

    def __init__(self, prefix: str, verify: bool = True):
        self.prefix = os.fspath(prefix)
        self.verify = verify
        self.index_file = index_path(self.prefix)
        try:
            with open(self.index_file, "rb") as f:
                table = read_table(f.read())
        except FileNotFoundError:
            raise TF1CheckpointError(f"{self.index_file}: index file not found") from None
        except ValueError as e:
            raise TF1CheckpointError(f"{self.index_file}: {e}") from None
        if not table or table[0][0] != b"":
            raise TF1CheckpointError(f"{self.index_file}: no header entry (key \"\")")
        try:
            header = {number: value for number, _, value in _fields(table[0][1])}
            version = {number: value for number, _, value in _fields(header.get(3, b""))}
        except ValueError as e:
            raise TF1CheckpointError(f"{self.index_file}: corrupt header: {e}") from None
        self.num_shards = header.get(1, 0)
        if header.get(2, 0) != 0:
            raise TF1CheckpointError(f"{self.index_file}: big-endian bundles are not supported")
        if version.get(2, 0) > 1:
            raise TF1CheckpointError(
                f"{self.index_file}: needs a reader of bundle version >= {version[2]}; "
                "this reader implements version 1"
            )
        self.entries: dict[str, BundleEntry] = {}
        for key, value in table[1:]:
            if key.startswith(b"\x00"):
                continue  # slice entries of partitioned variables, named by OrderedCode
            name = key.decode("utf-8", errors="replace")
            try:
                entry = _parse_entry(name, value)
            except ValueError as e:
                raise TF1CheckpointError(
                    f"{self.index_file}: tensor {name!r}: corrupt entry: {e}"
                ) from None
            if not entry.sliced and not 0 <= entry.shard_id < max(self.num_shards, 1):
                raise TF1CheckpointError(
                    f"{self.index_file}: tensor {name!r} is in shard {entry.shard_id} of "
                    f"{self.num_shards} (corrupt index)"
                )
            self.entries[name] = entry

    def data_file(self, entry: BundleEntry) -> str:
        return data_path(self.prefix, entry.shard_id, self.num_shards)

    def _read_bytes(self, entry: BundleEntry, path: str) -> np.ndarray:
        try:
            with open(path, "rb") as f:
                available = os.fstat(f.fileno()).st_size
                if entry.offset < 0 or entry.offset + entry.size > available:
                    raise TF1CheckpointError(
                        f"{path}: tensor {entry.name!r} needs bytes [{entry.offset}, "
                        f"{entry.offset + entry.size}) but the file has {available} (truncated)"
                    )
                buf = np.empty(entry.size, dtype=np.uint8)
                f.seek(entry.offset)
                if f.readinto(memoryview(buf)) != entry.size:
                    raise TF1CheckpointError(f"{path}: short read of tensor {entry.name!r}")
        except FileNotFoundError:
            raise TF1CheckpointError(
                f"{path}: data file of tensor {entry.name!r} not found"
            ) from None
        return buf

    def read(self, name: str) -> np.ndarray:
        entry = self.entries.get(name)
        if entry is None:
            raise TF1CheckpointError(f"{self.index_file}: no tensor named {name!r}")
        if entry.sliced:
            raise TF1CheckpointError(
                f"{self.index_file}: tensor {name!r} is a partitioned variable (slices); "
                "re-save it unpartitioned"
            )
        path = self.data_file(entry)
        count = int(np.prod(entry.shape, dtype=np.int64))
        if entry.dtype == "string":
            return self._read_strings(entry, path, count)
        dtype = _TF_TO_NUMPY.get(entry.dtype_code)
        if dtype is None:
            raise TF1CheckpointError(
                f"{self.index_file}: tensor {name!r} has unsupported dtype {entry.dtype}"
            )
        if entry.size != count * dtype.itemsize:
            raise TF1CheckpointError(
                f"{self.index_file}: tensor {name!r} of shape {list(entry.shape)} and dtype "
                f"{entry.dtype} needs {count * dtype.itemsize} bytes, the entry says {entry.size}"
            )
        buf = self._read_bytes(entry, path)
        if self.verify:
            self._check_crc(entry, path, crc32c(buf))
        return buf.view(dtype).reshape(entry.shape)

    def _check_crc(self, entry: BundleEntry, path: str, actual: int) -> None:
        if mask_crc(actual) != entry.masked_crc32c:
            raise TF1CheckpointError(
                f"{path}: tensor {entry.name!r} has crc32c {actual:#010x}, the index says "
                f"{unmask_crc(entry.masked_crc32c):#010x} (corrupt data file)"
            )

    def _read_strings(self, entry: BundleEntry, path: str, count: int) -> np.ndarray:
        # [varint64 length] * count, [masked crc32c of the lengths as uint32], [bytes] * count
        buf = self._read_bytes(entry, path).tobytes() if entry.size else b""
        out = np.empty(count, dtype=object)
        if count == 0:
            return out.reshape(entry.shape)
        try:
            lengths, pos = [], 0
            for _ in range(count):
                length, pos = get_varint(buf, pos, len(buf))
                lengths.append(length)
        except ValueError:
            raise TF1CheckpointError(
                f"{path}: tensor {entry.name!r}: truncated string lengths") from None
        length_bytes = b"".join(
            n.to_bytes(4 if n <= 0xFFFFFFFF else 8, "little") for n in lengths
        )
        if pos + 4 + sum(lengths) != len(buf):
            raise TF1CheckpointError(
                f"{path}: tensor {entry.name!r}: {len(buf)} bytes do not hold strings of "
                f"lengths {lengths[:8]}..."
            )
        crc = crc32c(length_bytes)
        if self.verify and unmask_crc(int.from_bytes(buf[pos : pos + 4], "little")) != crc:
            raise TF1CheckpointError(f"{path}: tensor {entry.name!r}: string length checksum")
        if self.verify:
            self._check_crc(entry, path, crc32c(buf[pos:], crc))
        pos += 4
        for i, length in enumerate(lengths):
            out[i] = buf[pos : pos + length]
            pos += length
        return out.reshape(entry.shape)


def _serialize(array: np.ndarray) -> tuple[int, memoryview | bytes, int]:
    """(dtype code, bytes to write, unmasked crc32c) for one tensor."""
    if array.dtype == object:
        items = [bytes(x) for x in array.reshape(-1)]
        lengths = bytearray()
        length_bytes = b""
        for item in items:
            put_varint(lengths, len(item))
            length_bytes += len(item).to_bytes(4 if len(item) <= 0xFFFFFFFF else 8, "little")
        crc = crc32c(length_bytes)
        checksum = mask_crc(crc).to_bytes(4, "little")
        strings = b"".join(items)
        crc = crc32c(strings, crc32c(checksum, crc))
        return DT_STRING, bytes(lengths) + checksum + strings, crc
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = _NUMPY_TO_TF.get(dtype)
    if code is None:
        raise TF1CheckpointError(f"dtype {array.dtype} has no TensorFlow checkpoint equivalent")
    array = np.ascontiguousarray(array, dtype=_TF_TO_NUMPY[code])
    data = memoryview(array.reshape(-1).view(np.uint8))
    return code, data, crc32c(data)


def write_bundle(prefix: str, tensors: Mapping[str, np.ndarray], *, num_shards: int = 1,
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 restart_interval: int = DEFAULT_RESTART_INTERVAL) -> list[str]:
    """Write ``tensors`` (name -> NumPy array; ``BFLOAT16`` for bfloat16, object arrays of bytes
    for strings) as the bundle ``prefix``. Tensors go to ``num_shards`` data files in name order,
    each to the least-filled shard. Every file is written under a temporary name and renamed
    into place, the index last. Returns the written paths, index first."""
    names = sorted(tensors)
    if "" in tensors:
        raise TF1CheckpointError("the empty tensor name is reserved for the bundle header")
    if num_shards < 1:
        raise TF1CheckpointError(f"num_shards must be >= 1, got {num_shards}")
    prefix = os.fspath(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    paths = [data_path(prefix, s, num_shards) for s in range(num_shards)]
    files = [open(p + ".tmp", "wb") for p in paths]
    filled = [0] * num_shards
    entries = [(b"", _encode_header(num_shards))]
    try:
        for name in names:
            array = np.asarray(tensors[name])
            code, data, crc = _serialize(array)
            shard = filled.index(min(filled))
            files[shard].write(data)
            entries.append((name.encode("utf-8"), _encode_entry(
                code, tuple(array.shape), shard, filled[shard], len(data), mask_crc(crc))))
            filled[shard] += len(data)
        for f in files:
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files:
            f.close()
    for p in paths:
        os.replace(p + ".tmp", p)
    index = index_path(prefix)
    with open(index + ".tmp", "wb") as f:
        f.write(build_table(entries, block_size, restart_interval))
        f.flush()
        os.fsync(f.fileno())
    os.replace(index + ".tmp", index)
    return [index, *paths]
