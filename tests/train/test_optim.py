"""Weight-decay groups, layer-wise learning-rate groups, fused AdamW, LAMB against a hand computation,
and the LR schedules."""

import math

import pytest
import torch
from torch import nn

from lub_fast.models import EncoderConfig, SequenceClassification
from lub_fast.optim import Lamb, build_optimizer, build_scheduler, layerwise_param_groups, lr_factor, param_groups


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 10)
        self.decoder.weight = self.embed.weight
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_optim_param_groups_no_decay_on_bias_and_layernorm():
    model = Tied()
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    assert ids(decay["params"]) == ids([model.embed.weight, model.proj.weight]), len(decay["params"])
    expected = [model.norm.weight, model.norm.bias, model.proj.bias, model.decoder.bias]
    assert ids(no_decay["params"]) == ids(expected), len(no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == 6  # tied weight once, frozen excluded


def test_optim_adamw_fused_on_cpu():
    optimizer = build_optimizer(Tied(), "adamw", lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["fused"] for g in optimizer.param_groups), [g["fused"] for g in optimizer.param_groups]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert isinstance(build_optimizer(Tied(), "lamb", 1e-3, 0.01, (0.9, 0.999), 1e-6), Lamb)
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'lamb', got 'sgd'"):
        build_optimizer(Tied(), "sgd", 1e-3, 0.01, (0.9, 0.999), 1e-6)


def _lamb_by_hand(w, grads, lr, b1, b2, eps, wd):
    """LAMB on a list of floats, float64 Python arithmetic (You et al. 2019, Algorithm 2)."""
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        u = [(mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps) + wd * wi for mi, vi, wi in zip(m, v, w)]
        ratio = 1.0
        if wd != 0:
            w_norm = math.sqrt(sum(x * x for x in w))
            u_norm = math.sqrt(sum(x * x for x in u))
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        w = [wi - lr * ratio * ui for wi, ui in zip(w, u)]
    return w


@pytest.mark.parametrize("wd", [0.01, 0.0])
def test_optim_lamb_matches_hand_computation(wd):
    w0 = [1.0, -2.0, 3.0, 0.5, -0.25, 4.0]
    grads = [[0.1, 0.2, -0.3, 0.4, -0.05, 0.01], [-0.2, 0.1, 0.3, -0.1, 0.02, 0.5]]
    lr, betas, eps = 0.1, (0.9, 0.999), 1e-6
    param = nn.Parameter(torch.tensor(w0, dtype=torch.float64).reshape(2, 3))
    optimizer = Lamb([param], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for step, g in enumerate(grads, start=1):
        param.grad = torch.tensor(g, dtype=torch.float64).reshape(2, 3)
        optimizer.step()
        expected = torch.tensor(_lamb_by_hand(w0, grads[:step], lr, *betas, eps, wd), dtype=torch.float64)
        torch.testing.assert_close(param.detach().flatten(), expected, rtol=1e-12, atol=1e-12)
    # one step moves each weight by lr * ratio * ~1 (Adam's first step is ~sign(g)), so the hand
    # computation is not trivially close to w0
    assert (param.detach().flatten() - torch.tensor(w0, dtype=torch.float64)).abs().max() > 0.05


def test_optim_lamb_zero_weight_uses_unit_ratio():
    param = nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([1.0, -1.0, 2.0])
    Lamb([param], lr=0.5, weight_decay=0.01).step()
    torch.testing.assert_close(param.detach(), torch.tensor([-0.5, 0.5, -0.5]), rtol=1e-5, atol=1e-6)


def test_optim_schedule_values():
    # warmup 4, total 14: warmup (s+1)/5, then 10 decay steps
    assert [lr_factor(s, 4, 14, "linear") for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_factor(4, 4, 14, "linear") == 1.0
    assert lr_factor(9, 4, 14, "linear") == pytest.approx(0.5)
    assert lr_factor(14, 4, 14, "linear") == 0.0
    assert lr_factor(20, 4, 14, "linear") == 0.0
    assert lr_factor(9, 4, 14, "linear", min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(4, 4, 14, "cosine") == 1.0
    assert lr_factor(9, 4, 14, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, 4, 14, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(14, 4, 14, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(13, 4, 14, "constant") == 1.0
    assert lr_factor(0, 0, 10, "linear") == 1.0


def test_optim_scheduler_drives_optimizer_lr():
    param = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param], lr=2e-3)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=6, schedule="cosine", min_lr_ratio=0.0)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    expected = [2e-3 * lr_factor(s, 2, 6, "cosine") for s in range(7)]
    assert seen == pytest.approx(expected, abs=1e-12), (seen, expected)
    with pytest.raises(ValueError, match="schedule must be"):
        build_scheduler(optimizer, 2, 6, "step")


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_optim_layerwise_lr_groups(family):
    config = EncoderConfig(family=family, vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=32, num_hidden_groups=2 if family == "albert" else None)  # fmt: skip
    model = SequenceClassification(config, num_labels=3)
    groups = layerwise_param_groups(model, lr=1e-3, weight_decay=0.01, layer_decay=0.5)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()), "every parameter in exactly one group"
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["encoder.embeddings.word.weight"])] == pytest.approx(1e-3 * 0.5**5)
    assert lr_of[id(named["classifier.out.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["encoder.pooler.weight"])] == pytest.approx(1e-3)
    # bert: layer k at depth k + 1; albert with 2 groups over 4 layers: unique layer k runs last at 2k + 2
    depth = [1, 2, 3, 4] if family == "bert" else [2, 4]
    for k, d in enumerate(depth):
        assert lr_of[id(named[f"encoder.layers.{k}.qkv.weight"])] == pytest.approx(1e-3 * 0.5 ** (5 - d)), k
    assert decay_of[id(named["encoder.layers.0.qkv.bias"])] == 0.0
    assert decay_of[id(named["encoder.layers.0.attn_norm.weight"])] == 0.0
    assert decay_of[id(named["encoder.layers.0.qkv.weight"])] == 0.01
