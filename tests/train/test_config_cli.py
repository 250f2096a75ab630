"""Typed ``--section.field=value`` overrides, ``--config`` reload and JSON round trips."""

import dataclasses
import json
import re
from typing import Literal

import pytest

from lub_fast.config_cli import (
    ConfigError,
    apply_overrides,
    describe,
    from_dict,
    load_config,
    option,
    resolve_config,
    save_config,
    split_overrides,
    to_dict,
)
from lub_fast.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    hidden_size: int = 128
    embedding_size: int | None = None
    act: Literal["gelu", "relu"] = "gelu"
    dropout: float = option(0.1, "dropout probability")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = ModelSection()
    train: TrainConfig = TrainConfig()
    name: str = "run"
    tags: tuple[str, ...] = ()


def test_config_cli_roundtrip_json_equal():
    config = RunConfig(
        model=ModelSection(hidden_size=64, embedding_size=32, act="relu"),
        train=TrainConfig(betas=(0.8, 0.95), precision="bf16", total_steps=7),
        tags=("a", "b"),
    )
    data = json.loads(json.dumps(to_dict(config)))
    assert data["train"]["betas"] == [0.8, 0.95], data["train"]["betas"]
    restored = from_dict(RunConfig, data)
    assert restored == config, (restored, config)
    assert isinstance(restored.train.betas, tuple)


def test_config_cli_overrides_typed_values():
    config = apply_overrides(
        RunConfig(),
        [
            "--model.hidden_size=256",
            "model.embedding_size=none",
            "model.act=relu",
            "model.dropout=0",
            "train.lr=3e-4",
            "train.betas=0.9,0.98",
            "train.find_unused_parameters=true",
            "tags=x,y,z",
            "name=a=b",
        ],
    )
    assert config.model == ModelSection(hidden_size=256, embedding_size=None, act="relu", dropout=0.0)
    assert config.train.lr == 3e-4 and config.train.betas == (0.9, 0.98), config.train
    assert config.train.find_unused_parameters is True
    assert config.tags == ("x", "y", "z") and config.name == "a=b", (config.tags, config.name)
    assert isinstance(config.model.dropout, float)
    config = apply_overrides(config, ["model.embedding_size=64", "train.betas=[0.5, 0.6]"])
    assert config.model.embedding_size == 64 and config.train.betas == (0.5, 0.6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "did you mean lr"),
        ("modle.hidden_size=1", "did you mean model"),
        ("model.hidden_size=1.5", "model.hidden_size: '1.5' is not INT"),
        ("model.act=tanh", "model.act: 'tanh' is not one of"),
        ("train.find_unused_parameters=maybe", "not a boolean"),
        ("train.betas=0.9", "expected 2 comma-separated items"),
        ("model=3", "model is a config section"),
        ("name.x=1", "name.x: name is a STR field, not a section"),
        ("train.total_steps=0", "--train.total_steps: 0 is not allowed (must be >= 1)"),
        ("train.hidden_size", "must look like section.field=value"),
    ],
)
def test_config_cli_bad_override_names_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(RunConfig(), [override])


def test_config_cli_from_dict_rejects_wrong_types_and_unknown_keys():
    with pytest.raises(ConfigError, match="train.total_steps: expected INT"):
        from_dict(RunConfig, {"train": {"total_steps": "10"}})
    with pytest.raises(ConfigError, match="train.total_steps: expected INT"):
        from_dict(RunConfig, {"train": {"total_steps": True}})
    with pytest.raises(ConfigError, match="unknown config field 'train.warmup'"):
        from_dict(RunConfig, {"train": {"warmup": 1}})
    with pytest.raises(ConfigError, match="model.embedding_size"):
        from_dict(RunConfig, {"model": {"embedding_size": "x"}})
    partial = from_dict(RunConfig, {"train": {"lr": 1}})
    assert partial.train.lr == 1.0 and partial.model == ModelSection(), partial


def test_config_cli_resolve_config_file_then_overrides(tmp_path):
    saved = RunConfig(train=TrainConfig(lr=0.25, total_steps=11), name="saved")
    save_config(saved, tmp_path / "run" / "config.json")
    config, rest = resolve_config(
        RunConfig(),
        ["--output", "out", "--config", str(tmp_path / "run" / "config.json"), "--train.lr", "0.5", "-v"],
    )
    assert rest == ["--output", "out", "-v"], rest
    assert config.train.lr == 0.5 and config.train.total_steps == 11 and config.name == "saved", config
    assert load_config(RunConfig, tmp_path / "run" / "config.json") == saved
    with pytest.raises(ConfigError, match="cannot read config"):
        resolve_config(RunConfig(), [f"--config={tmp_path / 'missing.json'}"])


def test_config_cli_split_overrides_forms():
    overrides, rest = split_overrides(["pos", "--a.b=1", "--c.d", "-2", "--flag", "--e.f=x=y"])
    assert overrides == ["a.b=1", "c.d=-2", "e.f=x=y"], overrides
    assert rest == ["pos", "--flag"], rest
    with pytest.raises(ConfigError, match="--a.b needs a value"):
        split_overrides(["--a.b", "--other"])


def test_config_cli_describe_lists_every_field():
    lines = describe(RunConfig())
    n_fields = len(dataclasses.fields(ModelSection)) + len(dataclasses.fields(TrainConfig)) + 2
    assert len(lines) == n_fields, (len(lines), n_fields)
    assert any(line.startswith("--model.dropout=FLOAT (default: 0.1)  dropout probability") for line in lines), lines
    assert any(line.startswith("--train.precision={auto,fp32,bf16,fp16}") for line in lines), lines
    assert any(line.startswith("--model.embedding_size=INT|none") for line in lines), lines


@dataclasses.dataclass(frozen=True)
class _Data:
    data: tuple[str, ...] = ()
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class _Command:
    init_from: str | None = None
    output: str = "out"
    data: _Data = _Data()


def test_config_cli_top_level_fields_and_aliases_are_the_fields_they_name():
    short, rest = resolve_config(_Command(), ["--data", "a,b", "--init-from=x", "--output", "y", "--resume"])
    assert short == _Command(init_from="x", output="y", data=_Data(data=("a", "b"))), short
    assert rest == ["--resume"], rest
    long, rest = resolve_config(_Command(), ["--data.data=a,b", "--init_from", "x", "--output=y"])
    assert long == short and rest == [], (long, rest)
    # an alias of a field the config does not have is left to the command (RunConfig has no data.data)
    _, rest = resolve_config(RunConfig(), ["--data", "a", "--name", "n"])
    assert rest == ["--data", "a"], rest
    with pytest.raises(ConfigError, match="--data needs a value"):
        resolve_config(_Command(), ["--data", "--output", "y"])
    assert any(line.startswith("--init-from=STR|none") for line in describe(_Command())), describe(_Command())
    assert any(line.endswith("(short: --data)") for line in describe(_Command())), describe(_Command())
