"""The fine-tuning run's pieces that need no model: the task of each kind, its config's rules,
padding, and the epoch/rank/micro-batch order of the training rows (``lub_fast.tasks.run``)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lub_fast.config_cli import ConfigError, apply_overrides
from lub_fast.tasks.classification import ClassificationTask, RegressionTask
from lub_fast.tasks.cmrc2018 import SpanTask
from lub_fast.tasks.ner import NerTask
from lub_fast.tasks.run import (
    FinetuneData,
    collate,
    default_config,
    load_run_config,
    make_batches,
    make_task,
)

OLD_CONFIG = Path(__file__).parent / "fixtures" / "finetune_093b1bc_config.json"


def _with(task, **data):
    config = default_config(task)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **data))


def test_run_make_task_gives_each_kind_its_task_and_options():
    config = default_config("cmrc2018")
    config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, doc_stride=50, n_best=7))
    assert make_task(config) == SpanTask(512, 50, 64, 7, 30)
    assert make_task(_with("ner", scheme="bmes", skip_bad=True)) == NerTask(256, 128, "bmes", True)
    generic = make_task(_with("classification", text_fields=("body",), label_field="tag"))
    assert generic == ClassificationTask("classification", 128, ("body",), "tag")
    assert type(generic) is ClassificationTask
    assert type(make_task(default_config("stsb"))) is RegressionTask
    csl = make_task(default_config("csl"))
    assert csl == ClassificationTask("csl", 256) and type(csl) is ClassificationTask


@pytest.mark.parametrize(
    "task, data, message",
    [
        ("cmrc2018", {"labels": "labels.txt"}, "cmrc2018 takes no label set (--data.labels)"),
        ("afqmc", {"text_fields": ("a",)}, "--data.text_fields and --data.label_field are for the generic"),
        ("tnews", {"label_field": "tag"}, "--data.text_fields and --data.label_field are for the generic"),
        ("afqmc", {"scheme": "bio"}, "--data.scheme is for the 'ner' task"),
    ],
)
def test_run_config_refuses_options_of_another_task(task, data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _with(task, **data)


def test_run_data_section_takes_typed_overrides():
    config = apply_overrides(default_config("ner"), ["data.scheme=bmes", "data.skip_bad=yes", "data.test=none"])
    assert (config.data.scheme, config.data.skip_bad, config.data.test) == ("bmes", True, None)
    text = apply_overrides(default_config("classification"), ["data.text_fields=title,body"])
    assert text.data.text_fields == ("title", "body")
    with pytest.raises(ConfigError, match=r"data.scheme: 'bi' is not one of"):
        apply_overrides(default_config("ner"), ["data.scheme=bi"])


def test_run_config_of_the_old_layout_loads_with_its_files_under_data(capsys):
    """A config.json of before the files moved to data (fixtures/README.md) loads as the config that
    the new spelling of its command line gives, and says so in one line."""
    config = load_run_config(OLD_CONFIG)
    data = FinetuneData(train="train.tsv", dev="dev.tsv", text_fields=("text_a",), label_field="label")
    assert config.data == data, config.data
    saved = json.loads(OLD_CONFIG.read_text())
    assert (config.task, config.model, config.output) == ("classification", "model", "parts"), config
    assert (config.finetune.epochs, config.finetune.max_seq_len, config.train.lr) == (2, 32, 1e-3), config
    assert config.train.total_steps == saved["train"]["total_steps"] == 12, config.train
    note = capsys.readouterr().err.splitlines()
    assert len(note) == 1 and note[0].startswith(f"{OLD_CONFIG}: ") and "train_file as data.train" in note[0], note


def test_run_config_with_old_and_new_file_keys_is_refused(tmp_path):
    saved = json.loads(OLD_CONFIG.read_text())
    saved["data"] = {"train": "other.tsv"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=rf"^{path}: both data and the old top-level train_file, "):
        load_run_config(path)


def test_run_collate_pads_ids_with_0_and_labels_with_ignore():
    rows = [
        {"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "labels": [-100, 1, -100]},
        {"input_ids": [2, 3], "token_type_ids": [0, 0], "labels": [-100, -100]},
    ]
    batch = collate(rows)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 1, -100], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    scores = collate([{"input_ids": [2], "labels": 0.5}, {"input_ids": [2, 4], "labels": 2.0}])
    assert scores["labels"].dtype == torch.float32 and scores["labels"].tolist() == [0.5, 2.0]
    spans = collate([{"input_ids": [2, 4], "start_positions": 1, "end_positions": 1}], with_labels=False)
    assert set(spans) == {"input_ids", "attention_mask"}


def test_run_batches_visit_every_row_once_per_epoch_split_over_ranks_and_accumulation():
    rows = [{"input_ids": [i]} for i in range(10)]
    batches, steps_per_epoch = make_batches(rows, batch_size=4, grad_accum_steps=2, seed=1)
    assert steps_per_epoch == 3
    micro = 2 * steps_per_epoch  # micro-batches per rank per epoch
    streams = {rank: [next(s)["input_ids"][:, 0].tolist() for _ in range(2 * micro)] for rank, s in
               ((r, batches(0, r, 2)) for r in range(2))}  # fmt: skip
    for epoch in range(2):
        seen = [i for rank in (0, 1) for b in streams[rank][epoch * micro : (epoch + 1) * micro] for i in b]
        # 4 slots (2 ranks x 2 accumulation steps) of 1 row each: the last step's 2 rows are topped up
        # with the epoch's first 2 rows, so 12 rows in all, every one of the 10 at least once
        assert len(seen) == 12 and sorted(set(seen)) == list(range(10)), seen
    step_0, step_3 = ([streams[r][e * micro + j] for r in (0, 1) for j in range(2)] for e in (0, 1))
    assert step_0 != step_3, "each epoch has its own order"
    for start in (3, 7):  # resuming at a micro-batch gives what the stream from 0 gave there
        assert next(batches(start, 1, 2))["input_ids"][:, 0].tolist() == streams[1][start]
    with pytest.raises(ValueError, match="not a multiple of world size 3"):
        next(batches(0, 0, 3))
