"""LevelDB-format tables as TensorFlow writes them for checkpoint indexes (``.index`` files).

Layout (``tensorflow/tsl/lib/io/{table_builder,block_builder,format}.cc``): data blocks of
key/value entries, each key stored as (shared prefix length, suffix) with a full key at every
restart point, the restart offsets and their count as fixed32s at the block's end; every block is
followed by a one-byte compression type (0 none, 1 snappy) and the masked CRC32C of the block
and that byte; then an empty meta-index block, an index block (restart interval 1) mapping a
separator key >= each data block's last key to its handle (offset, size as varint64s), and a
48-byte footer: the meta-index and index handles padded to 40 bytes and the magic number
0xdb4775248b80fb57. Errors are ``ValueError``s; callers add the file name.
"""

from __future__ import annotations

import itertools

from lub_fast.tf1.crc import crc32c, mask_crc, unmask_crc

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two block handles padded to 2 * 20 bytes, then the 8-byte magic number
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
DEFAULT_BLOCK_SIZE = 262144  # tsl table::Options::block_size
DEFAULT_RESTART_INTERVAL = 16  # tsl table::Options::block_restart_interval


def get_varint(buf, pos: int, limit: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``buf[pos:limit]``."""
    result = 0
    shift = 0
    while True:
        if pos >= limit or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def put_varint(out: bytearray, value: int) -> None:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64s are ten-byte two's complement varints
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def parse_block(block: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one uncompressed block."""
    n = len(block)
    if n < 4:
        raise ValueError(f"block of {n} bytes has no restart count")
    num_restarts = int.from_bytes(block[n - 4 :], "little")
    limit = n - 4 * (num_restarts + 1)
    if limit < 0:
        raise ValueError(f"block of {n} bytes cannot hold {num_restarts} restart points")
    entries = []
    key = b""
    pos = 0
    while pos < limit:
        shared, pos = get_varint(block, pos, limit)
        non_shared, pos = get_varint(block, pos, limit)
        value_len, pos = get_varint(block, pos, limit)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise ValueError(f"bad block entry at byte {pos}")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def _decompress_snappy(data: bytes) -> bytes:
    try:
        import cramjam

        return bytes(cramjam.snappy.decompress_raw(data))
    except ImportError:
        pass
    try:
        import snappy

        return snappy.uncompress(data)
    except ImportError:
        raise ValueError(
            "index block is snappy-compressed; install python-snappy or cramjam to read it "
            "(TensorFlow writes uncompressed index blocks by default)"
        ) from None


def _read_block(data: bytes, offset: int, size: int, limit: int) -> bytes:
    if offset + size + BLOCK_TRAILER_SIZE > limit:
        raise ValueError(
            f"block [{offset}, {offset + size + BLOCK_TRAILER_SIZE}) runs past the table's "
            f"{limit} bytes of blocks (truncated or corrupt)"
        )
    kind = data[offset + size]
    stored = unmask_crc(int.from_bytes(data[offset + size + 1 : offset + size + 5], "little"))
    actual = crc32c(data[offset : offset + size + 1])
    if stored != actual:
        raise ValueError(
            f"block at byte {offset} has crc32c {actual:#010x}, the file says {stored:#010x} "
            "(corrupt)"
        )
    contents = data[offset : offset + size]
    if kind == 0:
        return contents
    if kind == 1:
        return _decompress_snappy(contents)
    raise ValueError(f"block at byte {offset} has unknown compression type {kind}")


def read_table(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the table ``data``, in key order; ``ValueError`` when truncated or
    corrupt (each block's checksum is verified, as TensorFlow does)."""
    n = len(data)
    if n < FOOTER_SIZE:
        raise ValueError(f"{n} bytes, shorter than the {FOOTER_SIZE}-byte table footer (truncated)")
    footer = data[n - FOOTER_SIZE :]
    magic = int.from_bytes(footer[40:48], "little")
    if magic != TABLE_MAGIC:
        raise ValueError(
            f"bad table magic number {magic:#018x}, expected {TABLE_MAGIC:#018x} "
            "(not a TensorFlow V2 checkpoint index, or truncated)"
        )
    _, pos = get_varint(footer, 0, 40)  # the meta-index block: nothing in it is needed
    _, pos = get_varint(footer, pos, 40)
    index_offset, pos = get_varint(footer, pos, 40)
    index_size, pos = get_varint(footer, pos, 40)
    entries = []
    for _, handle in parse_block(_read_block(data, index_offset, index_size, n - FOOTER_SIZE)):
        offset, pos = get_varint(handle, 0, len(handle))
        size, _ = get_varint(handle, pos, len(handle))
        entries += parse_block(_read_block(data, offset, size, n - FOOTER_SIZE))
    for (a, _), (b, _) in itertools.pairwise(entries):
        if a >= b:
            raise ValueError(f"keys out of order: {a!r} then {b!r} (corrupt)")
    return entries


class _BlockBuilder:
    """tsl/lib/io/block_builder.cc: prefix-compressed entries, a restart point every
    ``restart_interval`` entries, then the restart offsets and their count as fixed32s."""

    def __init__(self, restart_interval: int):
        self.restart_interval = restart_interval
        self.buffer = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.restart_interval:
            limit = min(len(self.last_key), len(key))
            while shared < limit and self.last_key[shared] == key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.counter = 0
        put_varint(self.buffer, shared)
        put_varint(self.buffer, len(key) - shared)
        put_varint(self.buffer, len(value))
        self.buffer += key[shared:]
        self.buffer += value
        self.last_key = key
        self.counter += 1

    def size_estimate(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        out = bytes(self.buffer) + b"".join(r.to_bytes(4, "little") for r in self.restarts)
        return out + len(self.restarts).to_bytes(4, "little")


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def build_table(entries: list[tuple[bytes, bytes]], block_size: int,
                 restart_interval: int) -> bytes:
    """tsl/lib/io/table_builder.cc without compression: the same bytes TensorFlow writes."""
    out = bytearray()

    def write_block(block: _BlockBuilder) -> bytes:
        contents = block.finish()
        handle = bytearray()
        put_varint(handle, len(out))
        put_varint(handle, len(contents))
        crc = crc32c(b"\x00", crc32c(contents))
        out.extend(contents + b"\x00" + mask_crc(crc).to_bytes(4, "little"))
        return bytes(handle)

    index = _BlockBuilder(1)
    data = _BlockBuilder(restart_interval)
    pending = None
    last_key = b""
    for key, value in entries:
        if len(key) + len(value) >= 2 * block_size and data.buffer:
            pending = write_block(data)
            data = _BlockBuilder(restart_interval)
        if pending is not None:
            index.add(_shortest_separator(last_key, key), pending)
            pending = None
        last_key = key
        data.add(key, value)
        if data.size_estimate() >= block_size:
            pending = write_block(data)
            data = _BlockBuilder(restart_interval)
    if data.buffer:
        pending = write_block(data)
    meta_handle = write_block(_BlockBuilder(restart_interval))
    if pending is not None:
        index.add(_short_successor(last_key), pending)
    index_handle = write_block(index)
    footer = (meta_handle + index_handle).ljust(FOOTER_SIZE - 8, b"\x00")
    out += footer + TABLE_MAGIC.to_bytes(8, "little")
    return bytes(out)


