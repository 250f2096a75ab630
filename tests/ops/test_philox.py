"""Tests of lub_fast.ops._philox against the Random123 known-answer vectors."""

import torch

from lub_fast.ops._philox import keep_threshold, philox4x32_10

# Random123 tests/kat_vectors, "philox4x32 10" lines: counter[4], key[2] -> output[4].
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def test_philox4x32_10_known_answers():
    counters = [torch.tensor([ctr[w] for ctr, _, _ in KNOWN_ANSWERS]) for w in range(4)]
    for row, (_, key, expected) in enumerate(KNOWN_ANSWERS):
        words = philox4x32_10(*(c[row : row + 1] for c in counters), key[0] | key[1] << 32)
        got = tuple(int(w.item()) for w in words)
        assert got == expected, f"vector {row}: got {list(map(hex, got))}, want {list(map(hex, expected))}"


def test_philox4x32_10_words_are_uniform():
    words = philox4x32_10(torch.arange(1 << 15), torch.tensor(0), torch.tensor(1), torch.tensor(2), 99)
    values = torch.stack(words).double() / 2**32  # 131,072 samples
    assert values.min().item() >= 0.0 and values.max().item() < 1.0
    mean = values.mean().item()
    assert abs(mean - 0.5) < 0.01, f"mean {mean:.4f}"
    # 16 equal bins hold 1/16 each within 0.01
    hist = torch.histc(values, bins=16, min=0.0, max=1.0) / values.numel()
    assert (hist - 1 / 16).abs().max().item() < 0.01, f"bin frequencies {hist.tolist()}"


def test_keep_threshold_bounds():
    assert keep_threshold(0.0) == 2**32
    assert keep_threshold(0.5) == 2**31
    assert keep_threshold(0.1) == int(0.9 * 4294967296.0)
