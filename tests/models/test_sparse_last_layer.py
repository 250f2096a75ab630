"""The sparse last layer: with ``masked_positions`` the encoder's last layer runs at those positions
(and the first tokens, for the pooler) only. Its outputs and gradients must equal the full run's."""

import pytest
import torch

from lub_fast.models import MaskedLM, PreTraining
from lub_fast.models.config import FAMILIES

from test_encoder import TOL, tiny


def _batch(seed=0):
    """Right, left and no padding, an empty row, positions unsorted and spread over the rows."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq = 5, 12
    mask = torch.zeros(batch, seq, dtype=torch.long)
    mask[0, :12] = 1
    mask[1, :7] = 1
    mask[2, 4:] = 1  # left padding: position 0 of this row is padding
    mask[4, :1] = 1  # a single token; row 3 stays empty
    ids = torch.randint(5, 99, (batch, seq), generator=gen) * mask
    real = mask.view(-1).nonzero().squeeze(1)
    positions = real[torch.randperm(real.numel(), generator=gen)[:9]]
    return ids, mask, positions


def _zero_dropout(config):
    import dataclasses

    return dataclasses.replace(config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_last_layer_equals_full_outputs_and_gradients(family):
    torch.manual_seed(0)
    model = MaskedLM(_zero_dropout(tiny(family))).train()
    ids, mask, positions = _batch()
    outs, grads = [], []
    for sparse in (False, True):
        model.zero_grad()
        out = model(ids, mask, masked_positions=positions, sparse_last_layer=sparse)
        (out.logits.square().mean() + out.encoder.at(positions).sum()).backward()
        outs.append((out.logits.detach(), out.encoder.at(positions).detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (full_logits, full_hidden), (sparse_logits, sparse_hidden) = outs
    assert full_logits.shape == sparse_logits.shape == (9, 99)
    torch.testing.assert_close(sparse_logits, full_logits, **TOL)
    torch.testing.assert_close(sparse_hidden, full_hidden, **TOL)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_last_layer_attention_dropout_equals_full(family):
    """Training with attention dropout: the sparse last layer runs the full layer's counter-based
    masks at its rows (same seed from torch's generator, offset 0, each query's position as its
    dropout row), so outputs and gradients equal the full run's there."""
    import dataclasses

    config = dataclasses.replace(tiny(family), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    torch.manual_seed(0)
    model = MaskedLM(config).train()
    ids, mask, positions = _batch(4)
    outs, grads = [], []
    for sparse in (False, True):
        model.zero_grad()
        torch.manual_seed(7)
        out = model(ids, mask, masked_positions=positions, sparse_last_layer=sparse)
        (out.logits.square().mean() + out.encoder.at(positions).sum()).backward()
        outs.append(out.encoder.at(positions).detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL, msg=name)
    with torch.no_grad():  # the masks matter: without dropout the states differ
        plain = model.eval()(ids, mask, masked_positions=positions, sparse_last_layer=True).encoder.at(positions)
    assert (plain - outs[1]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_sparse_last_layer_keeps_the_pooler(family):
    torch.manual_seed(0)
    model = PreTraining(tiny(family)).eval()
    ids, mask, positions = _batch(1)
    full = model(ids, mask, masked_positions=positions)
    sparse = model(ids, mask, masked_positions=positions, sparse_last_layer=True)
    torch.testing.assert_close(sparse.logits, full.logits, **TOL)
    torch.testing.assert_close(sparse.pooler_output, full.pooler_output, **TOL)
    pair = "sop_logits" if family == "albert" else "seq_relationship_logits"
    torch.testing.assert_close(getattr(sparse, pair), getattr(full, pair), **TOL)
    assert sparse.encoder.hidden.shape == (9, 32)


def test_sparse_last_layer_limits_and_edge_cases():
    torch.manual_seed(0)
    model = MaskedLM(tiny("bert")).train()
    ids, mask, positions = _batch(2)
    out = model(ids, mask, masked_positions=positions, sparse_last_layer=True)
    with pytest.raises(ValueError, match="output_positions only"):
        out.encoder.last_hidden_state
    with pytest.raises(ValueError, match="other output_positions"):
        out.encoder.at(positions[:3])
    none = model(ids, mask, masked_positions=positions[:0], sparse_last_layer=True)
    assert none.logits.shape == (0, 99)
    # Training with dropout: finite, and reproducible from torch's RNG like the full encoder.
    torch.manual_seed(5)
    a = model(ids, mask, masked_positions=positions, sparse_last_layer=True).logits
    a.sum().backward()
    grads_a = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(5)
    b = model(ids, mask, masked_positions=positions, sparse_last_layer=True).logits
    b.sum().backward()
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert all(torch.equal(grads_a[n], p.grad) for n, p in model.named_parameters() if n in grads_a), "gradients differ"


def test_training_objectives_use_the_sparse_last_layer(monkeypatch):
    from lub_fast.models.encoder import Encoder
    from lub_fast.objectives.mlm import MaskedLMObjective

    calls = []
    original = Encoder._forward_sparse_last
    monkeypatch.setattr(Encoder, "_forward_sparse_last", lambda self, *a: calls.append(1) or original(self, *a))
    ids, mask, positions = _batch(3)
    labels = ids.view(-1)[positions]
    batch = {"input_ids": ids, "attention_mask": mask, "masked_positions": positions, "masked_labels": labels}
    torch.manual_seed(0)
    loss, _ = MaskedLMObjective(MaskedLM(tiny("bert"))).train()(batch)
    loss.backward()
    assert calls == [1]
    assert MaskedLM(tiny("bert"))(ids, mask, masked_positions=positions).encoder.last_hidden_state.shape == (5, 12, 32)
