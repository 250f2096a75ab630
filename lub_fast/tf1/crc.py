"""CRC32C (Castagnoli, reflected polynomial 0x82F63B78) as TensorFlow's ``crc32c::Extend``.

Uses the ``crc32c`` or ``google_crc32c`` package when one is installed, else NumPy: 16-byte blocks
are folded through eight 64K-entry tables (one per 16-bit unit, the slicing-by-N idea), then the
block CRCs are combined pairwise in a tree with "append 16 * 2^k zero bytes" tables; both kinds
of table follow from the CRC being linear over GF(2) (the zlib ``crc32_combine`` argument).
Measured 500-590 MB/s on the 2-core CI machine (0.7 s for a 400 MB BERT-base checkpoint), against
about 4 GB/s for zlib's CRC-32 and 1.2 GB/s end to end with the ``crc32c`` package.
Test vectors: RFC 3720 appendix B.4.
"""

from __future__ import annotations

import numpy as np


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


_T8 = _byte_table()
_T8_LIST = [int(x) for x in _T8]
_SMALL = 256  # below this many bytes the byte-at-a-time loop is faster than the vector path
_CHUNK_BLOCKS = 1 << 16  # 16-byte blocks per vectorised chunk: 1 MiB, bounds temporaries
_unit_tables: np.ndarray | None = None
_shift_tables: list[tuple[np.ndarray, np.ndarray]] = []


def _zero_bytes(state: np.ndarray, count: int) -> np.ndarray:
    for _ in range(count):
        state = _T8[state & 0xFF] ^ (state >> 8)
    return state


def _tables() -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Unit tables U[k][v]: raw CRC (state 0) of a 16-byte block that is zero except for the
    little-endian 16-bit value v at unit k; shift tables S[l] = (lo, hi): the raw-state map
    "append 16 * 2^l zero bytes" applied to the low and high halves of a 32-bit state."""
    global _unit_tables
    if _unit_tables is None:
        v = np.arange(65536, dtype=np.uint32)
        state = _T8[v & 0xFF]
        state = _T8[(state ^ (v >> 8)) & 0xFF] ^ (state >> 8)
        units = [state]
        for _ in range(7):
            units.append(_zero_bytes(units[-1], 2))
        _unit_tables = np.stack(units[::-1])
        # Appending 16 zero bytes to state s equals xoring s into the first 4 bytes of a zero block.
        _shift_tables.append((_unit_tables[0], _unit_tables[1]))
        while len(_shift_tables) < _CHUNK_BLOCKS.bit_length():
            lo, hi = _shift_tables[-1]
            _shift_tables.append(
                (lo[lo & 0xFFFF] ^ hi[lo >> 16], lo[hi & 0xFFFF] ^ hi[hi >> 16])
            )
    return _unit_tables, _shift_tables


def _update_small(state: int, data) -> int:
    table = _T8_LIST
    for byte in bytes(data):
        state = table[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state


def _update_blocks(state: int, blocks: np.ndarray) -> int:
    """Raw CRC update of ``state`` over ``blocks`` (uint8, length a multiple of 16, > 0)."""
    units, shifts = _tables()
    u = blocks.view("<u2").reshape(-1, 8)
    crc = units[0][u[:, 0]]
    for k in range(1, 8):
        crc ^= units[k][u[:, k]]
    # The running state enters as if xored into the first four bytes of the first block.
    crc[0] ^= units[0][state & 0xFFFF] ^ units[1][state >> 16]
    level = 0
    while crc.shape[0] > 1:
        if crc.shape[0] % 2:
            # A leading zero block leaves a raw CRC from state 0 unchanged.
            crc = np.concatenate([np.zeros(1, np.uint32), crc])
        lo, hi = shifts[level]
        left = crc[0::2]
        crc = lo[left & 0xFFFF] ^ hi[left >> 16] ^ crc[1::2]
        level += 1
    return int(crc[0])


def crc32c_numpy(crc: int, data) -> int:
    """``crc32c`` computed with NumPy whatever is installed (the fallback, and its test)."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    buf = buf.reshape(-1).view(np.uint8)
    state = crc ^ 0xFFFFFFFF
    n = buf.shape[0]
    if n < _SMALL:
        return _update_small(state, buf) ^ 0xFFFFFFFF
    body = n - n % 16
    step = _CHUNK_BLOCKS * 16
    for start in range(0, body, step):
        state = _update_blocks(state, buf[start : min(start + step, body)])
    return _update_small(state, buf[body:]) ^ 0xFFFFFFFF


def _google_crc32c_extend(google_crc32c, crc: int, data) -> int:
    # Its C entry point takes only bytes (no buffer objects): convert in bounded pieces.
    view = memoryview(data).cast("B")
    for start in range(0, len(view), 1 << 23):
        crc = google_crc32c.extend(crc, bytes(view[start : start + (1 << 23)]))
    return crc


def _native_crc32c():
    try:
        import crc32c as _crc32c

        return lambda crc, data: _crc32c.crc32c(memoryview(data).cast("B"), crc)
    except ImportError:
        pass
    try:
        import google_crc32c

        if google_crc32c.implementation == "c":
            return lambda crc, data: _google_crc32c_extend(google_crc32c, crc, data)
    except ImportError:
        pass
    return None


_NATIVE = _native_crc32c()


def crc32c(data, crc: int = 0) -> int:
    """CRC32C of ``data`` (bytes-like or contiguous array), continuing from ``crc``: TensorFlow's
    ``crc32c::Extend(crc, data)``; ``crc32c(b"123456789") == 0xE3069283``."""
    if _NATIVE is not None:
        return _NATIVE(crc, data)
    return crc32c_numpy(crc, data)


def mask_crc(crc: int) -> int:
    """TensorFlow's ``crc32c::Mask``: rotate right by 15 and add a constant."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF
