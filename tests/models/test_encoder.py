"""Encoder properties: presets and validation, padding invariance of the unpadded runtime, ALBERT
sharing, RoBERTa positions, masked-position MLM logits, dropout reproducible from torch's RNG."""

import dataclasses

import pytest
import torch

from lub_fast.models import EncoderConfig, MaskedLM, Unpadded
from lub_fast.models.config import FAMILIES, SIZES

TOL = dict(atol=1e-5, rtol=1e-5)


def tiny(family, **changes):
    fields = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64)  # fmt: skip
    if family == "albert":
        fields.update(embedding_size=16, num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)
    if family == "electra":
        fields.update(embedding_size=16)
    fields.update(changes)
    return EncoderConfig.preset(family, "tiny", **fields)


def padded_batch(lengths, seq, pad=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, 99, (len(lengths), seq), generator=gen).masked_fill(mask == 0, pad)
    return ids, mask


def test_encoder_presets_shapes():
    for family in FAMILIES:
        small = EncoderConfig.preset(family, "small")
        shape = (small.num_hidden_layers, small.hidden_size, small.num_attention_heads, small.intermediate_size)
        assert shape == (4, 256, 4, 1024) and small.vocab_size == 8192, f"{family}: {shape}, {small.vocab_size}"
        for size in SIZES:
            assert EncoderConfig.preset(family, size).family == family
    assert EncoderConfig.preset("roberta", "base").position_offset == 2
    albert = EncoderConfig.preset("albert", "base")
    assert (albert.embedding_size, albert.num_unique_layers, albert.hidden_act) == (128, 1, "gelu_new")
    generator = EncoderConfig.preset("electra", "base").electra_generator()
    assert (generator.hidden_size, generator.embedding_size) == (192, 768)


@pytest.mark.parametrize(
    "changes,rule",
    [
        (dict(family="gpt"), "family must be one of"),
        (dict(hidden_size=30), "multiple of num_attention_heads"),
        (dict(hidden_act="relu"), "hidden_act must be one of"),
        (dict(num_hidden_groups=1), "ALBERT only"),
        (dict(embedding_size=16), "ALBERT/ELECTRA only"),
        (dict(position_offset=2), "position_offset must be 0"),
    ],
)
def test_encoder_config_validation_errors(changes, rule):
    with pytest.raises(ValueError, match=rule):
        dataclasses.replace(tiny("bert"), **changes)


def test_encoder_albert_sharing_schedule():
    config = tiny("albert")
    assert config.layer_schedule() == [0, 1, 0, 1, 2, 3, 2, 3]
    model = MaskedLM(config)
    assert len(model.encoder.layers) == 4
    uneven = tiny("albert", num_hidden_layers=3, num_hidden_groups=2, inner_group_num=1)
    assert uneven.layer_schedule() == [0, 0, 1]  # HF: group int(i / (3 / 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_padding_invariance(family):
    """Each row gives the same states alone and inside a padded batch (nothing leaks across rows)."""
    torch.manual_seed(0)
    config = tiny(family)
    model = MaskedLM(config).eval()
    ids, mask = padded_batch((9, 1, 5, 0), 9, pad=config.pad_token_id)
    with torch.no_grad():
        together = model(ids, mask).last_hidden_state
        for row, length in enumerate((9, 1, 5)):
            alone = model(ids[row : row + 1, :length]).last_hidden_state[0]
            torch.testing.assert_close(together[row, :length], alone, **TOL)
        assert together[3].abs().max() == 0 and together[1, 1:].abs().max() == 0, "padding must stay zero"


def test_encoder_roberta_positions_skip_padding():
    config = tiny("roberta")
    model = MaskedLM(config)
    ids = torch.tensor([[7, 8, 9, 1, 1], [7, 1, 1, 1, 1]])
    assert model.encoder.default_position_ids(ids).tolist() == [[2, 3, 4, 1, 1], [2, 1, 1, 1, 1]]
    bert = MaskedLM(tiny("bert"))
    assert bert.encoder.default_position_ids(ids).tolist() == [[0, 1, 2, 3, 4]] * 2


def test_encoder_unpadded_indexing():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    u = Unpadded.from_mask(mask)
    assert u.indices.tolist() == [0, 1, 6, 7, 8]
    assert u.cu_seqlens.tolist() == [0, 2, 2, 5] and u.cu_seqlens.dtype == torch.int32 and u.max_seqlen == 3
    assert u.rows(torch.tensor([1, 6, 8])).tolist() == [1, 2, 4]
    x = torch.arange(5.0)[:, None]
    assert u.pad(x)[..., 0].tolist() == [[0, 1, 0], [0, 0, 0], [2, 3, 4]]
    assert u.first_tokens(x)[:, 0].tolist() == [0.0, 0.0, 2.0]


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_masked_positions_rows_of_full_logits(family):
    torch.manual_seed(1)
    config = tiny(family)
    model = MaskedLM(config).eval()
    ids, mask = padded_batch((6, 1, 4), 6, pad=config.pad_token_id)
    positions = torch.tensor([0, 3, 5, 6, 12, 15])
    labels = ids.reshape(-1)[positions]
    with torch.no_grad():
        full = model(ids, mask).logits.reshape(-1, 99)
        out = model(ids, mask, labels=labels, masked_positions=positions)
    torch.testing.assert_close(out.logits, full[positions], **TOL)
    expected = torch.nn.functional.cross_entropy(full[positions], labels)
    torch.testing.assert_close(out.loss, expected, **TOL)


def test_encoder_dropout_reproducible_from_rng_state():
    config = tiny("bert", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)
    torch.manual_seed(0)
    model = MaskedLM(config).train()
    ids, mask = padded_batch((9, 5, 1), 9)
    positions = torch.tensor([1, 4, 10])
    labels = ids.reshape(-1)[positions]

    def step():
        model.zero_grad()
        loss = model(ids, mask, labels=labels, masked_positions=positions).loss
        loss.backward()
        return loss.detach(), model.encoder.layers[0].qkv.weight.grad.clone()

    state = torch.get_rng_state()
    loss_a, grad_a = step()
    loss_b, grad_b = step()
    torch.set_rng_state(state)
    loss_c, grad_c = step()
    assert torch.equal(loss_a, loss_c) and torch.equal(grad_a, grad_c), "same RNG state, different result"
    assert not torch.equal(loss_a, loss_b), f"dropout did not change between steps: {loss_a} == {loss_b}"
    with torch.no_grad():
        model.eval()
        first = model(ids, mask, masked_positions=positions).logits
        second = model(ids, mask, masked_positions=positions).logits
    assert torch.equal(first, second)


def test_encoder_unpadded_dummy_rows_are_their_own_sequences():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    u = Unpadded.from_mask(mask, token_multiple=12)
    assert u.dummy_tokens == 7 and u.num_tokens == 5, (u.dummy_tokens, u.num_tokens)
    assert u.attention_cu_seqlens.tolist() == [0, 2, 2, 5, 8, 11, 12] and u.cu_seqlens.tolist() == [0, 2, 2, 5]
    assert u.attention_cu_seqlens.dtype == torch.int32
    assert Unpadded.from_mask(torch.zeros(2, 3), token_multiple=12).dummy_tokens == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_token_multiple_changes_only_rounding(family):
    """Dummy rows (here 17 after 15 real tokens: two sequences of 9 and 8) leave every output and
    gradient as it was, up to float rounding, in the full and in the sparse last layer (without
    dropout: dropout masks are drawn for every row, so the dummy rows shift them)."""
    config = tiny(family, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask = padded_batch((9, 1, 5, 0), 9, pad=config.pad_token_id)
    positions = torch.tensor([0, 4, 8, 9, 18, 22])
    labels = ids.reshape(-1)[positions]
    results = []
    for multiple in (1, 32):
        torch.manual_seed(0)
        model = MaskedLM(config).train()
        model.encoder.token_multiple = multiple
        rows = []
        model.encoder.layers[0].register_forward_hook(lambda module, args, out, rows=rows: rows.append(out.shape[0]))
        logits = model(ids, mask).logits
        out = model(ids, mask, labels=labels, masked_positions=positions)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((rows, logits.detach(), out.logits.detach(), grads))
    (rows_1, logits_1, sparse_1, grads_1), (rows_32, logits_32, sparse_32, grads_32) = results
    assert set(rows_1) == {15} and set(rows_32) == {32} and len(rows_32) >= 2, (rows_1, rows_32)
    torch.testing.assert_close(logits_32, logits_1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse_32, sparse_1, atol=1e-6, rtol=1e-6)
    assert grads_32.keys() == grads_1.keys() and len(grads_1) > 10, sorted(grads_1)
    for name, grad in grads_1.items():
        torch.testing.assert_close(grads_32[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
