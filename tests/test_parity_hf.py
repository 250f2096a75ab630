"""The HF loop of ``benchmarks/quality/parity_hf.py`` (issue 18, 1) and lub_fast's training loop are
one algorithm: given the same masked batches, three optimizer steps of ``lub_fast.train`` (with the
benchmark's training config) and of the benchmark's plain HF loop leave the same weights. So the
benchmark's held-out differences come from the masking and the code paths, not from a different
optimizer, schedule, weight decay split or loss normalization."""

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import lub_fast
from lub_fast.data.collator import MaskingCollator, MaskingConfig
from lub_fast.models.hf import lub_to_hf
from lub_fast.objectives import MaskedLMObjective
from lub_fast.train import train

REPO = Path(__file__).resolve().parents[1]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"t{i}" for i in range(95)]


@pytest.fixture(scope="module")
def parity():
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    spec = importlib.util.spec_from_file_location("parity_hf", REPO / "benchmarks" / "quality" / "parity_hf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["parity_hf"] = module
    spec.loader.exec_module(module)
    if tqdm_disable is None:  # the script turns tqdm off for its own runs
        os.environ.pop("TQDM_DISABLE", None)
    yield module
    del sys.modules["parity_hf"]


def _batches(n_batches, batch_size, max_len):
    collator = MaskingCollator(MaskingConfig(
        vocab_size=len(VOCAB), cls_token_id=2, sep_token_id=3, pad_token_id=0, mask_token_id=4, unk_token_id=1,
        mode="token", rate=0.15, seed=5, max_seq_len=max_len))
    generator = torch.Generator().manual_seed(0)
    out = []
    for b in range(n_batches):
        examples = []
        for j in range(batch_size):
            n = int(torch.randint(8, max_len - 1, (1,), generator=generator))
            ids = [2, *torch.randint(5, len(VOCAB), (n,), generator=generator).tolist(), 3]
            examples.append({"input_ids": ids, "word_start": [True] * len(ids), "index": b * batch_size + j})
        out.append(collator(examples))
    return out


def test_parity_hf_loop_matches_lub_fast_train_weights(parity, tmp_path):
    setup = dataclasses.replace(parity.Setup(), steps=3, warmup_steps=1, hidden=32, heads=2, intermediate=64,
                                max_seq_len=32, lr=1e-3, max_grad_norm=0.5)
    tokenizer = parity.BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)})
    init_dir = tmp_path / "init"
    parity.init_model(init_dir, tokenizer, setup, seed=0)
    batches = _batches(setup.steps, 4, setup.max_seq_len)
    assert all(int((b["labels"] != -100).sum()) > 0 for b in batches), "a batch without masked tokens"

    cfg = parity.lub_fast_config(init_dir, tmp_path / "run", tmp_path / "unused", setup, seed=0)
    objective = MaskedLMObjective(lub_fast.from_pretrained(init_dir))
    train(objective, lambda start, rank, world: iter(batches[start:]), cfg.train, tmp_path / "run")

    hf = parity.BertForMaskedLM.from_pretrained(init_dir)
    hf.train()
    optimizer, scheduler = parity.hf_optimizer(hf, setup)
    for b in batches:
        parity.hf_step(hf, optimizer, scheduler, {k: b[k] for k in ("input_ids", "attention_mask", "labels")},
                       setup.max_grad_norm)

    ours = lub_to_hf(objective.model.state_dict(), objective.model.config, "masked_lm")
    theirs = hf.state_dict()
    initial = parity.BertForMaskedLM.from_pretrained(init_dir).state_dict()
    # one Adam step moves a weight by about lr = 1e-3; 1e-6 is 0.1% of it (weight decay on a
    # LayerNorm weight alone would move it by lr * 0.01 = 1e-5)
    diffs = {k: float((v - theirs[k]).abs().max()) for k, v in ours.items()}
    moved = {k: float((theirs[k] - initial[k]).abs().max()) for k in ours}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-6, f"{worst}: lub_fast and HF weights differ by {diffs[worst]:.3g} after 3 steps " \
        f"(moved {moved[worst]:.3g}); all > 1e-7: {sorted(k for k, d in diffs.items() if d > 1e-7)}"
    # a key bias adds the same score to every key of a query: softmax cancels it, its gradient is 0
    trained = {k: m for k, m in moved.items() if not k.endswith("attention.self.key.bias")}
    least = min(trained, key=trained.get)
    assert trained[least] > 1e-4, f"{least} moved only {trained[least]:.3g} in 3 steps: the comparison is vacuous"
