"""CMRC 2018 span-extraction reading comprehension: reader, sliding-window features, answers.

Data: SQuAD v1.1 json (Cui et al. 2019, "A Span-Extraction Dataset for Chinese Machine Reading
Comprehension", https://github.com/ymcui/cmrc2018). About 0.5% of the official `answer_start`
values do not point at the answer text; `locate_answer` moves each to the occurrence of the text
nearest the given start.

Features follow Google BERT's `run_squad.py` (Devlin et al. 2019): `[CLS] question [SEP] window
[SEP]`, the question cut to `max_query_len` tokens, context windows of what is left of
`max_seq_len`, each window starting `doc_stride` tokens after the previous one, and a token's
answers taken only from the window where it has the most context on both sides. Context tokens
carry character offsets from HF `tokenizers`, so an answer is an exact substring of the context.
"""

import json
import os
from dataclasses import dataclass

import numpy as np

from lub_fast.tasks.io import BadLines, TaskData, TaskDataError


@dataclass(frozen=True)
class QAExample:
    """One question. `answers`/`answer_starts`: gold texts and their (corrected) character starts."""

    id: str
    question: str
    context: str
    answers: tuple
    answer_starts: tuple
    title: str = ""


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


def load_cmrc2018(path, skip_bad=False):
    """Read a SQuAD-v1 CMRC 2018 file. Errors name the file and the question id.

    A question without answers is kept with `answers=()` (test files); `has_labels` is True when
    any question has answers.
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
    examples = []
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            for qa in paragraph.get("qas", []):
                qid = str(qa.get("id", "")).strip()
                # an empty question is kept: the official trial set has one and its scorer counts it
                if not qid or not isinstance(context, str) or not context.strip() or not isinstance(qa.get("question"), str):
                    bad.bad(0, "missing id, question or context", f"question {qid!r}")
                    continue
                texts, starts = [], []
                for answer in qa.get("answers", []):
                    text, start = answer.get("text"), answer.get("answer_start")
                    if not isinstance(text, str) or not text.strip():
                        bad.bad(0, "empty answer text", f"question {qid!r}")
                        break
                    where = locate_answer(context, text, int(start) if isinstance(start, (int, float)) else 0)
                    if where is None:
                        bad.bad(0, "answer text not in context", f"question {qid!r}: {text!r}")
                        break
                    texts.append(text)
                    starts.append(where)
                else:
                    examples.append(QAExample(qid, qa["question"], context, tuple(texts), tuple(starts), article.get("title", "")))
    has_labels = any(e.answers for e in examples)
    return TaskData("cmrc2018", path, examples, None, has_labels, dict(bad.skipped))


def backend_tokenizer(tokenizer):
    # a transformers PreTrainedTokenizerFast wraps a tokenizers.Tokenizer
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def special_id(tokenizer, token):
    """Vocabulary id of a special token such as '[CLS]'; ValueError when the vocab lacks it."""
    i = backend_tokenizer(tokenizer).token_to_id(token)
    if i is None:
        raise ValueError(f"tokenizer has no {token!r} token")
    return i


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
    WordPiece vocab holding [CLS] and [SEP]. Training positions use each example's first answer;
    a window that does not hold the whole answer points at [CLS] (0).
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
        if example.answers:
            a_start = example.answer_starts[0]
            a_end = a_start + len(example.answers[0])
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
