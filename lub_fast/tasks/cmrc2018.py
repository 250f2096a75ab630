"""CMRC 2018 span-extraction reading comprehension: reader, sliding-window features, answers,
and its ``Task`` (``SpanTask``).

Data: SQuAD v1.1 json (Cui et al. 2019, "A Span-Extraction Dataset for Chinese Machine Reading
Comprehension", https://github.com/ymcui/cmrc2018). The files as published need two repairs,
both counted in `TaskData.repairs` (rule -> question ids), never silent:
- about 0.5% of the official `answer_start` values do not point at the answer text;
  `locate_answer` moves each to the occurrence of the text nearest the given start;
- 174 of the 3219 dev questions (5.4%) have a gold answer that is not a verbatim span of the
  context (`39764.0` for `39764`, a traditional form of a character); each also has one that is.
  Such an answer is kept for scoring (the official scorer takes the best over every gold answer)
  and not trained on: training uses a question's first verbatim answer. A question with no
  verbatim answer at all is kept for scoring and left out of training by `trainable_questions`.

Features follow Google BERT's `run_squad.py` (Devlin et al. 2019): `[CLS] question [SEP] window
[SEP]`, the question cut to `max_query_len` tokens, context windows of what is left of
`max_seq_len`, each window starting `doc_stride` tokens after the previous one, and a token's
answers taken only from the window where it has the most context on both sides. Context tokens
carry character offsets from HF `tokenizers`, so an answer is an exact substring of the context.
"""

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

from lub_fast.tasks.base import Head, Split, backend_tokenizer, special_id
from lub_fast.tasks.io import BadLines, TaskData, TaskDataError, write_cmrc2018_predictions
from lub_fast.tasks.metrics import cmrc2018_score, py2_str


@dataclass(frozen=True)
class QAExample:
    """One question. `answers`: every gold text as published (the scorer takes the best over
    them); `answer_starts[k]`: the (corrected) character start of `answers[k]` in `context`, None
    when that answer is not a verbatim span of it."""

    id: str
    question: str
    context: str
    answers: tuple
    answer_starts: tuple
    title: str = ""

    @property
    def train_answer(self):
        """`(text, start)` of the first verbatim gold answer, None when there is none."""
        for text, start in zip(self.answers, self.answer_starts):
            if start is not None:
                return text, start
        return None


@dataclass(frozen=True)
class QAFeature:
    """One window of one question; positions index `input_ids` (0 = [CLS]: no answer in window).

    `offsets[k]`: `(start, end)` characters of context token k, None for question/special tokens.
    `max_context[k]`: this window is the one where token k sees the most context.
    """

    example_index: int
    example_id: str
    context: str
    input_ids: tuple
    token_type_ids: tuple
    offsets: tuple
    max_context: tuple
    start_position: int
    end_position: int


def locate_answer(context, text, start):
    """The start of `text` in `context` nearest to `start` (itself if it matches), None if absent."""
    if context[start : start + len(text)] == text:
        return start
    best, pos = None, context.find(text)
    while pos != -1:
        if best is None or abs(pos - start) < abs(best - start):
            best = pos
        pos = context.find(text, pos + 1)
    return best


REPAIR_START = "answer_start corrected to the answer text"
REPAIR_NOT_VERBATIM = "gold answer not a verbatim span of the context (scored, not trained on)"
REPAIR_NO_VERBATIM = "question with no verbatim gold answer (scored, not trained on)"


def _answer_text(value):
    # the official scorer applies Python 2's str() to a json number
    return py2_str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def load_cmrc2018(path, skip_bad=False):
    """Read a SQuAD-v1 CMRC 2018 file. Errors name the file and the question id.

    Every question is kept with every gold answer (see the module docstring for the repairs, in
    `TaskData.repairs`). A question without answers is kept with `answers=()` (test files);
    `has_labels` is True when any question has answers. Question ids must be unique (predictions
    are keyed by id).
    """
    path = os.fspath(path)
    bad = BadLines(path, skip_bad)
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise TaskDataError(path, exc.lineno, "malformed json", exc.msg) from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise TaskDataError(path, 0, "not SQuAD json: no 'data' list")
    examples, seen = [], set()
    repairs = {REPAIR_START: [], REPAIR_NOT_VERBATIM: [], REPAIR_NO_VERBATIM: []}
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            for qa in paragraph.get("qas", []):
                qid = str(qa.get("id", "")).strip()
                # an empty question is kept: the official trial set has one and its scorer counts it
                if not qid or not isinstance(context, str) or not context.strip() or not isinstance(qa.get("question"), str):
                    bad.bad(0, "missing id, question or context", f"question {qid!r}")
                    continue
                if qid in seen:
                    bad.bad(0, "duplicate question id (predictions are keyed by id)", f"question {qid!r}")
                    continue
                texts, starts = [], []
                for answer in qa.get("answers", []):
                    text, start = _answer_text(answer.get("text")), answer.get("answer_start")
                    if not isinstance(text, str) or not text.strip():
                        bad.bad(0, "empty answer text", f"question {qid!r}")
                        break
                    given = int(start) if isinstance(start, (int, float)) else None
                    where = locate_answer(context, text, given if given is not None else 0)
                    if where is None:
                        repairs[REPAIR_NOT_VERBATIM].append(qid)
                    elif where != given:
                        repairs[REPAIR_START].append(qid)
                    texts.append(text)
                    starts.append(where)
                else:
                    seen.add(qid)
                    title = article.get("title", "")
                    example = QAExample(qid, qa["question"], context, tuple(texts), tuple(starts), title)
                    if texts and example.train_answer is None:
                        repairs[REPAIR_NO_VERBATIM].append(qid)
                    examples.append(example)
    has_labels = any(e.answers for e in examples)
    repairs = {rule: ids for rule, ids in repairs.items() if ids}
    return TaskData("cmrc2018", path, examples, None, has_labels, dict(bad.skipped), repairs)


def trainable_questions(data):
    """`data` for training: the questions with a verbatim gold answer; the others (named in
    `data.repairs`) are counted in `skipped`."""
    kept = [e for e in data.examples if e.train_answer is not None]
    skipped = dict(data.skipped)
    if len(kept) < len(data.examples):
        skipped[REPAIR_NO_VERBATIM] = len(data.examples) - len(kept)
    return dataclasses.replace(data, examples=kept, skipped=skipped)


def _windows(n_tokens, max_tokens, doc_stride):
    windows, start = [], 0
    while True:
        length = min(n_tokens - start, max_tokens)
        windows.append((start, length))
        if start + length >= n_tokens:
            return windows
        start += min(length, doc_stride)


def _max_context(windows, k, position):
    """BERT's `_check_is_max_context`: is window k the best one for the token at `position`?"""
    best, best_score = None, None
    for w, (start, length) in enumerate(windows):
        end = start + length - 1
        if not start <= position <= end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best, best_score = w, score
    return best == k


def build_features(examples, tokenizer, max_seq_len=512, doc_stride=128, max_query_len=64):
    """Sliding-window features of `examples` (`QAExample`s) for a BERT-style span model.

    `tokenizer`: an HF `tokenizers.Tokenizer` (or a transformers fast tokenizer) with a BERT
    WordPiece vocab holding [CLS] and [SEP]. Training positions use each example's first verbatim
    answer (`QAExample.train_answer`); a window that does not hold the whole answer, and every
    window of a question without one, points at [CLS] (0).
    """
    if max_seq_len < max_query_len + 4:
        raise ValueError(f"max_seq_len {max_seq_len} leaves no room for context after max_query_len {max_query_len}")
    if doc_stride < 1:
        raise ValueError(f"doc_stride must be >= 1, got {doc_stride}")
    backend = backend_tokenizer(tokenizer)
    cls_id, sep_id = special_id(tokenizer, "[CLS]"), special_id(tokenizer, "[SEP]")
    features = []
    for index, example in enumerate(examples):
        query = backend.encode(example.question, add_special_tokens=False).ids[:max_query_len]
        encoding = backend.encode(example.context, add_special_tokens=False)
        context_ids, context_offsets = encoding.ids, encoding.offsets
        answer_tokens = None
        if example.train_answer is not None:
            a_text, a_start = example.train_answer
            a_end = a_start + len(a_text)
            covering = [k for k, (s, e) in enumerate(context_offsets) if s < a_end and e > a_start]
            if covering:
                answer_tokens = (covering[0], covering[-1])
        windows = _windows(len(context_ids), max_seq_len - len(query) - 3, doc_stride)
        head = [cls_id] + list(query) + [sep_id]
        for k, (start, length) in enumerate(windows):
            ids = head + list(context_ids[start : start + length]) + [sep_id]
            offsets = [None] * len(head) + [tuple(o) for o in context_offsets[start : start + length]] + [None]
            flags = [False] * len(head) + [_max_context(windows, k, start + i) for i in range(length)] + [False]
            start_pos = end_pos = 0
            if answer_tokens is not None and start <= answer_tokens[0] and answer_tokens[1] < start + length:
                start_pos = answer_tokens[0] - start + len(head)
                end_pos = answer_tokens[1] - start + len(head)
            types = [0] * len(head) + [1] * (length + 1)
            features.append(QAFeature(index, example.id, example.context, tuple(ids), tuple(types), tuple(offsets), tuple(flags), start_pos, end_pos))
    return features


def postprocess(features, start_logits, end_logits, n_best=20, max_answer_len=30):
    """Best answer per question over all its windows: `{question_id: context substring}`.

    `start_logits[i]`, `end_logits[i]`: 1-D scores over feature i's tokens (extra padded positions
    are ignored). Candidates: the `n_best` top starts x `n_best` top ends of each window, both on
    context tokens, start where the window has max context, `start <= end < start +
    max_answer_len`; score = start + end logit. A question with no candidate gets "".
    """
    if not len(features) == len(start_logits) == len(end_logits):
        raise ValueError(f"{len(features)} features, {len(start_logits)} start and {len(end_logits)} end logit rows")
    best = {}
    for feature, s_row, e_row in zip(features, start_logits, end_logits):
        n = len(feature.input_ids)
        s_row = np.asarray(s_row, dtype=np.float64)[:n]
        e_row = np.asarray(e_row, dtype=np.float64)[:n]
        best.setdefault(feature.example_id, (-np.inf, ""))
        starts = np.argsort(-s_row, kind="stable")[:n_best]
        ends = np.argsort(-e_row, kind="stable")[:n_best]
        for i in starts:
            if feature.offsets[i] is None or not feature.max_context[i]:
                continue
            for j in ends:
                if feature.offsets[j] is None or j < i or j - i + 1 > max_answer_len:
                    continue
                score = s_row[i] + e_row[j]
                if score > best[feature.example_id][0]:
                    text = feature.context[feature.offsets[i][0] : feature.offsets[j][1]]
                    best[feature.example_id] = (score, text)
    return {qid: text for qid, (_, text) in best.items()}


@dataclass(frozen=True)
class SpanTask:
    """The CMRC 2018 ``Task`` (``lub_fast.tasks.base``): ``build_features`` windows, trained on
    each question's first verbatim answer (``trainable_questions``), answers by ``postprocess``,
    scored as the official scorer (``lub_fast.tasks.metrics.cmrc2018_score``)."""

    max_seq_len: int
    doc_stride: int
    max_query_len: int
    n_best: int
    max_answer_len: int
    skip_bad: bool = False
    prediction_suffix = ".json"

    def read(self, path, labels, training=False) -> TaskData:
        data = load_cmrc2018(path, skip_bad=self.skip_bad)
        return trainable_questions(data) if training else data

    def features(self, data, tokenizer) -> Split:
        windows = build_features(data.examples, tokenizer, self.max_seq_len, self.doc_stride, self.max_query_len)
        rows = [
            {
                "input_ids": list(w.input_ids),
                "token_type_ids": list(w.token_type_ids),
                "start_positions": w.start_position,
                "end_positions": w.end_position,
            }
            for w in windows
        ]
        return Split(data, rows, windows=windows)

    def head(self, labels) -> Head:
        return Head("question_answering")

    def row_outputs(self, output, lengths) -> list:
        starts, ends = output.start_logits.float().cpu().numpy(), output.end_logits.float().cpu().numpy()
        return [(s[:n], e[:n]) for s, e, n in zip(starts, ends, lengths)]

    def decode(self, split, outputs) -> dict:
        starts, ends = [o[0] for o in outputs], [o[1] for o in outputs]
        return postprocess(split.windows, starts, ends, n_best=self.n_best, max_answer_len=self.max_answer_len)

    def score(self, split, predictions) -> dict:
        return cmrc2018_score(split.data.examples, predictions)

    def write_predictions(self, path, split, predictions, submission=False) -> None:
        write_cmrc2018_predictions(path, predictions)
