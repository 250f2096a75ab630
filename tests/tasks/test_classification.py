"""Classification/regression readers on the real files in ../shared/data (skipped when absent)
and on small synthetic files for every bad-input rule; the two ``Task``s from file to rows,
predictions, metrics and prediction files."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import BertWordPieceTokenizer

from lub_fast.tasks import TASKS, TaskDataError, load_task
from lub_fast.tasks.base import Head
from lub_fast.tasks.classification import ClassificationTask, RegressionTask, truncate_pair, wsc_marked_text
from lub_fast.tasks.io import clue_submission_name, write_clue_predictions

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")


# (task, file, labels file, examples, labels, dropped)
REAL_FILES = [
    ("afqmc", "afqmc/train.txt", None, 34334, 2, 0),
    ("afqmc", "afqmc/dev.txt", "afqmc/labels.txt", 4316, 2, 0),
    ("tnews", "tnews/train.tsv", "tnews/labels.json", 53360, 15, 0),
    ("tnews", "tnews/dev.json", "tnews/labels.json", 10000, 15, 0),
    ("tnews", "tnews/dev.tsv", "tnews/labels.txt", 10000, 15, 0),
    ("ocnli", "ocnli/train.3k.json", None, 2994, 3, 6),
    ("ocnli", "ocnli/train.10k.json", None, 9985, 3, 15),
    ("ocnli", "ocnli/dev.json", None, 2950, 3, 50),
    ("lcqmc", "lcqmc/dev.txt", None, 8802, 2, 0),
    ("bq", "bq_corpus/dev.tsv", None, 10000, 2, 0),
    ("chnsenticorp", "chnsenticorp/train.tsv", None, 9600, 2, 0),
    ("chnsenticorp", "chnsenticorp/dev.tsv", None, 1200, 2, 0),
    ("stsb", "sts_b_zh/STS-B.train.data", None, 5231, None, 0),
    ("stsb", "sts_b_zh/STS-B.valid.data", None, 1458, None, 0),
]


@needs_data
@pytest.mark.parametrize("task,name,labels,n_examples,n_labels,n_dropped", REAL_FILES)
def test_classification_real_files_counts(task, name, labels, n_examples, n_labels, n_dropped):
    data = load_task(task, DATA / name, labels=None if labels is None else DATA / labels)
    assert len(data.examples) == n_examples, f"{name}: {len(data.examples)} examples"
    assert (None if data.labels is None else len(data.labels)) == n_labels
    assert sum(data.skipped.values()) == n_dropped, f"{name}: dropped {data.skipped}"
    assert data.has_labels
    pair = task not in ("tnews", "chnsenticorp")
    for e in data.examples:
        assert e.text_a.strip() and (e.text_b is not None) == pair
        if n_labels is None:
            assert 0.0 <= e.label <= 5.0
        else:
            assert e.label in data.labels


@needs_data
def test_classification_tnews_descriptions_resolve_to_codes():
    train = load_task("tnews", DATA / "tnews/train.tsv", labels=DATA / "tnews/labels.json")
    assert train.examples[0].label == "108"  # news_edu in labels.json
    by_desc = load_task("tnews", DATA / "tnews/train.tsv")  # no labels file: descriptions
    dev = load_task("tnews", DATA / "tnews/dev.json", labels=by_desc.labels)
    assert dev.examples[0].label == "news_entertainment"
    assert dev.labels == tuple(sorted(dev.labels))


@needs_data
def test_classification_labels_sorted_numerically_and_ocnli_dash_dropped():
    ocnli = load_task("ocnli", DATA / "ocnli/dev.json")
    assert ocnli.labels == ("contradiction", "entailment", "neutral")
    assert ocnli.skipped == {"label '-' (no annotator consensus)": 50}


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _json(**obj):
    return json.dumps(obj, ensure_ascii=False)


def test_classification_unknown_label_names_file_and_line(tmp_path):
    dev = _write(tmp_path, "dev.json", [_json(sentence1="你好", sentence2="您好", label="1"), _json(sentence1="a", sentence2="b", label="7")])
    with pytest.raises(TaskDataError) as info:
        load_task("afqmc", dev, labels=["0", "1"])
    assert info.value.line == 2 and str(dev) in str(info.value) and "label outside the label set" in str(info.value)
    data = load_task("afqmc", dev, labels=["0", "1"], skip_bad=True)
    assert len(data.examples) == 1 and data.skipped == {"label outside the label set": 1}


@pytest.mark.parametrize(
    "line,rule",
    [
        ('{"sentence": "好", "label": "1"', "malformed json"),
        (_json(text="好", label="1"), "missing field 'sentence'"),
        (_json(sentence="  ", label="1"), "empty text"),
        ('["not", "an", "object"]', "json line is not an object"),
    ],
)
def test_classification_bad_json_lines(tmp_path, line, rule):
    path = _write(tmp_path, "train.json", [_json(sentence="很好", label="1"), line, _json(sentence="不好", label="0")])
    with pytest.raises(TaskDataError) as info:
        load_task("tnews", path)
    assert info.value.line == 2 and info.value.rule == rule
    data = load_task("tnews", path, skip_bad=True)
    assert [e.label for e in data.examples] == ["1", "0"] and data.skipped == {rule: 1}


def test_classification_bad_tsv_rows(tmp_path):
    path = _write(tmp_path, "train.txt", ["问一\t问二\t1", "只有一列", "问三\t\t0", "问四\t问五\t0"])
    with pytest.raises(TaskDataError, match=r"train.txt:2: expected 3 tab-separated fields"):
        load_task("lcqmc", path)
    data = load_task("lcqmc", path, skip_bad=True)
    assert len(data.examples) == 2
    assert data.skipped == {"expected 3 tab-separated fields, found 1": 1, "empty text": 1}


@needs_data
def test_classification_label_column_holding_text_is_an_error(tmp_path):
    # ChnSentiCorp written as headerless text<TAB>label: read as label<TAB>text_a, each review
    # would be a class (1178 of them)
    rows = [line.split("\t") for line in (DATA / "chnsenticorp/dev.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    swapped = _write(tmp_path, "swapped.tsv", [f"{text}\t{label}" for _, label, text in rows])  # qid, label, text_a
    with pytest.raises(TaskDataError, match=r"swapped.tsv: label column holds text.*expected label<TAB>text_a") as info:
        load_task("chnsenticorp", swapped)
    assert "1178 distinct labels in 1200 rows" in str(info.value), info.value
    assert len(load_task("chnsenticorp", DATA / "chnsenticorp/dev.tsv").labels) == 2


def test_classification_label_column_rule_on_small_files(tmp_path):
    texts = [f"第{i}条评论说得很长很长" for i in range(12)]
    swapped = _write(tmp_path, "pairs.tsv", [f"问{i}\t答{i}\t{t}" for i, t in enumerate(texts)])
    with pytest.raises(TaskDataError, match=r"pairs.tsv: label column holds text \(12 distinct labels in 12 rows"):
        load_task("lcqmc", swapped)
    generic = _write(tmp_path, "generic.tsv", [f"{t}\t{i}" for i, t in enumerate(texts)])
    with pytest.raises(TaskDataError, match=r"label column holds text.*expected the label in column 0"):
        load_task("classification", generic, text_fields=["1"], label_field="0")
    # many classes but each used twice or more is a real label set (IFLYTEK has 119)
    fine = _write(tmp_path, "fine.tsv", [f"{t}\t类{i % 6}" for i, t in enumerate(texts)])
    assert len(load_task("classification", fine, text_fields=["0"], label_field="1").labels) == 6


def test_classification_unlabelled_test_files(tmp_path):
    test_json = _write(tmp_path, "test.json", [_json(id=7, sentence1="甲", sentence2="乙"), _json(id=8, sentence1="丙", sentence2="丁")])
    data = load_task("afqmc", test_json, labels=["0", "1"])
    assert not data.has_labels and [e.id for e in data.examples] == [7, 8] and data.examples[0].label is None
    test_tsv = _write(tmp_path, "test.tsv", ["甲\t乙", "丙\t丁"])
    data = load_task("lcqmc", test_tsv, labels=["0", "1"])
    assert not data.has_labels and data.examples[1].text_b == "丁"
    senti = _write(tmp_path, "senti_test.tsv", ["qid\ttext_a", "0\t很好", "1\t太差"])
    data = load_task("chnsenticorp", senti, labels=["0", "1"])
    assert [e.id for e in data.examples] == ["0", "1"] and data.examples[1].text_a == "太差"
    with pytest.raises(TaskDataError, match="needs a label set"):
        load_task("afqmc", test_json)


def test_classification_stsb_score_range(tmp_path):
    path = _write(tmp_path, "sts.txt", ["甲\t乙\t4.5", "甲\t乙\t5.5", "甲\t乙\tx"])
    with pytest.raises(TaskDataError, match=r"sts.txt:2: score outside \[0, 5\]"):
        load_task("stsb", path)
    data = load_task("stsb", path, skip_bad=True)
    assert [e.label for e in data.examples] == [4.5] and data.labels is None
    assert data.skipped == {"score outside [0, 5]": 1, "score is not a number": 1}


def test_classification_generic_fields(tmp_path):
    jsonl = _write(tmp_path, "own.json", [_json(title="标题", body="正文", tag="体育"), _json(title="二", body="三", tag="财经")])
    data = load_task("classification", jsonl, text_fields=["title", "body"], label_field="tag")
    assert data.labels == ("体育", "财经") and data.examples[0].text_b == "正文"
    headed = _write(tmp_path, "own.tsv", ["id\tcategory\tcontent", "a1\tx\t文本一", "a2\ty\t文本二"])
    data = load_task("classification", headed, text_fields=["content"], label_field="category")
    assert [(e.id, e.text_a, e.label) for e in data.examples] == [("a1", "文本一", "x"), ("a2", "文本二", "y")]
    positional = _write(tmp_path, "own2.tsv", ["y\t文本"])
    data = load_task("classification", positional, text_fields=[1], label_field=0)
    assert data.examples[0].text_a == "文本" and data.examples[0].label == "y"
    with pytest.raises(ValueError, match="generic"):
        load_task("tnews", jsonl, text_fields=["title"])


def test_classification_csl_and_cluewsc(tmp_path):
    csl = _write(tmp_path, "csl.json", [_json(id=1, abst="摘要文本", keyword=["关键词", "词二"], label="1")])
    example = load_task("csl", csl).examples[0]
    assert (example.text_a, example.text_b, example.label) == ("关键词 词二", "摘要文本", "1")
    text = "小橙想要买玩具，它很开心"
    target = {"span1_index": 0, "span1_text": "小橙", "span2_index": 8, "span2_text": "它"}
    wsc = _write(tmp_path, "wsc.json", [_json(target=target, idx=3, label="true", text=text)])
    example = load_task("cluewsc", wsc).examples[0]
    assert example.text_a == "_小橙_想要买玩具，[它]很开心" and example.id == 3
    assert wsc_marked_text("它说小橙来了", 2, "小橙", 0, "它") == "[它]说_小橙_来了"
    broken = dict(target, span2_index=7)
    path = _write(tmp_path, "wsc_bad.json", [_json(target=broken, idx=4, label="false", text=text)])
    with pytest.raises(TaskDataError, match="wsc_bad.json:1: target span text"):
        load_task("cluewsc", path)


def test_classification_task_specs_cover_every_task():
    kinds = {spec.kind for spec in TASKS.values()}
    assert kinds == {"classification", "regression", "span", "ner"}
    # BERT fine-tuning ranges (CLUE baselines): a typo such as lr=2e-3 or max_seq_len=5120 fails here
    odd = [s for s in TASKS.values() if not (1e-5 <= s.lr <= 5e-5 and s.max_seq_len in (128, 256, 512) and 1 <= s.epochs <= 10)]
    assert not odd, odd
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mnli", "x")


def test_write_clue_predictions_json_lines(tmp_path):
    out = tmp_path / "sub" / "afqmc_predict.json"
    write_clue_predictions(out, [0, 1], ["1", "0"])
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"id": 0, "label": "1"},
        {"id": 1, "label": "0"},
    ]


def test_clue_submission_names(tmp_path):
    test = _write(tmp_path, "test.json", [_json(id=0, sentence="甲")])
    names = {task: clue_submission_name(task, test, ("100", "101"))[0] for task in TASKS}
    assert names == {
        "afqmc": "afqmc_predict.json", "iflytek": "iflytek_predict.json", "tnews": "tnews11_predict.json",
        "cmnli": "cmnli_predict.json", "ocnli": "ocnli_50k_predict.json", "csl": "csl_predict.json",
        "cluewsc": "cluewsc11_predict.json", "cmrc2018": "cmrc2018_predict.json", "ner": "cluener_predict.json",
        "lcqmc": None, "bq": None, "chnsenticorp": None, "stsb": None, "classification": None,
    }  # fmt: skip
    old = _write(tmp_path, "test1.0.json", [_json(id=0, sentence="甲")])
    assert clue_submission_name("tnews", old, ("100",)) == ("tnews10_predict.json", None)
    assert clue_submission_name("cluewsc", old, ("true", "false")) == ("cluewsc10_predict.json", None)
    name, reason = clue_submission_name("tnews", test, ("news_story", "news_culture"))
    assert name is None and "numeric codes" in reason and "labels.json" in reason
    conll = _write(tmp_path, "test.txt", ["张 O"])
    assert clue_submission_name("ner", conll, ("O",)) == (None, None)


# ---------------------------------------------------------------------------------------------
# ClassificationTask, RegressionTask


def _pair_tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("一二三四五六七八")
    return BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True)


def _pair_file(tmp_path, rows):
    path = tmp_path / "pairs.txt"
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_classification_task_rows_decode_score_and_files(tmp_path):
    task = ClassificationTask("afqmc", max_seq_len=8)
    rows = [("一二三", "四五", 1), ("六", "七八", 0), ("一二三四", "五六七", 1)]
    data = task.read(_pair_file(tmp_path, rows), None, training=True)
    split = task.features(data, _pair_tokenizer())
    # ids: [CLS]=2 [SEP]=3, 一=5 ... 八=12; the third pair is cut longest-first to 5 pieces
    assert split.rows[0] == {"input_ids": [2, 5, 6, 7, 3, 8, 9, 3], "token_type_ids": [0] * 5 + [1] * 3, "labels": 1}
    assert split.rows[2]["input_ids"] == [2, 5, 6, 7, 3, 9, 10, 3] and split.rows[1]["labels"] == 0
    assert task.head(data.labels) == Head("sequence_classification", 2, "single_label_classification", ("0", "1"))
    logits = torch.tensor([[0.0, 2.0, 9.0], [3.0, 1.0, 9.0], [4.0, 0.5, 9.0]])[:, :2]
    outputs = task.row_outputs(SimpleNamespace(logits=logits), [8, 6, 7])
    predictions = task.decode(split, outputs)
    assert predictions == ["1", "0", "0"]
    assert task.score(split, predictions) == pytest.approx({"accuracy": 2 / 3, "macro_f1": (2 / 3 + 2 / 3) / 2})
    task.write_predictions(tmp_path / "p.jsonl", split, predictions)
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == [{"id": 0, "label": "1"}, {"id": 1, "label": "0"}, {"id": 2, "label": "0"}]


def test_classification_task_unlabelled_file_has_no_labels_in_rows(tmp_path):
    task = ClassificationTask("afqmc", max_seq_len=16)
    train = task.read(_pair_file(tmp_path, [("一", "二", "b"), ("三", "四", "a")]), None, training=True)
    (tmp_path / "test.txt").write_text("五\t六\n", encoding="utf-8")
    split = task.features(task.read(str(tmp_path / "test.txt"), train.labels), _pair_tokenizer())
    assert split.rows == [{"input_ids": [2, 9, 3, 10, 3], "token_type_ids": [0, 0, 0, 1, 1]}]
    assert task.decode(split, [np.array([0.1, 0.9])]) == ["b"]  # the training set's order: a, b


def test_regression_task_rows_decode_and_score(tmp_path):
    task = RegressionTask("stsb", max_seq_len=16)
    path = _pair_file(tmp_path, [("一", "二", 0), ("三", "四", 2.5), ("五", "六", 5)])
    data = task.read(path, None, training=True)
    split = task.features(data, _pair_tokenizer())
    assert [r["labels"] for r in split.rows] == [0.0, 2.5, 5.0]
    assert task.head(data.labels) == Head("sequence_classification", 1, "regression")
    outputs = task.row_outputs(SimpleNamespace(logits=torch.tensor([[1.0], [2.0], [6.0]])), [5, 5, 5])
    predictions = task.decode(split, outputs)
    assert predictions == [1.0, 2.0, 6.0]
    scores = task.score(split, predictions)
    assert scores["mse"] == pytest.approx((1 + 0.25 + 1) / 3) and scores["spearman"] == pytest.approx(1.0)
    assert scores["pearson"] == pytest.approx(np.corrcoef([1, 2, 6], [0, 2.5, 5])[0, 1])


def test_classification_truncates_longest_first():
    assert truncate_pair([1, 2, 3, 4], [5, 6], 4) == ([1, 2], [5, 6])
    assert truncate_pair([1, 2], [5, 6, 7], 3) == ([1, 2], [5])  # the longer first; b on ties
    assert truncate_pair([1, 2, 3], None, 2) == ([1, 2], None)
