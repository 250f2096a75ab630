"""Philox4x32-10 counter-based random numbers in plain torch integer ops.

Philox is from Salmon, Moraes, Dror and Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3"
(SC'11), as implemented in Random123 and cuRAND (``curand_Philox4x32_10``). It maps a 128-bit
counter ``(c0, c1, c2, c3)`` and a 64-bit key ``(k0, k1)`` to four uniform 32-bit words. Each of the
10 rounds does, with ``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57`` and ``mulhilo`` the high and low
32-bit halves of the 64-bit product::

    hi0, lo0 = mulhilo(M0, c0)
    hi1, lo1 = mulhilo(M1, c2)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0

and between rounds the key is bumped: ``k0 += 0x9E3779B9``, ``k1 += 0xBB67AE85`` (mod 2**32).

Values are uint32 held in int64 tensors. The 32x32-bit products would overflow int64, so the
non-constant factor is split into 16-bit halves (every partial product stays below 2**49); no
result depends on signed overflow. A CUDA kernel computes the same words with ``__umulhi`` or
cuRAND's Philox and reproduces these numbers bit for bit.
"""

from torch import Tensor

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK16 = 0xFFFF
_MASK32 = 0xFFFFFFFF


def _mulhilo(m: int, a: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of ``m * a`` for a constant ``m < 2**32`` and ``a`` in [0, 2**32)."""
    p_hi = (a >> 16) * m  # < 2**48
    t = (a & _MASK16) * m + ((p_hi & _MASK16) << 16)  # low 48 bits of the product plus a carry
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, key: int) -> tuple[Tensor, ...]:
    """Philox4x32-10 of counters ``(c0, c1, c2, c3)`` under the 64-bit ``key``.

    The counters are int64 tensors (or broadcastable to one another) holding values in
    [0, 2**32); ``key`` is a Python int in [0, 2**64), split as ``k0 = key & 0xFFFFFFFF``,
    ``k1 = key >> 32``. Returns the four output words as int64 tensors of the broadcast shape.
    """
    k0 = key & _MASK32
    k1 = (key >> 32) & _MASK32
    for r in range(PHILOX_ROUNDS):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    """Threshold for keeping with probability ``1 - p``: keep a uint32 word ``r`` when ``r < threshold``.

    ``threshold = floor((1 - p) * 2**32)`` in IEEE double (C: ``(uint64_t)((1.0 - p) * 4294967296.0)``),
    so ``p = 0`` keeps everything (threshold ``2**32``).
    """
    return int((1.0 - p) * 4294967296.0)
