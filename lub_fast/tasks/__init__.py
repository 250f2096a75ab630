"""Fine-tuning tasks: data readers, label sets, features, post-processing and metrics.

`TASKS` holds one `TaskSpec` per task name with its kind, the dev metric that picks the best
checkpoint, and default hyperparameters (those of the CLUE baselines,
https://github.com/CLUEbenchmark/CLUE, and of HFL's Chinese-BERT-wwm reports,
https://github.com/ymcui/Chinese-BERT-wwm, for the same tasks). `load_task` reads any of them.

Layout: `base` (the `Task` protocol that a fine-tuning run drives, `Split`, `Head`, the tokenizer
loader); one module per kind of task with its reader and its `Task` (`classification`:
classification and regression, `cmrc2018`: span extraction, `ner`); `io` (bad lines, submission
files); `metrics`; `run` (a whole fine-tuning run: config, model, training, prediction).
"""

from dataclasses import dataclass

from lub_fast.tasks.classification import load_classification
from lub_fast.tasks.cmrc2018 import load_cmrc2018
from lub_fast.tasks.io import TaskData, TaskDataError
from lub_fast.tasks.ner import load_ner

__all__ = ["TASKS", "TaskData", "TaskDataError", "TaskSpec", "load_task"]


@dataclass(frozen=True)
class TaskSpec:
    """A task's kind ("classification", "regression", "span", "ner"), its dev metric (a key of
    the metrics dict the finetune loop reports) and default hyperparameters."""

    name: str
    kind: str
    metric: str
    max_seq_len: int = 128
    lr: float = 2e-5
    epochs: int = 3
    batch_size: int = 32


TASKS = {
    spec.name: spec
    for spec in (
        TaskSpec("tnews", "classification", "accuracy"),
        TaskSpec("iflytek", "classification", "accuracy", max_seq_len=128, lr=2e-5, epochs=3),
        TaskSpec("afqmc", "classification", "accuracy"),
        TaskSpec("cmnli", "classification", "accuracy", lr=3e-5, epochs=2, batch_size=64),
        TaskSpec("ocnli", "classification", "accuracy", lr=3e-5, epochs=3),
        TaskSpec("csl", "classification", "accuracy", max_seq_len=256, lr=1e-5, epochs=5, batch_size=16),
        TaskSpec("cluewsc", "classification", "accuracy", lr=1e-5, epochs=10, batch_size=16),
        TaskSpec("lcqmc", "classification", "accuracy", lr=2e-5, epochs=3, batch_size=64),
        TaskSpec("bq", "classification", "accuracy", lr=3e-5, epochs=3, batch_size=64),
        TaskSpec("chnsenticorp", "classification", "accuracy", max_seq_len=256, lr=2e-5, epochs=3, batch_size=64),
        TaskSpec("stsb", "regression", "pearson", lr=2e-5, epochs=4),
        TaskSpec("classification", "classification", "accuracy"),
        TaskSpec("cmrc2018", "span", "f1", max_seq_len=512, lr=3e-5, epochs=2, batch_size=32),
        TaskSpec("ner", "ner", "entity_f1", max_seq_len=256, lr=3e-5, epochs=5, batch_size=32),
    )
}


def load_task(task, path, labels=None, text_fields=None, label_field=None, scheme=None, skip_bad=False):
    """Read one data file of `task` (a key of `TASKS`) into `TaskData`.

    `labels`: the label (or NER tag) set as a sequence or a labels file; None derives it from
    this file (a training file). Give the training set's labels when reading dev/test files:
    a label outside them raises `TaskDataError` naming the file and line. `text_fields`,
    `label_field`: the generic `classification` task's fields. `scheme`: NER re-tagging ("bio",
    "bioes", "bmes"). `skip_bad`: drop bad lines and count them in `TaskData.skipped` instead of
    raising.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if (text_fields is not None or label_field is not None) and task != "classification":
        raise ValueError("text_fields/label_field are for the generic 'classification' task")
    if scheme is not None and task != "ner":
        raise ValueError("scheme is for the 'ner' task")
    kind = TASKS[task].kind
    if kind == "span":
        if labels is not None:
            raise ValueError("cmrc2018 takes no label set")
        return load_cmrc2018(path, skip_bad=skip_bad)
    if kind == "ner":
        return load_ner(path, labels=labels, scheme=scheme, skip_bad=skip_bad)
    return load_classification(task, path, labels, text_fields, label_field, skip_bad)
