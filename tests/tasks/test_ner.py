"""NER readers on the real files in ../shared/data (skipped when absent), scheme conversion,
seqeval-equivalent span decoding, alignment to WordPiece tokens, and ``NerTask`` from file to
windows, tags, entity F1 and the predictions file."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import BertWordPieceTokenizer

from lub_fast.tasks import TaskDataError, load_task
from lub_fast.tasks.base import Head
from lub_fast.tasks.io import write_ner_predictions
from lub_fast.tasks.ner import (
    NerTask,
    convert_tags,
    decode_tags,
    encode_tokens,
    encode_windows,
    entity_f1,
    label_ids,
    spans_to_tags,
    tags_to_spans,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")

# (file, sentences, characters, tags, entities, nested spans dropped)
REAL_FILES = [
    ("cluener2020/train.json", 10748, 401764, 21, None, 2),
    ("weibo_ner/weiboNER_2nd_conll.train", 1350, 73778, 17, 1895, 0),  # 1885 B- tags + 10 I- starts
    ("weibo_ner/weiboNER_2nd_conll.dev", 270, 14509, 17, None, 0),
    ("peoples_daily_ner/example.dev", 2318, 109870, 7, 3819, 0),
    ("msra_ner/val", 3000, 142980, 7, None, 0),
]


@needs_data
@pytest.mark.parametrize("name,n_sentences,n_chars,n_tags,n_entities,n_nested", REAL_FILES)
def test_ner_real_files_counts(name, n_sentences, n_chars, n_tags, n_entities, n_nested):
    data = load_task("ner", DATA / name)
    assert len(data.examples) == n_sentences
    assert sum(len(e.tokens) for e in data.examples) == n_chars
    assert len(data.labels) == n_tags and data.labels[0] == "O"
    assert sum(data.skipped.values()) == n_nested, data.skipped
    if n_entities is not None:  # seqeval chunks; B- tag counts from `cut -f2 | sort | uniq -c`
        assert sum(len(tags_to_spans(e.tags)) for e in data.examples) == n_entities


@needs_data
def test_ner_cluener_spans_round_trip():
    path = DATA / "cluener2020/train.json"
    data = load_task("ner", path)
    with open(path, encoding="utf-8") as f:
        first = json.loads(f.readline())
    spans = sorted((kind, s, e) for kind, ents in first["label"].items() for pos in ents.values() for s, e in pos)
    assert sorted(tags_to_spans(data.examples[0].tags)) == spans
    assert "".join(data.examples[0].tokens) == first["text"]


@needs_data
def test_ner_weibo_position_digits_stripped():
    data = load_task("ner", DATA / "weibo_ner/weiboNER_2nd_conll.train")
    tokens = [t for e in data.examples for t in e.tokens]
    assert "".join(data.examples[0].tokens[:4]) == "科技全方"
    # 'p10' is 'p' at position 10, '310' is '3' at position 10; no digits survive on letters
    assert "p" in tokens and "3" in tokens
    assert all(len(t) == 1 for t in tokens if t != "\ufffd\ufffd")


@needs_data
def test_ner_msra_two_files_with_labels_file_and_bmes():
    data = load_task("ner", DATA / "msra_ner/val/sentences.txt", labels=DATA / "msra_ner/tags.txt")
    assert data.labels == ("O", "B-ORG", "I-ORG", "B-PER", "I-PER", "B-LOC", "I-LOC")
    bmes = load_task("ner", DATA / "msra_ner/val", scheme="bmes")
    assert bmes.examples[0].tags[3:5] == ("B-LOC", "E-LOC")
    assert [tags_to_spans(e.tags) for e in bmes.examples] == [tags_to_spans(e.tags) for e in data.examples]


@needs_data
def test_ner_msra_pair_found_from_either_file_and_the_folder():
    folder = DATA / "msra_ner/val"
    reads = [load_task("ner", p) for p in (folder, folder / "sentences.txt", folder / "tags.txt")]
    assert [len(d.examples) for d in reads] == [3000] * 3
    assert reads[0].examples == reads[1].examples == reads[2].examples
    assert reads[2].labels == reads[0].labels and len(reads[0].labels) == 7


@needs_data
def test_ner_msra_labels_file_as_data_is_an_error():
    # msra_ner/tags.txt is the tag set, one tag a line: read as CoNLL it was one "sentence"
    with pytest.raises(TaskDataError, match=r"msra_ner/tags.txt: .*only tags.*sentences.txt"):
        load_task("ner", DATA / "msra_ner/tags.txt")


def test_ner_pair_layout_errors_name_the_layout(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    _write(alone, "tags.txt", "B-PER I-PER O\nO O\n")
    with pytest.raises(TaskDataError, match=r"alone/tags.txt: .*only tags.*no sentences.txt beside it"):
        load_task("ner", alone / "tags.txt")
    with pytest.raises(TaskDataError, match=r"alone: .*sentences.txt.*found \['tags.txt'\]"):
        load_task("ner", alone)
    _write(alone, "sentences.txt", "张 三 来\n好 的\n")
    data = load_task("ner", alone / "tags.txt")
    assert [e.tokens for e in data.examples] == [("张", "三", "来"), ("好", "的")]
    assert [e.tags for e in data.examples] == [("B-PER", "I-PER", "O"), ("O", "O")]
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    _write(unlabelled, "sentences.txt", "张 三 来\n")
    data = load_task("ner", unlabelled / "sentences.txt", labels=["O", "B-PER", "I-PER"])
    assert not data.has_labels and data.examples[0].tokens == ("张", "三", "来")


@pytest.mark.parametrize("scheme", ["bio", "bioes", "bmes"])
def test_ner_spans_tags_round_trip(scheme):
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 15)
        spans, pos = [], 0
        while pos < n:
            start = pos + rng.randint(0, 3)
            end = start + rng.randint(0, 3)
            if end >= n:
                break
            spans.append((rng.choice(["PER", "LOC.NAM"]), start, end))
            pos = end + 1
        tags = spans_to_tags(n, spans, scheme)
        assert tags_to_spans(tags) == spans, (scheme, tags)
    assert spans_to_tags(3, [("X", 0, 0), ("X", 1, 2)], "bmes") == ["S-X", "B-X", "E-X"]
    assert spans_to_tags(4, [("X", 0, 3)], "bmes") == ["B-X", "M-X", "M-X", "E-X"]
    assert convert_tags(["S-X", "B-Y", "E-Y"], "bio") == ["B-X", "B-Y", "I-Y"]


def test_entity_f1_hand_case():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "O"]]
    scores = entity_f1(gold, pred)
    # gold 3 entities, predicted 2, 1 exact (PER); ORG predicted too short
    assert (scores["gold"], scores["pred"], scores["correct"]) == (3, 2, 1)
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.4)
    empty = entity_f1([["O"]], [["O"]])
    assert empty["f1"] == 0.0


def _random_tags(rng, n, prefixes):
    return [rng.choice(["O"] + [f"{p}-{t}" for p in prefixes for t in ("PER", "LOC")]) for _ in range(n)]


@pytest.mark.parametrize("prefixes", ["BI", "BIES"])
def test_entity_f1_matches_seqeval(prefixes):
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = random.Random(1)
    for _ in range(30):
        lengths = [rng.randint(1, 12) for _ in range(8)]
        gold = [_random_tags(rng, n, prefixes) for n in lengths]
        pred = [_random_tags(rng, n, prefixes) for n in lengths]
        ours = entity_f1(gold, pred)
        assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, pred, zero_division=0))
        assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, pred, zero_division=0))
        assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, pred, zero_division=0))


def test_ner_tags_to_spans_matches_seqeval_on_ill_formed_tags():
    get_entities = pytest.importorskip("seqeval.metrics.sequence_labeling").get_entities
    rng = random.Random(2)
    pool = ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "I-B", "E-B", "S-B"]
    for _ in range(500):
        tags = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        assert tags_to_spans(tags) == get_entities(tags), tags


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_ner_conll_space_tokens_and_bad_lines(tmp_path):
    path = _write(tmp_path, "a.txt", "张 B-PER\n三 I-PER\n  O\n好\tO\n\n-DOCSTART- O\n\n北 B-LOC\n")
    data = load_task("ner", path)
    assert [e.tokens for e in data.examples] == [("张", "三", " ", "好"), ("北",)]
    assert data.examples[1].line == 8
    bad = _write(tmp_path, "b.txt", "张 B-PER\n三\n")
    with pytest.raises(TaskDataError, match=r"b.txt:2: expected 'token tag'"):
        load_task("ner", bad)
    wrong = _write(tmp_path, "c.txt", "张 PER\n")
    with pytest.raises(TaskDataError, match=r"c.txt:1: malformed tag"):
        load_task("ner", wrong)
    unknown = _write(tmp_path, "d.txt", "张 B-PER\n\n北 B-LOC\n")
    with pytest.raises(TaskDataError, match=r"d.txt:3: tag outside the label set"):
        load_task("ner", unknown, labels=["O", "B-PER", "I-PER"])
    assert len(load_task("ner", unknown, labels=["O", "B-PER"], skip_bad=True).examples) == 1


def test_ner_alternating_pairs_and_cluener_errors(tmp_path):
    pairs = _write(tmp_path, "pairs.txt", "张 三 来 了\nB-PER I-PER O O\n北 京\nB-LOC I-LOC\n")
    data = load_task("ner", pairs)
    assert [tags_to_spans(e.tags) for e in data.examples] == [[("PER", 0, 1)], [("LOC", 0, 1)]]
    short = _write(tmp_path, "short.txt", "张 三 来\nB-PER I-PER\n")
    with pytest.raises(TaskDataError, match="short.txt:2: 2 tags for 3 characters"):
        load_task("ner", short)
    mismatch = json.dumps({"text": "张三来了", "label": {"name": {"李四": [[0, 1]]}}}, ensure_ascii=False)
    path = _write(tmp_path, "c.json", mismatch + "\n")
    with pytest.raises(TaskDataError, match="c.json:1: bad entity label"):
        load_task("ner", path)
    test_file = _write(tmp_path, "test.json", json.dumps({"id": 5, "text": "张三"}, ensure_ascii=False) + "\n")
    data = load_task("ner", test_file, labels=["O", "B-name", "I-name"])
    assert not data.has_labels and data.examples[0].tags is None and data.examples[0].id == 5


def _tokenizer(chars):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ab", "##c"] + sorted(chars)
    return BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True)


def test_ner_encode_tokens_alignment():
    tokens = ["张", " ", "abc", "三", "\u200b"]
    tags = ["B-PER", "I-PER", "I-PER", "O", "O"]
    tok = _tokenizer("张三")
    ids, positions = encode_tokens(tokens, tok, max_seq_len=16)
    assert [tok.id_to_token(i) for i in ids] == ["[CLS]", "张", "[UNK]", "ab", "##c", "三", "[UNK]", "[SEP]"]
    assert positions == [-1, 0, 1, 2, -1, 3, 4, -1]
    label_to_id = {"O": 0, "B-PER": 1, "I-PER": 2}
    assert label_ids(positions, tags, label_to_id) == [-100, 1, 2, 2, -100, 0, 0, -100]
    predicted = [0, 1, 2, 2, 0, 0, 0, 0]
    assert decode_tags(positions, predicted, len(tokens), ["O", "B-PER", "I-PER"]) == tags
    ids, positions = encode_tokens(tokens, tok, max_seq_len=5)
    # 'abc' needs 2 pieces and only 1 place is left before [SEP]: cut with everything after it
    assert len(ids) == 4 and decode_tags(positions, [1] * 4, len(tokens), ["O", "B-PER"]) == ["B-PER"] * 2 + ["O"] * 3


@pytest.mark.parametrize("max_seq_len,stride", [(8, 2), (9, 3), (12, 5), (64, 128)])
def test_ner_windows_cover_long_sentences(max_seq_len, stride):
    # 22 tokens, one of them two pieces, one dropped by the tokenizer ([UNK]): 23 pieces.
    tokens = list("张三在北京") + ["abc"] + list("大学读书他说明天去上海找李四") + [" "] + list("好")
    tok = _tokenizer("张三在北京大学读书他说明天去上海找李四好")
    windows = encode_windows(tokens, tok, max_seq_len=max_seq_len, stride=stride)
    assert (len(windows) == 1) == (max_seq_len >= 25)
    owners = {}
    for ids, positions, owned in windows:
        assert len(ids) <= max_seq_len and len(ids) == len(positions) == len(owned)
        assert tok.id_to_token(ids[0]) == "[CLS]" and tok.id_to_token(ids[-1]) == "[SEP]"
        assert all(o in (-1, p) for o, p in zip(owned, positions))
        for o in owned:
            if o >= 0:
                owners[o] = owners.get(o, 0) + 1
    assert owners == {i: 1 for i in range(len(tokens))}  # every token predicted by exactly one window
    # Perfect per-window predictions decode to the gold tags, whatever the windowing.
    tags = ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "I-ORG"] + ["I-ORG"] * 2 + ["O"] * 7 + ["B-LOC", "I-LOC"]
    tags += ["O", "B-PER", "I-PER", "O", "O"]
    assert len(tags) == len(tokens) == 22
    label_to_id = {"O": 0, "B-PER": 1, "I-PER": 2, "B-ORG": 3, "I-ORG": 4, "B-LOC": 5, "I-LOC": 6}
    names = list(label_to_id)
    decoded = ["O"] * len(tokens)
    for ids, positions, owned in windows:
        gold = label_ids(positions, tags, label_to_id, ignore_index=0)
        decode_tags(owned, gold, len(tokens), names, decoded)
    assert decoded == tags
    if len(windows) == 1:
        assert windows[0][:2] == encode_tokens(tokens, tok, max_seq_len)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        encode_windows(tokens, tok, max_seq_len, stride=0)


def test_ner_windows_own_the_token_with_most_context():
    tok = _tokenizer("一二三四五六七八九十")
    windows = encode_windows(list("一二三四五六七八九十"), tok, max_seq_len=6, stride=2)
    starts = [w[1][1] for w in windows]  # token of each window's first piece
    assert starts == [0, 2, 4, 6]
    # Token 3 is in windows 0 (positions 0-3), 1 (2-5): window 1 gives it context on both sides.
    assert [3 in w[2] for w in windows] == [False, True, False, False]


def test_write_ner_predictions_cluener_layout(tmp_path):
    out = tmp_path / "ner.json"
    write_ner_predictions(out, [0], [list("张三在北京")], [[("name", 0, 1), ("address", 3, 4)]])
    row = json.loads(out.read_text(encoding="utf-8"))
    assert row == {"id": 0, "text": "张三在北京", "label": {"name": {"张三": [[0, 1]]}, "address": {"北京": [[3, 4]]}}}
    write_ner_predictions(out, [7], [list("张三")], [[("name", 0, 1)]], with_text=False)
    assert json.loads(out.read_text(encoding="utf-8")) == {"id": 7, "label": {"name": {"张三": [[0, 1]]}}}


@needs_data
def test_ner_split_windows_lose_nothing_on_real_long_sentences(tmp_path):
    """People's Daily NER has sentences of up to 568 characters: with 64-piece windows, perfect
    per-window predictions decode to every gold tag (nothing past max_seq_len is cut to "O")."""
    from lub_fast.data.tokenizer import hf_tokenizer
    from lub_fast.tasks.ner import NerTask

    data = load_task("ner", DATA / "peoples_daily_ner" / "example.dev")
    chars = sorted({c for e in data.examples for c in e.tokens})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars) + "\n", encoding="utf-8")
    task = NerTask(max_seq_len=64, doc_stride=24)
    split = task.features(data, hf_tokenizer(vocab))
    longest = max(len(e.tokens) for e in data.examples)
    assert longest > 500 and len(split.rows) > len(data.examples)
    assert max(len(r["input_ids"]) for r in split.rows) <= 64
    perfect = [[max(label, 0) for label in row["labels"]] for row in split.rows]
    predicted = task.decode(split, perfect)
    assert predicted == [list(e.tags) for e in data.examples]


def test_ner_task_windows_decode_to_the_gold_tags_and_score(tmp_path):
    sentences = [
        ("张三在北京大学读书他说", "B-PER I-PER O B-ORG I-ORG I-ORG I-ORG O O O O"),
        ("李四去上海", "B-PER I-PER O B-LOC I-LOC"),
    ]
    path = tmp_path / "train.txt"
    path.write_text(
        "\n\n".join("\n".join(f"{c} {t}" for c, t in zip(text, tags.split())) for text, tags in sentences) + "\n",
        encoding="utf-8",
    )
    task = NerTask(max_seq_len=6, doc_stride=2, scheme="bioes")
    data = task.read(str(path), None, training=True)
    assert data.examples[1].tags == ("B-PER", "E-PER", "O", "B-LOC", "E-LOC")  # re-tagged
    split = task.features(data, _tokenizer("".join(text for text, _ in sentences)))
    assert all(len(r["input_ids"]) <= 6 for r in split.rows) and len(split.rows) > 2, "long sentences run as windows"
    assert task.head(data.labels) == Head("token_classification", len(data.labels), labels=data.labels)
    # logits that pick each row's gold label (label 0 where the row has none: specials)
    lengths = [len(r["input_ids"]) for r in split.rows]
    logits = torch.zeros(len(lengths), max(lengths), len(data.labels))
    for k, row in enumerate(split.rows):
        for j, label in enumerate(row["labels"]):
            logits[k, j, max(label, 0)] = 1.0
    outputs = task.row_outputs(SimpleNamespace(logits=logits), lengths)
    assert [len(o) for o in outputs] == lengths
    predictions = task.decode(split, outputs)
    assert predictions == [list(e.tags) for e in data.examples]
    assert task.score(split, predictions) == {"entity_f1": 1.0, "entity_precision": 1.0, "entity_recall": 1.0}
    wrong = [predictions[0], ["O"] * 5]  # 2 of the 4 gold entities found, nothing wrongly predicted
    expected = {"entity_f1": 2 / 3, "entity_precision": 1.0, "entity_recall": 0.5}
    assert task.score(split, wrong) == pytest.approx(expected)
    task.write_predictions(tmp_path / "p.jsonl", split, predictions)
    task.write_predictions(tmp_path / "s.json", split, predictions, submission=True)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    entities = {"PER": {"李四": [[0, 1]]}, "LOC": {"上海": [[3, 4]]}}
    assert rows[1] == {"id": 1, "text": "李四去上海", "label": entities}
    submission = [json.loads(line) for line in (tmp_path / "s.json").read_text(encoding="utf-8").splitlines()]
    assert submission == [{"id": r["id"], "label": r["label"]} for r in rows]
