"""``TrainConfig.precision = "auto"``: bf16 on a CUDA device with bf16 tensor cores, fp32 elsewhere,
resolved once and written to the run's config.json, so that a resume reads back what ran."""

import dataclasses
import warnings
from dataclasses import dataclass, field

import pytest
import torch

from lub_fast.config_cli import load_config
from lub_fast.train import TrainConfig, resolve_precision, train
from train_toy import ToyObjective, make_batches


@dataclass(frozen=True)
class _RunConfig:
    name: str = "toy"
    train: TrainConfig = field(default_factory=TrainConfig)


@pytest.mark.parametrize(
    "precision, device, capability, expected",
    [
        ("auto", "cpu", None, "fp32"),
        ("auto", "cuda:0", (9, 0), "bf16"),
        ("auto", "cuda:1", (8, 0), "bf16"),
        ("auto", "cuda:0", (7, 5), "fp32"),  # no bf16 tensor cores before Ampere
        ("fp16", "cuda:0", (9, 0), "fp16"),
        ("bf16", "cpu", None, "bf16"),
        ("fp32", "cuda:0", (9, 0), "fp32"),
    ],
)
def test_precision_resolve(monkeypatch, precision, device, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    assert resolve_precision(precision, torch.device(device)) == expected
    if precision == "auto" and device.startswith("cuda"):
        assert asked == [torch.device(device)], asked


def test_precision_default_is_auto():
    assert TrainConfig().precision == "auto"


def test_precision_auto_is_written_resolved_and_resumes_without_change(tmp_path):
    config = TrainConfig(total_steps=4, save_every=2, lr=1e-2, log_every=1, device="cpu")
    run_config = _RunConfig(train=config)
    torch.manual_seed(0)
    train(ToyObjective(dropout=0.0), make_batches(4), dataclasses.replace(config, total_steps=2), tmp_path,
          run_config=dataclasses.replace(run_config, train=dataclasses.replace(config, total_steps=2)))
    written = load_config(_RunConfig, tmp_path / "config.json")
    assert written.train.precision == "fp32", written
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        result = train(ToyObjective(dropout=0.0), make_batches(4), config, tmp_path, resume="latest",
                       run_config=run_config)
    changed = [str(w.message) for w in caught if "changed training config" in str(w.message)]
    assert len(changed) == 1 and changed[0].endswith("changed training config: total_steps: 2 -> 4"), changed
    assert result.step == 4, result
    assert load_config(_RunConfig, tmp_path / "config.json").train == dataclasses.replace(config, precision="fp32")
