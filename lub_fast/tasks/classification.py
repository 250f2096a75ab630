"""Sentence and sentence-pair classification and regression: readers and the two ``Task``s.

Formats follow the CLUE benchmark's json lines (https://github.com/CLUEbenchmark/CLUE: TNEWS,
IFLYTEK, AFQMC, CMNLI, OCNLI, CSL, CLUEWSC2020) and the tab-separated copies in common use
(LCQMC, BQ, AFQMC: `s1\\ts2\\tlabel`; ChnSentiCorp: `label\\ttext_a` under a header; TNEWS:
`text\\tlabel_desc`; Chinese STS-B: `s1\\ts2\\tscore`). A file whose first non-blank line opens
with `{` is read as json lines, any other as TSV. A json file whose first line has no label field
and a TSV file whose first row has only the text columns are unlabelled (test) files.

Labels: without a label set the file's own labels, sorted (numerically when all are integers),
are the set (a training file). With a label set (a list or a labels file: one label a line, or
json lines with `label` and `label_desc`/`label_des` aliases such as CLUE's `labels.json`) every
label must belong to it, by name or alias, else `TaskDataError` names the file and line.
CMNLI/OCNLI lines labelled `-` (no annotator consensus) are dropped and counted.

A labelled TSV training file whose label column holds more distinct values than half its rows (at
least 10 rows) holds text there, not labels (columns swapped, or another layout): an error naming
the layout expected and what was found, never a model with a class per sentence.

Features (``ClassificationTask``, ``RegressionTask``; Devlin et al. 2019): ``[CLS] a [SEP] b
[SEP]`` with token types 0/1, pairs cut longest-first to ``max_seq_len`` (BERT's
``_truncate_seq_pair``). Classification predicts the arg-max class and scores accuracy and macro
F1; regression (STS-B) predicts the one output and scores Pearson, Spearman and MSE.
"""

import math
import os
from dataclasses import dataclass

import numpy as np

from lub_fast.tasks.base import Head, Split, special_id
from lub_fast.tasks.io import (
    BadLines,
    TaskData,
    TaskDataError,
    first_content_line,
    read_json_lines,
    read_lines,
    write_clue_predictions,
)
from lub_fast.tasks.metrics import accuracy, macro_f1, pearson, spearman


@dataclass(frozen=True)
class TextExample:
    """One classification/regression example.

    `id`: the file's `id`/`idx`/`qid` field, else the example's 0-based index. `label`: a class
    name (str), a score (float, regression) or None (unlabelled file). `line`: 1-based source line.
    """

    id: object
    text_a: str
    text_b: str | None
    label: str | float | None
    line: int


@dataclass(frozen=True)
class _Format:
    json_texts: tuple  # json fields holding text_a (and text_b)
    tsv_texts: tuple  # header names for those texts, in order
    tsv_layout: tuple  # headerless column order: "a", "b", "label"
    label_alias: str | None = None  # a json field that names the same class (CLUE `label_desc`)
    regression: bool = False
    drop_dash: bool = False


_PAIR = dict(json_texts=("sentence1", "sentence2"), tsv_texts=("text_a", "text_b"), tsv_layout=("a", "b", "label"))
_SINGLE = dict(json_texts=("sentence",), tsv_texts=("text_a",), tsv_layout=("a", "label"))
FORMATS = {
    "tnews": _Format(**_SINGLE, label_alias="label_desc"),
    "iflytek": _Format(**_SINGLE, label_alias="label_des"),
    "afqmc": _Format(**_PAIR),
    "lcqmc": _Format(**_PAIR),
    "bq": _Format(**_PAIR),
    "cmnli": _Format(**_PAIR, drop_dash=True),
    "ocnli": _Format(**_PAIR, drop_dash=True),
    "chnsenticorp": _Format(json_texts=("text_a",), tsv_texts=("text_a",), tsv_layout=("label", "a")),
    "stsb": _Format(**_PAIR, regression=True),
}
_ID_FIELDS = ("id", "idx", "qid")
_HEADER_WORDS = {"label", "text_a", "text_b", "text", "sentence", "sentence1", "sentence2", "qid", "id", "idx", "score"}
STSB_RANGE = (0.0, 5.0)


def read_labels_file(path):
    """Read a label set: `(names, aliases)`; `aliases` maps e.g. CLUE's `label_desc` to `label`.

    Accepts one label a line, or json lines with `label` and optional `label_desc`/`label_des`.
    """
    names, aliases = [], {}
    bad = BadLines(str(path))
    if first_content_line(path).startswith("{"):
        for number, obj in read_json_lines(path, bad):
            if "label" not in obj:
                bad.bad(number, "missing field 'label'")
            name = str(obj["label"])
            names.append(name)
            for key in ("label_desc", "label_des"):
                if key in obj:
                    aliases[str(obj[key])] = name
    else:
        names = [text.strip() for _, text in read_lines(path) if text.strip()]
    if len(set(names)) != len(names):
        raise TaskDataError(path, 0, "duplicate labels in the labels file")
    return tuple(names), aliases


def resolve_label_set(labels):
    """`labels` (None, a labels file path, or a sequence of names) -> `(names or None, aliases)`."""
    if labels is None:
        return None, {}
    if isinstance(labels, (str, os.PathLike)):
        return read_labels_file(labels)
    return tuple(str(x) for x in labels), {}


def sort_labels(names):
    """Sorted label names: numerically when all are integers ('2' < '10'), else as strings."""
    names = set(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _text(value):
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _label_string(value):
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


class _Builder:
    """Validates fields line by line and collects examples."""

    def __init__(self, fmt, names, aliases, bad):
        self.fmt = fmt
        self.names, self.aliases, self.bad = names, aliases, bad
        self.examples, self.seen = [], set()

    def add(self, line, ident, texts, label, alias=None, labelled=True):
        if any(not t.strip() for t in texts):
            self.bad.bad(line, "empty text")
            return
        if labelled:
            label = self._label(line, label, alias)
            if label is None:
                return
        else:
            label = None
        if ident is None:
            ident = len(self.examples)
        text_b = texts[1] if len(texts) > 1 else None
        self.examples.append(TextExample(ident, texts[0], text_b, label, line))

    def _label(self, line, value, alias):
        if value is None:
            self.bad.bad(line, "missing label")
            return None
        if self.fmt.regression:
            try:
                score = float(value)
            except (TypeError, ValueError):
                self.bad.bad(line, "score is not a number", repr(value))
                return None
            low, high = STSB_RANGE
            if math.isnan(score) or not low <= score <= high:
                self.bad.bad(line, f"score outside [{low:g}, {high:g}]", repr(value))
                return None
            return score
        name = _label_string(value)
        if self.fmt.drop_dash and name == "-":
            self.bad.drop("label '-' (no annotator consensus)")
            return None
        if not name:
            self.bad.bad(line, "empty label")
            return None
        if self.names is None:
            self.seen.add(name)
            return name
        for candidate in (name, None if alias is None else _label_string(alias)):
            if candidate in self.names:
                return candidate
            if candidate in self.aliases:
                return self.aliases[candidate]
        self.bad.bad(line, "label outside the label set", f"{name!r} not in {list(self.names)}")
        return None


def _ident(obj):
    for key in _ID_FIELDS:
        if key in obj:
            return obj[key]
    return None


def _read_json(builder, path, text_fields, label_field, alias_field):
    labelled = None
    for number, obj in read_json_lines(path, builder.bad):
        if labelled is None:
            labelled = label_field in obj
        missing = [f for f in text_fields + ((label_field,) if labelled else ()) if f not in obj]
        if missing:
            builder.bad.bad(number, f"missing field {missing[0]!r}")
            continue
        texts = [_text(obj[f]) for f in text_fields]
        label = obj.get(label_field) if labelled else None
        builder.add(number, _ident(obj), texts, label, obj.get(alias_field) if alias_field else None, bool(labelled))
    return bool(labelled)


@dataclass(frozen=True)
class _Columns:
    """Where a TSV row keeps its fields: text columns, label column (None: unlabelled), id column."""

    texts: tuple
    label: int | None
    ident: int | None
    width: int


def _read_tsv(builder, path, skip_header, labelled_cols, unlabelled_cols):
    """Rows whose width matches `labelled_cols` (checked on the first row) are labelled."""
    labelled = None
    rows = ((n, t) for n, t in read_lines(path) if t.strip())
    if skip_header:
        next(rows, None)
    for number, row in rows:
        fields = row.split("\t")
        if labelled is None:
            labelled = labelled_cols is not None and (unlabelled_cols is None or len(fields) == labelled_cols.width)
        cols = labelled_cols if labelled else unlabelled_cols
        if len(fields) != cols.width:
            builder.bad.bad(number, f"expected {cols.width} tab-separated fields, found {len(fields)}")
            continue
        label = fields[cols.label] if labelled else None
        ident = fields[cols.ident] if cols.ident is not None else None
        builder.add(number, ident, [fields[c] for c in cols.texts], label, labelled=labelled)
    return bool(labelled)


def _tsv_header(path):
    fields = first_content_line(path).split("\t")
    if all(f.strip().lower() in _HEADER_WORDS for f in fields):
        return [f.strip().lower() for f in fields]
    return None


def _header_columns(path, header, text_names, label_names):
    """Columns from a header: `text_names[k]` lists accepted names for text k."""
    texts = []
    for accepted in text_names:
        found = [header.index(s) for s in accepted if s in header]
        if not found:
            raise TaskDataError(path, 1, f"header has no {accepted[0]!r} column", "\t".join(header))
        texts.append(found[0])
    label = next((header.index(s) for s in label_names if s in header), None)
    ident = next((header.index(s) for s in _ID_FIELDS if s in header), None)
    cols = _Columns(tuple(texts), label, ident, len(header))
    return (cols, None) if label is not None else (None, cols)


_NAMES = {"a": "text_a", "b": "text_b", "label": "label"}
MIN_ROWS_LABEL_CHECK = 10


def _check_label_column(path, builder, expected):
    """`TaskDataError` when the label column of a labelled training TSV holds text (see module doc)."""
    n, labels = len(builder.examples), builder.seen
    if n < MIN_ROWS_LABEL_CHECK or len(labels) <= n / 2:
        return
    first = builder.examples[0]
    raise TaskDataError(
        path, 0, f"label column holds text ({len(labels)} distinct labels in {n} rows, the first "
        f"{first.label[:30]!r} with text {first.text_a[:30]!r})",
        f"expected {expected}; put the columns in that order or add a header row",
    )


def _tsv_layout_name(fmt):
    return "<TAB>".join(_NAMES[k] for k in fmt.tsv_layout) + " (headerless) or a header naming the columns"


def _read_tsv_task(builder, path, fmt):
    header = _tsv_header(path)
    if header is not None:
        synonyms = {"text_a": ("text_a", "text", "sentence", "sentence1"), "text_b": ("text_b", "sentence2")}
        text_names = [synonyms[name] for name in fmt.tsv_texts]
        return _read_tsv(builder, path, True, *_header_columns(path, header, text_names, ("label", "score")))
    layout = fmt.tsv_layout
    n_texts = len(layout) - 1
    labelled = _Columns(tuple(layout.index(k) for k in ("a", "b")[:n_texts]), layout.index("label"), None, len(layout))
    unlabelled = _Columns(tuple(range(n_texts)), None, None, n_texts)
    return _read_tsv(builder, path, False, labelled, unlabelled)


def _read_generic_tsv(builder, path, text_fields, label_field):
    if all(f.isdigit() for f in text_fields) and label_field.isdigit():
        texts = tuple(int(f) for f in text_fields)
        label = int(label_field)
        labelled = _Columns(texts, label, None, max(texts + (label,)) + 1)
        return _read_tsv(builder, path, False, labelled, None)
    header = [f.strip() for f in first_content_line(path).split("\t")]
    return _read_tsv(builder, path, True, *_header_columns(path, header, [(f,) for f in text_fields], (label_field,)))


def _read_csl(builder, path):
    labelled = None
    for number, obj in read_json_lines(path, builder.bad):
        if labelled is None:
            labelled = "label" in obj
        missing = [f for f in ("abst", "keyword") + (("label",) if labelled else ()) if f not in obj]
        if missing:
            builder.bad.bad(number, f"missing field {missing[0]!r}")
            continue
        keywords = obj["keyword"] if isinstance(obj["keyword"], list) else [obj["keyword"]]
        # CLUE baseline (CslProcessor): text_a = keywords joined by spaces, text_b = abstract.
        texts = [" ".join(_text(k) for k in keywords), _text(obj["abst"])]
        builder.add(number, _ident(obj), texts, obj.get("label"), labelled=labelled)
    return bool(labelled)


def wsc_marked_text(text, span1_index, span1_text, span2_index, span2_text):
    """CLUEWSC2020 input as CLUE's baseline builds it: the candidate wrapped in `_`, the pronoun in `[]`."""
    chars = list(text)
    if span2_index > span1_index:
        chars.insert(span1_index, "_")
        chars.insert(span1_index + len(span1_text) + 1, "_")
        chars.insert(span2_index + 2, "[")
        chars.insert(span2_index + len(span2_text) + 3, "]")
    else:
        chars.insert(span2_index, "[")
        chars.insert(span2_index + len(span2_text) + 1, "]")
        chars.insert(span1_index + 2, "_")
        chars.insert(span1_index + len(span1_text) + 3, "_")
    return "".join(chars)


def _read_cluewsc(builder, path):
    labelled = None
    for number, obj in read_json_lines(path, builder.bad):
        if labelled is None:
            labelled = "label" in obj
        target = obj.get("target")
        if "text" not in obj or not isinstance(target, dict) or (labelled and "label" not in obj):
            builder.bad.bad(number, "missing field 'text', 'target' or 'label'")
            continue
        text = _text(obj["text"])
        try:
            spans = [(int(target[f"span{k}_index"]), _text(target[f"span{k}_text"])) for k in (1, 2)]
        except (KeyError, TypeError, ValueError):
            builder.bad.bad(number, "target needs span1_index, span1_text, span2_index, span2_text")
            continue
        if any(not s or text[i : i + len(s)] != s for i, s in spans):
            builder.bad.bad(number, "target span text does not match the text at its index")
            continue
        marked = wsc_marked_text(text, spans[0][0], spans[0][1], spans[1][0], spans[1][1])
        builder.add(number, _ident(obj), [marked], obj.get("label"), labelled=labelled)
    return bool(labelled)


def load_classification(task, path, labels=None, text_fields=None, label_field=None, skip_bad=False):
    """Read a classification/regression file of `task` (see module docstring) into `TaskData`.

    `task`: a key of `FORMATS`, `csl`, `cluewsc` or `classification` (generic: `text_fields`,
    one or two json fields or TSV header names, or 0-based TSV column numbers; `label_field`
    defaults to `label`). `labels`: the label set (None: take it from this file).
    """
    path = os.fspath(path)
    names, aliases = resolve_label_set(labels)
    bad = BadLines(path, skip_bad)
    is_json = first_content_line(path).startswith("{")
    if task == "classification":
        fmt = _Format(json_texts=(), tsv_texts=(), tsv_layout=())
        text_fields = tuple(str(f) for f in (text_fields or ("text",)))
        if not 1 <= len(text_fields) <= 2:
            raise ValueError(f"text_fields takes one or two fields, got {len(text_fields)}")
        label_field = "label" if label_field is None else str(label_field)
    elif task in ("csl", "cluewsc"):
        fmt = _Format(json_texts=(), tsv_texts=(), tsv_layout=())
    elif task in FORMATS:
        fmt = FORMATS[task]
    else:
        raise ValueError(f"unknown classification task {task!r}")
    builder = _Builder(fmt, names, aliases, bad)
    if task == "csl":
        labelled = _read_csl(builder, path)
    elif task == "cluewsc":
        labelled = _read_cluewsc(builder, path)
    elif task == "classification":
        if is_json:
            labelled = _read_json(builder, path, text_fields, label_field, None)
        else:
            labelled = _read_generic_tsv(builder, path, text_fields, label_field)
            if labelled and names is None:
                where = f"column {label_field}" if label_field.isdigit() else f"the column headed {label_field!r}"
                _check_label_column(path, builder, f"the label in {where}")
    elif is_json:
        labelled = _read_json(builder, path, fmt.json_texts, "label", fmt.label_alias)
    else:
        labelled = _read_tsv_task(builder, path, fmt)
        if labelled and names is None and not fmt.regression:
            _check_label_column(path, builder, _tsv_layout_name(fmt))
    if fmt.regression:
        label_names = None
    elif names is not None:
        label_names = names
    else:
        if not labelled:
            raise TaskDataError(path, 0, "an unlabelled file needs a label set (labels=...)")
        label_names = sort_labels(builder.seen)
    return TaskData(task, path, builder.examples, label_names, labelled, dict(bad.skipped))


# ---------------------------------------------------------------------------------------------
# The tasks


def truncate_pair(a: list, b: list | None, max_tokens: int) -> tuple[list, list | None]:
    """Cut ``a`` and ``b`` to ``max_tokens`` in total, one token at a time from the end of the
    longer (``b`` on ties), as BERT's ``_truncate_seq_pair``."""
    a = list(a)
    b = None if b is None else list(b)
    while len(a) + (len(b) if b is not None else 0) > max_tokens:
        if b is not None and len(b) >= len(a):
            b.pop()
        else:
            a.pop()
    return a, b


def encode_texts(tokenizer, examples, max_seq_len: int) -> list[dict]:
    """``[CLS] a [SEP] (b [SEP])`` ids and token types of ``TextExample``s."""
    cls, sep = special_id(tokenizer, "[CLS]"), special_id(tokenizer, "[SEP]")
    first = tokenizer.encode_batch([e.text_a for e in examples], add_special_tokens=False)
    pairs = [e for e in examples if e.text_b is not None]
    second = iter(tokenizer.encode_batch([e.text_b for e in pairs], add_special_tokens=False))
    rows = []
    for example, enc_a in zip(examples, first):
        ids_b = next(second).ids if example.text_b is not None else None
        a, b = truncate_pair(enc_a.ids, ids_b, max_seq_len - (3 if ids_b is not None else 2))
        ids = [cls] + a + [sep] + ([] if b is None else b + [sep])
        rows.append({"input_ids": ids, "token_type_ids": [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)})
    return rows


@dataclass(frozen=True)
class ClassificationTask:
    """A ``Task`` (``lub_fast.tasks.base``) over the files of ``task`` (a key of ``FORMATS``,
    ``csl``, ``cluewsc`` or the generic ``classification`` with ``text_fields``/``label_field``):
    one class per example, predicted as its label name."""

    task: str
    max_seq_len: int
    text_fields: tuple | None = None
    label_field: str | None = None
    skip_bad: bool = False
    prediction_suffix = ".jsonl"

    def read(self, path, labels, training=False) -> TaskData:
        return load_classification(self.task, path, labels, self.text_fields, self.label_field, self.skip_bad)

    def features(self, data, tokenizer) -> Split:
        rows = encode_texts(tokenizer, data.examples, self.max_seq_len)
        if data.has_labels:
            for row, target in zip(rows, self._targets(data)):
                row["labels"] = target
        return Split(data, rows)

    def _targets(self, data) -> list:
        ids = {name: i for i, name in enumerate(data.labels)}
        return [ids[e.label] for e in data.examples]

    def head(self, labels) -> Head:
        return Head("sequence_classification", len(labels), "single_label_classification", tuple(labels))

    def row_outputs(self, output, lengths) -> list:
        return list(output.logits.float().cpu().numpy())

    def decode(self, split, outputs) -> list:
        return [split.data.labels[int(np.argmax(o))] for o in outputs]

    def score(self, split, predictions) -> dict:
        golds = [e.label for e in split.data.examples]
        return {"accuracy": accuracy(predictions, golds), "macro_f1": macro_f1(predictions, golds)}

    def write_predictions(self, path, split, predictions, submission=False) -> None:
        labels = [str(p) for p in predictions] if submission else predictions
        write_clue_predictions(path, [e.id for e in split.data.examples], labels)


class RegressionTask(ClassificationTask):
    """A ``Task`` over a regression file (STS-B: a score per pair): the model's one output is the
    prediction."""

    def _targets(self, data) -> list:
        return [float(e.label) for e in data.examples]

    def head(self, labels) -> Head:
        return Head("sequence_classification", 1, "regression")

    def decode(self, split, outputs) -> list:
        return [float(o[0]) for o in outputs]

    def score(self, split, predictions) -> dict:
        golds = [e.label for e in split.data.examples]
        mse = float(np.mean((np.asarray(predictions) - np.asarray(golds)) ** 2))
        return {"pearson": pearson(predictions, golds), "spearman": spearman(predictions, golds), "mse": mse}
