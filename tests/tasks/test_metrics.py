"""Metrics: hand-checked values, scipy/scikit-learn/seqeval cross-checks when installed, and the
CMRC 2018 scorer on cases worked out by hand from the official script's rules."""

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from lub_fast.tasks import metrics as M

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CMRC_FILES = [DATA / "cmrc2018/cmrc2018_trial.json", DATA / "cmrc2018/cmrc2018_train_first30docs_DeerEyre.json"]


def test_accuracy_macro_f1_hand_values():
    golds = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "b"]
    assert M.accuracy(preds, golds) == 0.5
    # F1 per class: a = 2*1/(1+2) = 2/3, b = 2*1/(3+1) = 1/2, c = 0
    assert M.macro_f1(preds, golds) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    with pytest.raises(ValueError):
        M.accuracy(["a"], ["a", "b"])


def test_macro_f1_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(20):
        golds = [rng.choice("abcd") for _ in range(50)]
        preds = [rng.choice("abcde") for _ in range(50)]
        ours = M.macro_f1(preds, golds)
        theirs = sklearn_metrics.f1_score(golds, preds, average="macro", zero_division=0)
        assert ours == pytest.approx(theirs), f"{ours} vs sklearn {theirs}"


def test_pearson_spearman_hand_values_and_ties():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # monotone but non-linear: Spearman 1, Pearson below 1
    x, y = [1, 2, 3, 4], [1, 10, 100, 1000]
    assert M.spearman(x, y) == pytest.approx(1.0)
    assert M.pearson(x, y) < 0.9
    assert np.isnan(M.pearson([1, 1, 1], [1, 2, 3]))


def test_pearson_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(10):
        x = rng.integers(0, 6, size=200).astype(float)  # many ties, as STS-B scores have
        y = x + rng.normal(0, 1.5, size=200)
        assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


# NLTK 3.4.5 outputs (the last NLTK for Python 2, which the official scorer ran on), recorded
# from that release: word_tokenize(s, preserve_line=True) and untrained Punkt sentences.
NLTK_345_WORDS = [
    ("hello world", ["hello", "world"]),
    ("3.5%", ["3.5", "%"]),
    ("u.s.", ["u.s", "."]),
    ("don't stop", ["do", "n't", "stop"]),
    ('"quoted" text', ["``", "quoted", "''", "text"]),
    ("(dr. who) 2005", ["(", "dr.", "who", ")", "2005"]),
    ("1,000,000", ["1,000,000"]),
    ("a, b", ["a", ",", "b"]),
    ("it's 5:30", ["it", "'s", "5:30"]),
    ("cannot", ["can", "not"]),
    ("rock'n'roll", ["rock", "'", "n'roll"]),
    ("2000–01", ["2000–01"]),  # NLTK >= 3.6 would split the en dash: 3 tokens
    ("«x»", ["«", "x", "»"]),
]
# NLTK 3.4.5's word_tokenize (trained English Punkt, then Treebank) on lower-cased runs as the
# scorer feeds them, recorded from that release running with the punkt_tab English parameters
NLTK_345_TRAINED = [
    ("st. paul", ["st.", "paul"]),  # untrained Punkt: st / . / paul
    ("dr. max patel", ["dr.", "max", "patel"]),
    ("j.k. rowling", ["j.k.", "rowling"]),
    ("operators in the u.s. also flew", ["operators", "in", "the", "u.s.", "also", "flew"]),
    ("(dr. virginia apgar)", ["(", "dr.", "virginia", "apgar", ")"]),
    ('f. "liniflora"', ["f.", "``", "liniflora", "''"]),
    ("end. next", ["end", ".", "next"]),
    ("no. 5", ["no", ".", "5"]),
    ("jan. 2019", ["jan.", "2019"]),
    ("3. apples", ["3.", "apples"]),
    ("hey! say! jump", ["hey", "!", "say", "!", "jump"]),
    ("w. mellon", ["w.", "mellon"]),
    ("it ends here.", ["it", "ends", "here", "."]),
    ("!! asakara!", ["!", "!", "asakara", "!"]),  # NLTK >= 3.6 splits the sentences differently
]


@pytest.mark.parametrize("text,tokens", NLTK_345_WORDS)
def test_treebank_tokenize_matches_nltk_345(text, tokens):
    assert M.treebank_tokenize(text) == tokens


@pytest.mark.parametrize("text,tokens", NLTK_345_TRAINED)
def test_word_tokenize_trained_punkt_matches_nltk_345(text, tokens):
    assert M.word_tokenize(text) == tokens


def _english_runs(paths):
    """Every lower-cased non-CJK run of the contexts as the scorer cuts them, each followed by a
    random sub-run (a model's span may start or end anywhere)."""
    rng = random.Random(0)
    runs = []
    for path in paths:
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for paragraph in article["paragraphs"]:
                run = ""
                for char in paragraph["context"].lower().strip() + "中":
                    if re.search("[\u4e00-\u9fa5]", char) or char in M.CMRC_PUNCTUATION:
                        if re.search(r"[a-z0-9]", run):
                            i = rng.randrange(len(run))
                            runs += [run, run[i : rng.randrange(i, len(run)) + 1]]
                        run = ""
                    else:
                        run += char
    return runs


@pytest.mark.skipif(not all(p.exists() for p in CMRC_FILES), reason="../shared/data is absent")
def test_word_tokenize_matches_nltk_345_on_cmrc_contexts():
    runs = _english_runs(CMRC_FILES)
    tokens = [M.word_tokenize(r) for r in runs]
    digest = hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode()).hexdigest()
    # NLTK 3.4.5's word_tokenize (its own Punkt with the trained English parameters) on these runs
    assert (len(runs), digest) == (9780, "51474865ea03a7909dc0918d25b611411748d4180b4bfa1afbcf62f784dcf1ae")


def test_python2_str_and_strip():
    assert [M.py2_str(v) for v in (39764.0, 0.1 + 0.2, 1234567890123.0, 5, -2.0, 1e16)] == [
        "39764.0", "0.3", "1.23456789012e+12", "5", "-2.0", "1e+16"
    ]  # fmt: skip
    assert M.mixed_segmentation("\u180e北京 \u180e") == ["北", "京"]  # Python 3 strip() keeps U+180E
    assert M.remove_punctuation("\u0130STANBUL") == "istanbul"


def test_cmrc_mixed_segmentation_rules():
    assert M.mixed_segmentation("在2018年，IPhone X发布") == ["在", "2018", "年", "，", "iphone", "x", "发", "布"]
    # with rm_punc the listed marks vanish without splitting the run around them
    assert M.mixed_segmentation("covid-19疫情", rm_punc=True) == ["covid19", "疫", "情"]
    assert M.remove_punctuation(" 《红楼梦》… ") == "红楼梦…"


# (gold answers, prediction, F1 in 0..1, EM), each worked out by hand from the scorer's rules
CMRC_CASES = [
    (["北京大学"], "北京大学", 1.0, 1),
    (["北京大学"], "在北京大", 0.75, 0),  # LCS 北京大: P = R = 3/4
    (["Apple Inc."], "apple", 0.5, 0),  # gold tokens apple / inc / . : P 1, R 1/3
    (["1,000元"], "1000元", 0.5, 0),  # '1,000' != '1000', only 元 shared
    (["《红楼梦》"], "红楼梦", 1.0, 1),  # 《》 are listed punctuation
    (["1998年", "1998"], "1998", 1.0, 1),  # best over gold answers
    (["好…"], "好", 2 / 3, 0),  # '…' is not listed ('……' is, as one string): R 1/2
    (["covid-19"], "COVID19", 1.0, 1),
    (["约翰·史密斯"], "史密斯", 0.75, 0),  # · removed: gold 5 tokens, LCS 3: P 1, R 3/5
    (["中国"], "", 0.0, 0),
    (["St. Paul"], "St. Paul", 1.0, 1),
    (["St. Paul"], "St Paul", 0.5, 0),  # trained Punkt: gold st. / paul, prediction st / paul: P = R = 1/2
    (["St. Paul"], "St", 0.0, 0),  # untrained Punkt would give gold st / . / paul and F1 0.5
    (["位于St. Paul"], "St. Paul", 2 / 3, 0),  # gold 位 / 于 / st. / paul: P 1, R 1/2
]


@pytest.mark.parametrize("answers,prediction,f1,em", CMRC_CASES)
def test_cmrc2018_f1_em_hand_cases(answers, prediction, f1, em):
    assert M.cmrc2018_f1(answers, prediction) == pytest.approx(f1)
    assert M.cmrc2018_em(answers, prediction) == em


def test_cmrc2018_score_averages_over_all_questions():
    gold = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": "北京大学在北京。Apple Inc. 成立。",
                        "qas": [
                            {"id": "q1 ", "question": "?", "answers": [{"text": "北京大学", "answer_start": 0}]},
                            {"id": "q2", "question": "?", "answers": [{"text": "北京大学", "answer_start": 0}]},
                            {"id": "q3", "question": "?", "answers": [{"text": "Apple Inc.", "answer_start": 8}]},
                            {"id": "q4", "question": "?", "answers": [{"text": "北京", "answer_start": 5}]},
                        ],
                    }
                ]
            }
        ]
    }
    scores = M.cmrc2018_score(gold, {"q1": "北京大学", "q2": "在北京大", "q3": "apple"})
    assert scores["total"] == 4 and scores["skipped"] == 1
    assert scores["f1"] == pytest.approx(100 * (1 + 0.75 + 0.5 + 0) / 4)
    assert scores["em"] == pytest.approx(25.0)
    assert scores["average"] == pytest.approx((56.25 + 25) / 2)
