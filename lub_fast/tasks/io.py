"""Shared reading and writing for task data: bad-line handling and submission files.

Every reader goes through `BadLines`: a malformed line raises `TaskDataError` naming the file,
the 1-based line and the rule it broke; with `skip_bad=True` the line is dropped and counted under
its rule instead. Submission formats follow the CLUE benchmark (json lines with `id` and `label`,
https://github.com/CLUEbenchmark/CLUE) and the CMRC 2018 scorer (one json object `{id: answer}`,
https://github.com/ymcui/cmrc2018).

CLUE's submission file names (`clue_submission_name`; CLUE's submission notes of 2021-09-04 and
the CLUE 1.1 prediction scripts): `<task>_predict.json`, except `ocnli_50k_predict.json` and, for
the two tasks whose test set CLUE 1.1 replaced, `tnews11_predict.json` / `cluewsc11_predict.json`
(`tnews10_`/`cluewsc10_` for the 1.0 test file, `test1.0.json` in CLUE's `tnews_public.zip`);
`cluener_predict.json` for CLUENER 2020. Classification lines are `{"id": id, "label": "name"}`
with the label as a string, in the test file's order; TNEWS and IFLYTEK want the numeric label
codes, so a run trained on the descriptions (`label_desc`) gets no CLUE file unless it was given
CLUE's `labels.json`.
"""

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from lub_fast.errors import UsageError


@dataclass
class TaskData:
    """What `load_task` returns.

    `examples`: the task's example objects in file order. `labels`: the class names (tags for
    NER) in id order, None for regression and span extraction. `has_labels`: False for an
    unlabelled (test) file, whose examples carry `label=None`. `skipped`: dropped lines by rule.
    `repairs`: kept examples that needed a repair, by rule: the ids of those examples.
    """

    task: str
    path: str
    examples: list
    labels: tuple | None
    has_labels: bool
    skipped: dict
    repairs: dict = field(default_factory=dict)


class TaskDataError(UsageError, ValueError):
    """A task file broke a format rule. `path`, `line` (1-based, 0 when not line-bound), `rule`."""

    def __init__(self, path, line, rule, detail=""):
        self.path = str(path)
        self.line = line
        self.rule = rule
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {rule}" + (f" ({detail})" if detail else ""))


@dataclass
class BadLines:
    """Raises on a bad line, or counts it by rule when `skip_bad` (and for rules that always drop)."""

    path: str
    skip_bad: bool = False
    skipped: Counter = field(default_factory=Counter)

    def bad(self, line, rule, detail=""):
        """Handle one bad line: raise `TaskDataError`, or count it under `rule` when skipping."""
        if not self.skip_bad:
            raise TaskDataError(self.path, line, rule, detail)
        self.skipped[rule] += 1

    def drop(self, rule):
        """Count a line that the format itself says to drop (e.g. OCNLI's label '-')."""
        self.skipped[rule] += 1


def read_lines(path):
    """Yield `(line_number, text)` for each line of a UTF-8 file (BOM and line end removed).

    A file that is not valid UTF-8 raises `TaskDataError` with the line of the first bad byte.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TaskDataError(path, number, "not UTF-8", str(exc)) from None
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield number, text.rstrip("\r\n")


def read_json_lines(path, bad):
    """Yield `(line_number, dict)` for each non-blank line; malformed lines go to `bad`."""
    for number, text in read_lines(path):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            bad.bad(number, "malformed json", str(exc))
            continue
        if not isinstance(obj, dict):
            bad.bad(number, "json line is not an object", type(obj).__name__)
            continue
        yield number, obj


def first_content_line(path):
    """The first non-blank line of a file, stripped ('' for an empty file)."""
    for _, text in read_lines(path):
        if text.strip():
            return text.strip()
    return ""


def _atomic_write(path, text):
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_clue_predictions(path, ids, labels):
    """CLUE submission: one `{"id": id, "label": label}` json object a line, in the given order."""
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
    lines = [json.dumps({"id": i, "label": y}, ensure_ascii=False) for i, y in zip(ids, labels)]
    _atomic_write(path, "".join(line + "\n" for line in lines))


def write_cmrc2018_predictions(path, predictions):
    """CMRC 2018 submission: one json object `{question_id: answer_text}`."""
    _atomic_write(path, json.dumps(dict(predictions), ensure_ascii=False, indent=1) + "\n")


def write_ner_predictions(path, ids, tokens, spans, with_text=True):
    """NER predictions in CLUENER's layout, one json object a line.

    `tokens[k]` is sentence k's token list (one character each in Chinese data) and `spans[k]`
    its `(type, start, end)` entities, `end` inclusive, in token positions; written as
    `{"id", "text", "label": {type: {entity_text: [[start, end], ...]}}}` with `text` the joined
    tokens; `with_text=False` leaves `text` out, as CLUENER's `cluener_predict.json` submission.
    """
    if not len(ids) == len(tokens) == len(spans):
        raise ValueError(f"{len(ids)} ids, {len(tokens)} token lists, {len(spans)} span lists")
    out = []
    for i, toks, entity_spans in zip(ids, tokens, spans):
        label = {}
        for kind, start, end in entity_spans:
            entity = "".join(toks[start : end + 1])
            label.setdefault(kind, {}).setdefault(entity, []).append([start, end])
        row = {"id": i, "text": "".join(toks), "label": label} if with_text else {"id": i, "label": label}
        out.append(json.dumps(row, ensure_ascii=False))
    _atomic_write(path, "".join(line + "\n" for line in out))


CLUE_SUBMISSION_NAMES = {
    "afqmc": "afqmc_predict.json",
    "iflytek": "iflytek_predict.json",
    "tnews": "tnews11_predict.json",
    "cmnli": "cmnli_predict.json",
    "ocnli": "ocnli_50k_predict.json",
    "csl": "csl_predict.json",
    "cluewsc": "cluewsc11_predict.json",
    "cmrc2018": "cmrc2018_predict.json",
}
CLUE_10_NAMES = {"tnews": "tnews10_predict.json", "cluewsc": "cluewsc10_predict.json"}
_CLUE_CODE_LABELS = ("tnews", "iflytek")


def clue_submission_name(task, test_path, labels):
    """`(file name, None)` of CLUE's submission for predictions of `test_path`, `(None, reason)`
    when a CLUE task's predictions cannot be submitted as they are, `(None, None)` for tasks CLUE
    does not rank. `labels`: the run's label names; task `ner` has a CLUE file only for CLUENER
    json."""
    if task == "ner":
        return ("cluener_predict.json", None) if first_content_line(test_path).startswith("{") else (None, None)
    if task not in CLUE_SUBMISSION_NAMES:
        return None, None
    if task in _CLUE_CODE_LABELS and not all(str(name).isdigit() for name in labels):
        return None, f"CLUE's {task} labels are numeric codes, this run's are names; train with --labels labels.json"
    if task in CLUE_10_NAMES and os.path.basename(os.fspath(test_path)) == "test1.0.json":
        return CLUE_10_NAMES[task], None
    return CLUE_SUBMISSION_NAMES[task], None
