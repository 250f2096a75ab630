"""CMRC 2018: reader (answer_start repair), sliding-window features and answer post-processing,
on the real files in ../shared/data (skipped when absent) and on synthetic data."""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import BertWordPieceTokenizer

from lub_fast.tasks import TaskDataError, load_task
from lub_fast.tasks.cmrc2018 import QAExample, build_features, locate_answer, postprocess
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
    qas = [
        {"id": "q1", "question": "哪里", "answers": [{"text": "北京大学", "answer_start": 3}]},
        {"id": "q2", "question": "哪里", "answers": [{"text": "上海", "answer_start": 0}]},
    ]
    path.write_text(json.dumps(_squad(qas), ensure_ascii=False), encoding="utf-8")
    with pytest.raises(TaskDataError, match="answer text not in context.*q2"):
        load_task("cmrc2018", path)
    data = load_task("cmrc2018", path, skip_bad=True)
    assert [e.answer_starts for e in data.examples] == [(0,)]
    assert data.skipped == {"answer text not in context": 1}
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(TaskDataError, match="broken.json:1: malformed json"):
        load_task("cmrc2018", broken)
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps(_squad([{"id": "t1", "question": "哪里"}]), ensure_ascii=False), encoding="utf-8")
    data = load_task("cmrc2018", test_file)
    assert not data.has_labels and data.examples[0].answers == ()


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
