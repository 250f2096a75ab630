"""Chinese NER: readers, tagging schemes, spans, label alignment to WordPiece tokens, and its
``Task`` (``NerTask``).

Readers (chosen from the file's content):
- CLUENER 2020 json lines (https://github.com/CLUEbenchmark/CLUENER2020): `{"text", "label":
  {type: {entity: [[start, end], ...]}}}`, `end` inclusive; converted to tags (BIO by default).
- CoNLL, one character and its tag a line (`char tag` or `char\\ttag`), a blank line between
  sentences (People's Daily); Weibo NER (Peng & Dredze 2015, hltcoe/golden-horse) writes each
  character followed by its position in the word (`科0`, `p10`): the digits are dropped.
- Sentence/tag line pairs (MSRA as split by lemonhu): space-separated characters on one line and
  their tags on the matching line, either in two files (`sentences.txt`, `tags.txt`; pass either
  file or their folder; `sentences.txt` alone is unlabelled) or alternating in one file.
A file of tag lines only (a `tags.txt` without its `sentences.txt`, a tag set file) is an error.

Schemes: BIO, BIOES and BMES (M = I) and BIOS all decode through `tags_to_spans`, which is
seqeval's default-mode chunker (https://github.com/chakki-works/seqeval), so `entity_f1` matches
seqeval's default (CoNLL-eval) mode: an entity counts when its type, start and end all match,
precision/recall/F1 are micro-averaged over all entities.
"""

import os
import re
from dataclasses import dataclass

from lub_fast.ops.wwm import IGNORE_INDEX
from lub_fast.tasks.base import Head, Split, backend_tokenizer, special_id
from lub_fast.tasks.cmrc2018 import _max_context, _windows
from lub_fast.tasks.io import (
    BadLines,
    TaskData,
    TaskDataError,
    first_content_line,
    read_json_lines,
    read_lines,
    write_ner_predictions,
)

SCHEMES = ("bio", "bioes", "bmes")
_TAG = re.compile(r"^(O|[BIMES]-.+)$")


@dataclass(frozen=True)
class NerExample:
    """One sentence: `tokens` (one character each, bar rare data glitches), `tags` (None when
    unlabelled), `line`: 1-based line where the sentence starts."""

    id: object
    tokens: tuple
    tags: tuple | None
    line: int


# ---------------------------------------------------------------------------------------------
# Schemes and spans


def tags_to_spans(tags):
    """Entities of a tag sequence as `(type, start, end)`, `end` inclusive, in order.

    seqeval's default-mode `get_entities` with BMES's `M` read as `I`: an `I` after `O` or after
    another type starts an entity, a type change ends one, `E`/`S` end one.
    """
    spans = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate(list(tags) + ["O"]):
        tag = chunk[0]
        if tag == "M":
            tag = "I"
        kind = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _chunk_end(prev_tag, tag, prev_type, kind):
            spans.append((prev_type, begin, i - 1))
        if _chunk_start(prev_tag, tag, prev_type, kind):
            begin = i
        prev_tag, prev_type = tag, kind
    return spans


def entity_f1(gold_tags, pred_tags):
    """Entity-level micro precision/recall/F1 with exact span match, as seqeval's default mode.

    `gold_tags`, `pred_tags`: lists of tag sequences (one per sentence, equal lengths) in BIO,
    BIOES or BMES. Returns `{"precision", "recall", "f1"}` as fractions (0 when undefined) and
    the counts `gold`, `pred`, `correct`.
    """
    if len(gold_tags) != len(pred_tags):
        raise ValueError(f"{len(gold_tags)} gold sentences but {len(pred_tags)} predicted")
    gold, pred = set(), set()
    for k, (g, p) in enumerate(zip(gold_tags, pred_tags)):
        if len(g) != len(p):
            raise ValueError(f"sentence {k}: {len(g)} gold tags but {len(p)} predicted")
        gold.update((k,) + span for span in tags_to_spans(g))
        pred.update((k,) + span for span in tags_to_spans(p))
    correct = len(gold & pred)
    precision = correct / len(pred) if pred else 0.0
    recall = correct / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "gold": len(gold), "pred": len(pred), "correct": correct}


def _chunk_end(prev_tag, tag, prev_type, kind):
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != kind


def _chunk_start(prev_tag, tag, prev_type, kind):
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != kind


def spans_to_tags(length, spans, scheme="bio"):
    """Tags for `length` tokens from `(type, start, end)` spans (`end` inclusive, no overlaps).

    `scheme`: "bio" (B, I), "bioes" (B, I, E, S) or "bmes" (B, M, E, S).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    tags = ["O"] * length
    for kind, start, end in sorted(spans, key=lambda s: s[1]):
        if not 0 <= start <= end < length:
            raise ValueError(f"span {(kind, start, end)} outside 0..{length - 1}")
        if any(t != "O" for t in tags[start : end + 1]):
            raise ValueError(f"span {(kind, start, end)} overlaps another entity")
        inside = "M" if scheme == "bmes" else "I"
        if scheme == "bio":
            tags[start : end + 1] = [f"B-{kind}"] + [f"I-{kind}"] * (end - start)
        elif start == end:
            tags[start] = f"S-{kind}"
        else:
            tags[start : end + 1] = [f"B-{kind}"] + [f"{inside}-{kind}"] * (end - start - 1) + [f"E-{kind}"]
    return tags


def convert_tags(tags, scheme):
    """Re-tag a sequence in another scheme (through its spans)."""
    return spans_to_tags(len(tags), tags_to_spans(tags), scheme)


# ---------------------------------------------------------------------------------------------
# Readers


def _check_tags(bad, line, tags):
    wrong = [t for t in tags if not _TAG.match(t)]
    if wrong:
        bad.bad(line, "malformed tag (want O or B-/I-/M-/E-/S-TYPE)", repr(wrong[0]))
        return False
    return True


def _outermost(spans, bad):
    """Tags cannot nest: keep the longer of overlapping spans (earlier on ties), count the rest."""
    kept = []
    for span in sorted(spans, key=lambda s: (s[1], s[1] - s[2])):
        if kept and span[1] <= kept[-1][2]:
            bad.drop("nested entity dropped (tags cannot nest)")
            continue
        kept.append(span)
    return kept


def _read_cluener(path, bad, scheme):
    examples, labelled = [], None
    for number, obj in read_json_lines(path, bad):
        if labelled is None:
            labelled = "label" in obj
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            bad.bad(number, "missing or empty field 'text'")
            continue
        ident = obj.get("id", len(examples))
        if not labelled:
            examples.append(NerExample(ident, tuple(text), None, number))
            continue
        spans = []
        label = obj.get("label")
        try:
            for kind, entities in (label or {}).items():
                for entity, positions in entities.items():
                    for start, end in positions:
                        if text[start : end + 1] != entity:
                            raise ValueError(f"[{start}, {end}] is {text[start:end + 1]!r}, not {entity!r}")
                        spans.append((kind, start, end))
            tags = spans_to_tags(len(text), _outermost(spans, bad), scheme)
        except (AttributeError, TypeError, ValueError) as exc:
            bad.bad(number, "bad entity label", str(exc))
            continue
        examples.append(NerExample(ident, tuple(text), tuple(tags), number))
    return examples, bool(labelled)


def _split_conll(line):
    """`(token, tag)` of a CoNLL line; a token that is a space character survives."""
    m = re.match(r"^(.+)[ \t](\S+)$", line.rstrip())
    if m is None:
        return None
    return m.group(1).strip(" \t") or " ", m.group(2)


def _read_conll(path, bad):
    sentences, tokens, tags, start = [], [], [], None
    for number, text in list(read_lines(path)) + [(None, "")]:
        if not text.strip() or text.startswith("-DOCSTART-"):
            if tokens:
                sentences.append((start, tokens, tags))
            tokens, tags, start = [], [], None
            continue
        pair = _split_conll(text)
        if pair is None:
            bad.bad(number, "expected 'token tag' or 'token\\ttag'", repr(text))
            continue
        start = start or number
        tokens.append(pair[0])
        tags.append(pair[1])
    # Weibo NER: every token is a character plus its ASCII position digits ('p10' = 'p', 10)
    weibo = sentences and all(len(t) >= 2 and t[-1] in "0123456789" for _, toks, _ in sentences for t in toks)
    examples = []
    for start, toks, sentence_tags in sentences:
        if weibo:
            toks = [t.rstrip("0123456789") or t[0] for t in toks]
        if _check_tags(bad, start, sentence_tags):
            examples.append(NerExample(len(examples), tuple(toks), tuple(sentence_tags), start))
    return examples


PAIR_LAYOUT = "MSRA sentence/tag line pairs: sentences.txt (space-separated characters) and tags.txt beside it"


def _pair_files(path):
    """`(sentences.txt, tags.txt)` of the MSRA layout when `path` is its folder or either file."""
    if os.path.isdir(path):
        sentences = os.path.join(path, "sentences.txt")
        if not os.path.isfile(sentences):
            found = sorted(os.listdir(path))
            raise TaskDataError(path, 0, f"a folder is read as {PAIR_LAYOUT}", f"no sentences.txt: found {found[:10]}")
        return sentences, os.path.join(path, "tags.txt")
    folder, name = os.path.split(path)
    if name == "sentences.txt":
        return path, os.path.join(folder, "tags.txt")
    if name == "tags.txt" and os.path.isfile(os.path.join(folder, "sentences.txt")):
        return os.path.join(folder, "sentences.txt"), path
    return None


def _only_tags(path):
    """True when every non-blank line is made of tags only (a tags file or a tag set file)."""
    lines = (t for _, t in read_lines(path) if t.strip())
    first = next(lines, None)
    return first is not None and _looks_like_tag_line(first) and all(_looks_like_tag_line(t) for t in lines)


def _looks_like_tag_line(text):
    return all(_TAG.match(t) for t in text.split())


def _is_alternating(path):
    lines = [t for _, t in read_lines(path) if t.strip()][:2]
    return len(lines) == 2 and len(lines[0].split()) > 1 and _looks_like_tag_line(lines[1]) and not _looks_like_tag_line(lines[0])


def _read_pairs(sentence_lines, tag_lines, bad):
    examples = []
    for (number, sentence), tag_entry in zip(sentence_lines, tag_lines):
        tokens = sentence.split()
        if tag_entry is None:
            examples.append(NerExample(len(examples), tuple(tokens), None, number))
            continue
        tag_number, tag_text = tag_entry
        tags = tag_text.split()
        if not tokens:
            bad.bad(number, "empty sentence")
            continue
        if len(tags) != len(tokens):
            bad.bad(tag_number, f"{len(tags)} tags for {len(tokens)} characters")
            continue
        if _check_tags(bad, tag_number, tags):
            examples.append(NerExample(len(examples), tuple(tokens), tuple(tags), number))
    return examples


def load_ner(path, labels=None, scheme=None, skip_bad=False):
    """Read NER data (format detected, see the module docstring) into `TaskData`.

    `labels`: the tag set (a sequence, or a file with one tag a line); None takes the file's own
    tags ('O' first, then sorted). `scheme`: re-tag every sentence in "bio", "bioes" or "bmes";
    None keeps the file's tags (CLUENER json, which has spans, becomes BIO). Examples keep
    `tokens`; a tag outside `labels` raises `TaskDataError` with its line.
    """
    path = os.fspath(path)
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    pair_files = _pair_files(path)
    bad = BadLines(pair_files[1] if pair_files else path, skip_bad)
    labelled = True
    if pair_files is not None:
        sentences = [(n, t) for n, t in read_lines(pair_files[0]) if t.strip()]
        if os.path.exists(pair_files[1]):
            tag_lines = [(n, t) for n, t in read_lines(pair_files[1]) if t.strip()]
            if len(tag_lines) != len(sentences):
                raise TaskDataError(pair_files[1], 0, f"{len(tag_lines)} tag lines for {len(sentences)} sentences")
        else:
            tag_lines, labelled = [None] * len(sentences), False
        examples = _read_pairs(sentences, tag_lines, bad)
    elif first_content_line(path).startswith("{"):
        examples, labelled = _read_cluener(path, bad, scheme or "bio")
    elif _only_tags(path):
        beside = "no sentences.txt beside it" if os.path.basename(path) == "tags.txt" else "no characters"
        raise TaskDataError(
            path,
            0,
            f"every line holds only tags ({beside}): expected {PAIR_LAYOUT}, CoNLL 'char tag' lines or CLUENER json",
            "pass sentences.txt, tags.txt or their folder; a tag set file goes to labels=/--labels",
        )
    elif _is_alternating(path):
        lines = [(n, t) for n, t in read_lines(path) if t.strip()]
        if len(lines) % 2:
            raise TaskDataError(path, lines[-1][0], "odd number of lines in a sentence/tag pair file")
        examples = _read_pairs(lines[0::2], lines[1::2], bad)
    else:
        examples = _read_conll(path, bad)
    if scheme is not None and labelled:
        examples = [NerExample(e.id, e.tokens, tuple(convert_tags(e.tags, scheme)), e.line) for e in examples]
    if labels is None:
        if not labelled:
            raise TaskDataError(path, 0, "an unlabelled file needs a tag set (labels=...)")
        seen = {t for e in examples for t in e.tags}
        names = ("O",) + tuple(sorted(seen - {"O"}))
    else:
        if isinstance(labels, (str, os.PathLike)):
            labels = [t.strip() for _, t in read_lines(labels) if t.strip()]
        names = tuple(labels)
        if labelled:
            known, kept = set(names), []
            for e in examples:
                unknown = [t for t in e.tags if t not in known]
                if unknown:
                    bad.bad(e.line, "tag outside the label set", f"{unknown[0]!r} not in {list(names)}")
                    continue
                kept.append(e)
            examples = kept
    return TaskData("ner", path, examples, names, labelled, dict(bad.skipped))


# ---------------------------------------------------------------------------------------------
# Alignment to WordPiece tokens


def _pieces(tokens, tokenizer):
    """(WordPiece ids of the whole sentence, token index of each first piece or -1)."""
    backend = backend_tokenizer(tokenizer)
    unk = special_id(tokenizer, "[UNK]")
    encoding = backend.encode(list(tokens), is_pretokenized=True, add_special_tokens=False)
    pieces = [[] for _ in tokens]
    for piece, word in zip(encoding.ids, encoding.word_ids):
        pieces[word].append(piece)
    ids, firsts = [], []
    for i, token_pieces in enumerate(pieces):
        token_pieces = token_pieces or [unk]
        ids.extend(token_pieces)
        firsts.extend([i] + [-1] * (len(token_pieces) - 1))
    return ids, firsts


def encode_tokens(tokens, tokenizer, max_seq_len=512):
    """WordPiece ids for a pre-split sentence, and the sentence position of each id.

    `[CLS] pieces [SEP]`; each input token (a character) maps to its tokenizer pieces; a token
    the tokenizer drops (a space, a control character) becomes one [UNK] so that every token gets
    a prediction. Returns `(input_ids, positions)`: `positions[k]` is the token index whose first
    piece is id k, or -1 for specials and continuation pieces. Tokens past `max_seq_len - 2`
    pieces are cut (`decode_tags` gives them "O"); `encode_windows` covers them all.
    """
    pieces, firsts = _pieces(tokens, tokenizer)
    cut = len(pieces)
    if cut > max_seq_len - 2:
        cut = max_seq_len - 2
        while cut > 0 and firsts[cut] < 0:  # a token is kept whole or not at all
            cut -= 1
    ids = [special_id(tokenizer, "[CLS]")] + pieces[:cut] + [special_id(tokenizer, "[SEP]")]
    return ids, [-1] + firsts[:cut] + [-1]


def encode_windows(tokens, tokenizer, max_seq_len=512, stride=128):
    """Windows of `[CLS] pieces [SEP]` that together cover a pre-split sentence of any length, as
    BERT's `run_squad.py` windows a context: each at most `max_seq_len` ids, each starting `stride`
    pieces after the previous one.

    Returns a list of `(input_ids, positions, owned)` per window: `positions` as `encode_tokens`
    (every token whose first piece is in the window: training labels), `owned` the same but -1
    where another window gives the token more context on both sides (the one window whose
    prediction counts, BERT's `_check_is_max_context`). One window when the sentence fits.
    """
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len {max_seq_len} leaves no room for a token after [CLS] and [SEP]")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    pieces, firsts = _pieces(tokens, tokenizer)
    cls, sep = special_id(tokenizer, "[CLS]"), special_id(tokenizer, "[SEP]")
    windows = _windows(len(pieces), max_seq_len - 2, stride)
    out = []
    for k, (start, length) in enumerate(windows):
        positions = firsts[start : start + length]
        owned = [p if p >= 0 and _max_context(windows, k, start + j) else -1 for j, p in enumerate(positions)]
        out.append(([cls] + pieces[start : start + length] + [sep], [-1] + positions + [-1], [-1] + owned + [-1]))
    return out


def label_ids(positions, tags, label_to_id, ignore_index=IGNORE_INDEX):
    """Training labels aligned to `encode_tokens` output: a token's tag on its first piece."""
    return [label_to_id[tags[p]] if p >= 0 else ignore_index for p in positions]


def decode_tags(positions, predicted_ids, n_tokens, id_to_label, tags=None):
    """Per-token tags from per-piece predicted label ids; tokens no position names get "O".
    With ``tags`` (a list being filled window by window, with ``owned`` positions) fills it."""
    tags = ["O"] * n_tokens if tags is None else tags
    for p, label in zip(positions, predicted_ids):
        if p >= 0:
            tags[p] = id_to_label[int(label)]
    return tags


@dataclass(frozen=True)
class NerTask:
    """The NER ``Task`` (``lub_fast.tasks.base``): sentences as ``encode_windows`` windows (nothing
    is cut), a character's tag on its first word piece, each character predicted by the window
    that gives it the most context, scored by entity F1 (``entity_f1``).
    ``scheme``: re-tag the data in this scheme (None: as the file)."""

    max_seq_len: int
    doc_stride: int
    scheme: str | None = None
    skip_bad: bool = False
    prediction_suffix = ".jsonl"

    def read(self, path, labels, training=False) -> TaskData:
        return load_ner(path, labels=labels, scheme=self.scheme, skip_bad=self.skip_bad)

    def features(self, data, tokenizer) -> Split:
        label_to_id = {t: i for i, t in enumerate(data.labels)}
        rows, windows = [], []
        for index, example in enumerate(data.examples):
            for ids, positions, owned in encode_windows(example.tokens, tokenizer, self.max_seq_len, self.doc_stride):
                row = {"input_ids": ids, "token_type_ids": [0] * len(ids)}
                if data.has_labels:
                    row["labels"] = label_ids(positions, example.tags, label_to_id)
                rows.append(row)
                windows.append((index, owned))
        return Split(data, rows, windows=windows)

    def head(self, labels) -> Head:
        return Head("token_classification", len(labels), labels=tuple(labels))

    def row_outputs(self, output, lengths) -> list:
        ids = output.logits.argmax(-1).cpu().numpy()
        return [row[:n] for row, n in zip(ids, lengths)]

    def decode(self, split, outputs) -> list:
        tags = [["O"] * len(example.tokens) for example in split.data.examples]
        for (index, owned), ids in zip(split.windows, outputs):
            decode_tags(owned, ids, len(tags[index]), split.data.labels, tags[index])
        return tags

    def score(self, split, predictions) -> dict:
        result = entity_f1([e.tags for e in split.data.examples], predictions)
        return {"entity_f1": result["f1"], "entity_precision": result["precision"], "entity_recall": result["recall"]}

    def write_predictions(self, path, split, predictions, submission=False) -> None:
        examples = split.data.examples
        spans = [tags_to_spans(t) for t in predictions]
        ids, tokens = [e.id for e in examples], [e.tokens for e in examples]
        write_ner_predictions(path, ids, tokens, spans, with_text=not submission)
