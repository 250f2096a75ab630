"""CMRC 2018: reader (answer_start repair), sliding-window features and answer post-processing,
on the real files in ../shared/data (skipped when absent) and on synthetic data; ``SpanTask``
from file to rows, answers, scores and the predictions file."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import BertWordPieceTokenizer

from lub_fast.tasks import TaskDataError, load_task
from lub_fast.tasks.base import Head
from lub_fast.tasks.cmrc2018 import (
    REPAIR_NO_VERBATIM,
    REPAIR_NOT_VERBATIM,
    REPAIR_START,
    QAExample,
    SpanTask,
    build_features,
    locate_answer,
    postprocess,
    trainable_questions,
)
from lub_fast.tasks.io import write_cmrc2018_predictions
from lub_fast.tasks.metrics import cmrc2018_score

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
TRIAL = DATA / "cmrc2018" / "cmrc2018_trial.json"


def _tokenizer(texts):
    chars = sorted({c.lower() for t in texts for c in t if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars if c.isascii()]
    return BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True)


def _oracle_logits(features):
    starts, ends = [], []
    for f in features:
        s = np.full(len(f.input_ids), -5.0)
        e = s.copy()
        s[f.start_position] = e[f.end_position] = 5.0
        starts.append(s)
        ends.append(e)
    return starts, ends


@needs_data
def test_cmrc2018_real_files_counts_and_answer_repair():
    trial = load_task("cmrc2018", TRIAL)
    assert len(trial.examples) == 1002 and trial.has_labels and trial.skipped == {}
    with open(TRIAL, encoding="utf-8") as f:
        raw = {qa["id"]: qa["answers"][0] for a in json.load(f)["data"] for p in a["paragraphs"] for qa in p["qas"]}
    moved = [e for e in trial.examples if e.answer_starts[0] != raw[e.id]["answer_start"]]
    assert len(moved) == 5, f"{len(moved)} official answer_start values repaired"  # 0.5% of 1002
    assert trial.repairs == {REPAIR_START: [e.id for e in moved]}, trial.repairs
    for e in trial.examples:
        assert e.context[e.answer_starts[0] :].startswith(e.answers[0])
    deer = load_task("cmrc2018", DATA / "cmrc2018" / "cmrc2018_train_first30docs_DeerEyre.json")
    assert len(deer.examples) == 122


@needs_data
def test_cmrc2018_features_map_answers_back_exactly():
    examples = load_task("cmrc2018", TRIAL).examples[:150]
    tok = _tokenizer([e.context + e.question for e in examples])
    features = build_features(examples, tok, max_seq_len=512, doc_stride=128, max_query_len=64)
    assert len(features) > len(examples)  # long contexts need several windows
    assert all(len(f.input_ids) <= 512 and len(f.token_type_ids) == len(f.input_ids) for f in features)
    predictions = postprocess(features, *_oracle_logits(features), max_answer_len=512)
    # a token-aligned gold span comes back as the exact context substring
    exact = sum(predictions[e.id] == e.answers[0].strip() for e in examples)
    assert exact >= 148, f"{exact} of 150 recovered exactly"
    scores = cmrc2018_score(TRIAL, predictions)
    assert scores["skipped"] == 1002 - 150 and scores["em"] == pytest.approx(100 * exact / 1002)


def test_cmrc2018_windows_stride_and_max_context():
    context = "".join(chr(0x4E00 + i) for i in range(40))
    example = QAExample("q", "问题", context, (context[30:33],), (30,))
    tok = _tokenizer([context, "问题"])
    features = build_features([example], tok, max_seq_len=20, doc_stride=8, max_query_len=4)
    # 20 - 2 query - 3 specials = 15 context tokens a window, windows start 8 apart until one
    # reaches the end: 0..14, 8..22, 16..30, 24..38, 32..39
    starts = [f.offsets[4][0] for f in features]
    assert starts == [0, 8, 16, 24, 32]
    assert features[-1].offsets[-2] == (39, 40)
    # every context token is max-context in exactly one window
    owners = {}
    for k, f in enumerate(features):
        for off, flag in zip(f.offsets, f.max_context):
            if flag:
                assert off[0] not in owners
                owners[off[0]] = k
    assert sorted(owners) == list(range(40))
    positions = [(f.start_position, f.end_position) for f in features]
    assert positions == [(0, 0), (0, 0), (0, 0), (10, 12), (0, 0)]  # answer 30..32 only in 24..38
    predictions = postprocess(features, *_oracle_logits(features))
    assert predictions == {"q": context[30:33]}


def test_cmrc2018_postprocess_limits():
    context = "甲乙丙丁戊"
    tok = _tokenizer([context, "问"])
    (feature,) = build_features([QAExample("q", "问", context, (), ())], tok, max_seq_len=16, max_query_len=4)
    n = len(feature.input_ids)  # [CLS] 问 [SEP] 甲乙丙丁戊 [SEP]
    start, end = np.zeros(n), np.zeros(n)
    start[0] = end[0] = 50.0  # [CLS] is never an answer
    start[3], end[7] = 10.0, 10.0  # 甲..戊 is 5 tokens long
    start[6] = 9.0  # 丁戊 scores 19, second to 甲..戊's 20
    assert postprocess([feature], [start], [end], max_answer_len=5) == {"q": "甲乙丙丁戊"}
    assert postprocess([feature], [start], [end], max_answer_len=4) == {"q": "丁戊"}
    padded = [np.r_[start, np.full(10, 99.0)]]  # padded positions are ignored
    assert postprocess([feature], padded, [np.r_[end, np.zeros(10)]], max_answer_len=4) == {"q": "丁戊"}
    none = np.full(n, -1.0)
    none[4], end_only = 5.0, np.zeros(n)
    end_only[3] = 5.0  # best end before best start and n_best=1: no valid span
    assert postprocess([feature], [none], [end_only], n_best=1) == {"q": ""}


def test_cmrc2018_english_offsets_keep_original_text():
    context = "苹果公司发布了 iPhone X 手机。"
    tok = _tokenizer([context, "什么"])
    example = QAExample("q", "什么", context, ("iPhone X",), (8,))
    (feature,) = build_features([example], tok, max_seq_len=64, max_query_len=8)
    assert postprocess([feature], *_oracle_logits([feature])) == {"q": "iPhone X"}


def test_cmrc2018_locate_answer_nearest():
    context = "北京到北京再到北京"
    assert locate_answer(context, "北京", 3) == 3
    assert locate_answer(context, "北京", 6) == 7
    assert locate_answer(context, "北京", 1) == 0
    assert locate_answer(context, "上海", 0) is None


def _squad(qas, context="北京大学在北京。"):
    return {"version": "v1.0", "data": [{"id": "d", "title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


def test_cmrc2018_bad_input(tmp_path):
    path = tmp_path / "bad.json"
    qas = [{"id": "q1", "question": "哪里", "answers": [{"text": "", "answer_start": 3}]}]
    path.write_text(json.dumps(_squad(qas), ensure_ascii=False), encoding="utf-8")
    with pytest.raises(TaskDataError, match="empty answer text.*q1"):
        load_task("cmrc2018", path)
    twice = tmp_path / "twice.json"
    qas = [{"id": "q1", "question": "哪里", "answers": [{"text": "北京", "answer_start": 0}]}] * 2
    twice.write_text(json.dumps(_squad(qas), ensure_ascii=False), encoding="utf-8")
    with pytest.raises(TaskDataError, match="twice.json: duplicate question id.*q1"):
        load_task("cmrc2018", twice)
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(TaskDataError, match="broken.json:1: malformed json"):
        load_task("cmrc2018", broken)
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps(_squad([{"id": "t1", "question": "哪里"}]), ensure_ascii=False), encoding="utf-8")
    data = load_task("cmrc2018", test_file)
    assert not data.has_labels and data.examples[0].answers == () and data.repairs == {}


def test_cmrc2018_non_verbatim_answers_kept_for_scoring_not_training(tmp_path):
    path = tmp_path / "dev.json"
    qas = [
        {"id": "q1", "question": "哪里", "answers": [{"text": "北京大學", "answer_start": 0}, {"text": "北京大学", "answer_start": 0}]},
        {"id": "q2", "question": "哪里", "answers": [{"text": "上海", "answer_start": 0}]},
        {"id": "q3", "question": "多少", "answers": [{"text": 39764.0, "answer_start": 9}, {"text": "39764", "answer_start": 9}]},
    ]  # fmt: skip
    path.write_text(json.dumps(_squad(qas, "北京大学在北京，有学生39764人。"), ensure_ascii=False), encoding="utf-8")
    data = load_task("cmrc2018", path)
    assert [e.answers for e in data.examples] == [("北京大學", "北京大学"), ("上海",), ("39764.0", "39764")]
    assert [e.answer_starts for e in data.examples] == [(None, 0), (None,), (None, 11)]
    assert [e.train_answer for e in data.examples] == [("北京大学", 0), None, ("39764", 11)]
    assert data.skipped == {}
    assert data.repairs == {REPAIR_START: ["q3"], REPAIR_NOT_VERBATIM: ["q1", "q2", "q3"], REPAIR_NO_VERBATIM: ["q2"]}
    train = trainable_questions(data)
    assert [e.id for e in train.examples] == ["q1", "q3"] and train.skipped == {REPAIR_NO_VERBATIM: 1}
    # scored over all 3 questions and every gold answer: "39764.0" is gold, so it is an exact match
    scores = cmrc2018_score(data.examples, {"q1": "北京大學", "q2": "上海", "q3": "39764.0"})
    assert (scores["total"], scores["em"], scores["f1"]) == (3, 100.0, 100.0), scores
    assert scores == cmrc2018_score(path, {"q1": "北京大學", "q2": "上海", "q3": "39764.0"})


_TRADITIONAL = str.maketrans("国学会门东来时间说发书长车马经华语对开关", "國學會門東來時間說發書長車馬經華語對開關")


def _dev_style(trial):
    """The trial file with non-verbatim alternative answers as the official dev set has them: a
    traditional form or a '.0' number (first for even questions, last for odd ones), and three
    questions whose every answer is one. Returns `(data, ids with an alternative, ids of the three)`."""
    data = json.loads(json.dumps(trial))
    added, only = [], []
    k = 0
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                text = qa["answers"][0]["text"]
                if text.translate(_TRADITIONAL) != text:
                    variant = text.translate(_TRADITIONAL)
                elif text.isdigit():
                    variant = text + ".0"
                else:
                    continue
                if variant in paragraph["context"]:
                    continue
                alternative = {"text": variant, "answer_start": qa["answers"][0]["answer_start"]}
                if len(only) < 3 and k % 7 == 3:
                    qa["answers"] = [alternative]
                    only.append(qa["id"])
                elif k % 2:
                    qa["answers"].append(alternative)
                else:
                    qa["answers"].insert(0, alternative)
                added.append(qa["id"])
                k += 1
    return data, added, only


@needs_data
def test_cmrc2018_dev_style_file_keeps_every_question_and_answer(tmp_path):
    with open(TRIAL, encoding="utf-8") as f:
        dev, added, only = _dev_style(json.load(f))
    path = tmp_path / "dev_style.json"
    path.write_text(json.dumps(dev, ensure_ascii=False), encoding="utf-8")
    assert len(added) > 50 and len(only) == 3, (len(added), only)
    data = load_task("cmrc2018", path)
    assert len(data.examples) == 1002 and data.skipped == {}
    assert sorted(data.repairs[REPAIR_NOT_VERBATIM]) == sorted(added)
    assert data.repairs[REPAIR_NO_VERBATIM] == only
    qas = [qa for article in dev["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    raw = {qa["id"].strip(): [a["text"] for a in qa["answers"]] for qa in qas}
    for e in data.examples:
        assert list(e.answers) == raw[e.id], e.id
        if e.id not in only:
            text, start = e.train_answer
            assert text == next(t for t in raw[e.id] if t in e.context) and e.context[start:].startswith(text), e.id
    assert len(trainable_questions(data).examples) == 1002 - 3
    # predictions: the non-verbatim answer, the verbatim one, a wrong span or nothing (""), in turn
    predictions = {}
    for k, e in enumerate(data.examples):
        predictions[e.id] = [e.answers[0], e.answers[-1], e.context[:6], ""][k % 4]
    ours = cmrc2018_score(data.examples, predictions)
    official = cmrc2018_score(path, predictions)  # the official script's loop over the raw file
    assert ours == official and ours["total"] == 1002 and ours["skipped"] == 0, (ours, official)
    exact = sum(predictions[e.id] in e.answers for e in data.examples)
    assert ours["em"] >= 100 * exact / 1002, (ours, exact)


def test_write_cmrc2018_predictions_scores_back(tmp_path):
    qas = [{"id": "q1", "question": "哪里", "answers": [{"text": "北京大学", "answer_start": 0}]}]
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps(_squad(qas), ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "pred.json"
    write_cmrc2018_predictions(out, {"q1": "北京大学"})
    with open(out, encoding="utf-8") as f:
        predictions = json.load(f)
    assert cmrc2018_score(gold, predictions)["em"] == 100.0
    assert cmrc2018_score(load_task("cmrc2018", gold).examples, predictions)["f1"] == 100.0


def test_cmrc2018_span_task_trains_on_verbatim_answers_and_decodes_them_back(tmp_path):
    context = "北京大学在北京，有学生三万人。上海交通大学在上海，也有学生三万人。"
    answer = {"北京": context.index("在北京") + 1, "上海": context.index("在上海") + 1}
    qas = [
        {"id": "q1", "question": "北大在哪", "answers": [{"text": "北京", "answer_start": answer["北京"]}]},
        {"id": "q2", "question": "交大在哪", "answers": [{"text": "上海", "answer_start": answer["上海"]}]},
        {"id": "q3", "question": "多少人", "answers": [{"text": "3万人", "answer_start": 0}]},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_squad(qas, context), ensure_ascii=False), encoding="utf-8")
    task = SpanTask(max_seq_len=20, doc_stride=6, max_query_len=6, n_best=5, max_answer_len=8)
    assert [e.id for e in task.read(str(path), None).examples] == ["q1", "q2", "q3"]
    data = task.read(str(path), None, training=True)
    assert [e.id for e in data.examples] == ["q1", "q2"] and data.skipped == {REPAIR_NO_VERBATIM: 1}
    split = task.features(data, _tokenizer([context] + [q["question"] for q in qas]))
    assert len(split.rows) == len(split.windows) > 2 * 2, "each question's context needs several windows"
    holding = [r for r in split.rows if r["start_positions"] > 0]
    assert len(holding) >= 2 and all(len(r["input_ids"]) <= 20 for r in split.rows)
    # oracle logits over a padded batch: +5 at the gold start/end of each row ([CLS] when absent)
    lengths = [len(r["input_ids"]) for r in split.rows]
    starts = torch.full((len(lengths), max(lengths)), -5.0)
    ends = starts.clone()
    for k, row in enumerate(split.rows):
        starts[k, row["start_positions"]] = ends[k, row["end_positions"]] = 5.0
    outputs = task.row_outputs(SimpleNamespace(start_logits=starts, end_logits=ends), lengths)
    assert [len(s) for s, _ in outputs] == lengths
    predictions = task.decode(split, outputs)
    assert predictions == {"q1": "北京", "q2": "上海"}
    scores = task.score(split, predictions)
    assert (scores["total"], scores["em"], scores["f1"]) == (2, 100.0, 100.0), scores
    assert task.score(split, {"q1": "北京", "q2": "北京"})["em"] == 50.0
    assert task.head(None) == Head("question_answering") and task.prediction_suffix == ".json"
    task.write_predictions(tmp_path / "p.json", split, predictions)
    assert json.loads((tmp_path / "p.json").read_text(encoding="utf-8")) == predictions
