"""WordPiece tokenization as bert-base-chinese, and word-start flags aligned to its tokens.

The tokenizer is HuggingFace ``tokenizers``' WordPiece with BERT's normalizer and pre-tokenizer
(``BertNormalizer(clean_text, handle_chinese_chars, lowercase)`` with accents stripped, as
``BertTokenizerFast`` of bert-base-chinese with ``do_lower_case=True``), reading a ``vocab.txt`` in
BERT's format (one token a line, the line number is the id), so released Chinese vocabularies work.

Speed. A Chinese character and a punctuation character are each their own pre-token in BERT, so
their ids depend on the character alone. ``WordPieceTokenizer`` looks those up in a table that it
fills from the HF normalizer and pre-tokenizer themselves (checking each character in context), and
runs the HF tokenizer only on the stretches of other text between them (numbers, Latin words): the
ids and offsets are exactly HF's on the whole text (tested), about ten times faster on Chinese.

Word starts (whole-word masking, Cui et al. 2019/2021). A word is a word-start token followed by its
continuation tokens. Given the segmenter's word boundaries (character positions):

- a ``##`` token continues the word before it (WordPiece wins);
- a token that is a Chinese character starts a word exactly when a segmenter word starts at it;
- any other token (Latin words, numbers, punctuation) starts a word (non-Chinese words follow
  WordPiece's ``##``).

Model vocabularies (``model_vocab``, ``vocab_from_files``). A model directory's vocabulary is its
``vocab.txt`` or, where there is none (``transformers`` 5 saves a BERT tokenizer as ``tokenizer.json``
+ ``tokenizer_config.json`` only), the WordPiece model inside ``tokenizer.json``. A ``tokenizer.json``
that is not WordPiece (BPE, Unigram), whose ids are not ``0..n-1``, or that maps a token to another
id than the directory's ``vocab.txt`` is a ``VocabularyError``: lub_fast tokenizes with BERT's
WordPiece and never guesses which of two vocabularies a model was trained with.

Special-token strings in the text ("[MASK]") are text, not special tokens: the corpus cannot inject
them. Where the segmentation disagrees with the tokens, the tokens win and the disagreement is counted as
a mismatch: a word boundary at a ``##`` token or strictly inside a token, or a non-Chinese,
non-``##`` token that the segmenter put inside a word (e.g. ``OK`` in ``卡拉OK``).
"""

import hashlib
import itertools
import json
import os
import unicodedata

import numpy as np

from lub_fast.errors import UsageError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONTINUATION_PREFIX = "##"
MAX_INPUT_CHARS_PER_WORD = 100  # BERT's WordpieceTokenizer default: longer words become [UNK]

# BERT's _is_chinese_char ranges (google-research/bert tokenization.py), inclusive.
CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
_TABLE_SIZE = 0x30000  # covers every CJK range above
_ASCII_PUNCTUATION = frozenset(chr(c) for c in [*range(33, 48), *range(58, 65), *range(91, 97), *range(123, 127)])
_NEWLINE, _SPACE = 10, 32
VOCAB_FILE, TOKENIZER_JSON = "vocab.txt", "tokenizer.json"


class VocabularyError(UsageError, ValueError):
    """A model's or a corpus's vocabulary that lub_fast cannot use, or two that disagree."""


def file_sha256(path):
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_vocab(path):
    """The tokens of a BERT ``vocab.txt``: the token on line i has id i."""
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\n").rstrip("\r") for line in f]
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise ValueError(f"{path}: vocabulary lacks the special tokens {missing}")
    return tokens


def vocab_bytes(tokens):
    """``tokens`` in BERT's vocab.txt format (one token a line, ``\\n`` after each)."""
    return "".join(t + "\n" for t in tokens).encode("utf-8")


def vocab_from_files(files, origin):
    """The WordPiece tokens (id order) of a model's tokenizer files, or None when it has neither a
    ``vocab.txt`` nor a ``tokenizer.json``.

    ``files``: file name -> bytes (``lub_fast.models.read_tokenizer_files``); ``origin``: the directory, for
    messages. Raises ``VocabularyError`` for a ``tokenizer.json`` that is not WordPiece, has ids
    that are not ``0..n-1``, or disagrees with ``vocab.txt``, and for missing special tokens.
    """
    tokens = None
    if VOCAB_FILE in files:
        tokens = files[VOCAB_FILE].decode("utf-8").split("\n")
        tokens = [t.rstrip("\r") for t in (tokens[:-1] if tokens[-1] == "" else tokens)]
        _check_specials(tokens, os.path.join(origin, VOCAB_FILE))
    if TOKENIZER_JSON in files:
        from_json = _tokenizer_json_vocab(files[TOKENIZER_JSON], os.path.join(origin, TOKENIZER_JSON))
        if tokens is not None and from_json != tokens:
            raise VocabularyError(
                f"{origin}: {VOCAB_FILE} ({len(tokens)} tokens) and {TOKENIZER_JSON} ({len(from_json)} tokens) are "
                f"different vocabularies ({first_difference(tokens, from_json, VOCAB_FILE, TOKENIZER_JSON)}): the "
                "model was trained with one of them; delete the other"
            )
        tokens = from_json
    return tokens


def first_difference(a, b, name_a, name_b):
    """Where token lists ``a`` and ``b`` first differ, for messages: "id 7 is 'x' in A, 'y' in B"."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    shown = [repr(ts[i]) if i < len(ts) else "absent" for ts in (a, b)]
    return f"id {i} is {shown[0]} in {name_a}, {shown[1]} in {name_b}"


def _tokenizer_json_vocab(data, path):
    import json

    from tokenizers import Tokenizer, models

    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise VocabularyError(f"{path}: not a readable tokenizers file ({e})") from None
    if not isinstance(tok.model, models.WordPiece):
        kind = json.loads(data).get("model", {}).get("type", type(tok.model).__name__)
        raise VocabularyError(
            f"{path}: a {kind} tokenizer, not WordPiece: lub_fast pretrains and fine-tunes BERT-style WordPiece "
            f"models only; give a directory whose {VOCAB_FILE} or {TOKENIZER_JSON} is WordPiece"
        )
    if tok.model.continuing_subword_prefix != CONTINUATION_PREFIX:
        raise VocabularyError(
            f"{path}: WordPiece continuation prefix {tok.model.continuing_subword_prefix!r}, lub_fast reads BERT's "
            f"{CONTINUATION_PREFIX!r}"
        )
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise VocabularyError(f"{path}: the token ids are not 0..{len(tokens) - 1} without gaps, as a vocab.txt needs")
    _check_specials(tokens, path)
    return tokens


def _check_specials(tokens, path):
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise VocabularyError(f"{path}: vocabulary lacks the special tokens {missing}")


def model_vocab(directory):
    """``(tokens, source)`` of a model directory's vocabulary (see ``vocab_from_files``); ``source``
    is the path of the file the tokens come from, ``vocab.txt`` first. None when it has neither."""
    files = {}
    for name in (VOCAB_FILE, TOKENIZER_JSON):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    tokens = vocab_from_files(files, os.fspath(directory))
    if tokens is None:
        return None
    return tokens, os.path.join(directory, VOCAB_FILE if VOCAB_FILE in files else TOKENIZER_JSON)


def bert_tokenizer_config(model_max_length):
    """The ``tokenizer_config.json`` dict for ``transformers``' BertTokenizer on a vocab.txt, as
    lub_fast tokenizes: lower case, accents stripped, each Chinese character its own token (every
    family: without it ``AutoTokenizer`` of an ALBERT directory falls back to SentencePiece)."""
    return {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "model_max_length": model_max_length,
    }


def check_vocab_file(path):
    """Raise ``ValueError`` (one line naming ``path``) unless it names a vocabulary: a BERT
    ``vocab.txt`` (UTF-8 text, one token a line, with every one of ``SPECIAL_TOKENS``), a WordPiece
    ``tokenizer.json``, or a model directory holding either (``model_vocab``). Binary files and other
    JSON files (a ``vocab.json``) are told apart from a vocab.txt that lacks tokens."""
    fix = f"pass a vocab.txt: UTF-8, one token a line, with {', '.join(SPECIAL_TOKENS)}"
    if os.path.isdir(path):
        if model_vocab(path) is None:
            raise ValueError(f"{path}: a directory without {VOCAB_FILE} or {TOKENIZER_JSON}: {fix}, or a model directory")
        return
    if os.path.basename(path) == TOKENIZER_JSON and os.path.isfile(path):
        with open(path, "rb") as f:
            _tokenizer_json_vocab(f.read(), path)
        return
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such vocabulary file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (invalid byte at {error.start}), not a vocab.txt: {fix}") from None
    if "\0" in text:
        raise ValueError(f"{path} is a binary file (NUL bytes), not a vocab.txt: {fix}")
    try:
        is_json = isinstance(json.loads(text.lstrip("\ufeff")), (dict, list))
    except json.JSONDecodeError:
        is_json = False
    if is_json:
        raise ValueError(f"{path} is a JSON file (a tokenizer.json or vocab.json?), not a vocab.txt: {fix}")
    tokens = {line.rstrip("\r") for line in text.split("\n")}
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise ValueError(f"{path} lacks the special tokens {', '.join(missing)}, so it is not a BERT vocab.txt: {fix}")


def is_cjk(cps):
    """Bool array: which code points (uint32 array) are Chinese characters in BERT's sense."""
    out = np.zeros(cps.shape, dtype=bool)
    for lo, hi in CJK_RANGES:
        out |= (cps >= lo) & (cps <= hi)
    return out


def _bert_pipeline(model):
    """A ``tokenizers.Tokenizer`` around ``model`` with BERT's normalizer, pre-tokenizer, decoder."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    return tok


def hf_tokenizer(vocab_path):
    """The HF ``tokenizers.Tokenizer`` equivalent to bert-base-chinese's (no special tokens added)."""
    from tokenizers import models

    vocab = {tok: i for i, tok in enumerate(read_vocab(vocab_path))}
    return _bert_pipeline(
        models.WordPiece(
            vocab,
            unk_token="[UNK]",
            continuing_subword_prefix=CONTINUATION_PREFIX,
            max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
        )
    )


def tokenizer_settings():
    """What determines the token ids besides the vocabulary, for shard metadata."""
    import tokenizers

    return {
        "type": "wordpiece",
        "lowercase": True,
        "strip_accents": True,
        "handle_chinese_chars": True,
        "clean_text": True,
        "unk_token": "[UNK]",
        "continuing_subword_prefix": CONTINUATION_PREFIX,
        "max_input_chars_per_word": MAX_INPUT_CHARS_PER_WORD,
        "tokenizers_version": tokenizers.__version__,
    }


def build_vocab(texts, vocab_size, path):
    """Train a WordPiece vocabulary of at most ``vocab_size`` entries (plus the alphabet, if larger).

    ``texts``: a re-iterable of strings (cleaned sentences), read twice. Writes ``path`` in BERT's
    format, special tokens first, and returns it. The same texts give the same file: HF's trainer
    numbers the ``##`` tokens in hash-map order (huggingface/tokenizers#1794), so every ``##c`` of
    a character ``c`` that can continue a word is registered up front, in code point order.
    """
    from tokenizers import models, trainers

    tok = _bert_pipeline(models.WordPiece(unk_token="[UNK]"))
    chars = set()
    for text in texts:
        chars.update(text)
    normalized = set(tok.normalizer.normalize_str("".join(sorted(chars))))
    cps = np.array(sorted(ord(c) for c in normalized), dtype=np.uint32)
    isolated = is_cjk(cps) | np.array([_is_punctuation(chr(c)) or chr(c).isspace() for c in cps.tolist()], dtype=bool)
    continuations = [CONTINUATION_PREFIX + chr(c) for c in cps[~isolated].tolist()]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS) + continuations,
        continuing_subword_prefix=CONTINUATION_PREFIX,
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if len(tokens) <= len(SPECIAL_TOKENS) + len(continuations):
        raise ValueError("cannot build a vocabulary: the corpus has no text")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in tokens))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _is_punctuation(ch):
    """BERT's punctuation: ASCII non-alphanumeric symbols and Unicode category P*."""
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch)[0] == "P"


def _single_char_table(tok, vocab):
    """int32 ids of the characters that are always a pre-token by themselves (-1: others).

    Checked in context against the HF pipeline itself: a Chinese character qualifies when the
    normalizer pads it with spaces between two letters (HF's ranges differ from BERT's for
    U+2B820-U+2B91F), a punctuation character (BMP) when ``a<c>a`` pre-tokenizes to ``a``, ``c``,
    ``a`` unchanged. A one-character word is its own id or [UNK].
    """
    table = np.full(_TABLE_SIZE, -1, dtype=np.int32)
    ids = {t: i for i, t in enumerate(vocab)}
    unk = ids["[UNK]"]
    cjk = [cp for lo, hi in CJK_RANGES for cp in range(lo, hi + 1)]
    pieces = tok.normalizer.normalize_str("a".join(map(chr, cjk))).split("a")
    if len(pieces) == len(cjk):
        for cp, piece in zip(cjk, pieces):
            if len(piece) == 3 and piece[0] == piece[2] == " ":
                table[cp] = ids.get(piece[1], unk)
    for cp in range(0x10000):
        c = chr(cp)
        if _is_punctuation(c):
            words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(f"a{c}a"))]
            if words == ["a", c, "a"]:
                table[cp] = ids.get(c, unk)
    return table


class WordPieceTokenizer:
    """bert-base-chinese WordPiece on a vocab.txt, returning numpy ids, positions and word starts."""

    def __init__(self, vocab_path):
        self.vocab_path = os.fspath(vocab_path)
        self.vocab = read_vocab(self.vocab_path)
        self.vocab_size = len(self.vocab)
        self.vocab_sha256 = file_sha256(self.vocab_path)
        ids = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[t] for t in SPECIAL_TOKENS)
        self.hf = hf_tokenizer(self.vocab_path)
        self.is_continuation = np.array([t.startswith(CONTINUATION_PREFIX) for t in self.vocab], dtype=bool)
        self._single = _single_char_table(self.hf, self.vocab)

    def encode(self, text):
        """Token ids (int64) and the character position where each token starts (int64).

        The ids equal ``self.hf.encode(text, add_special_tokens=False).ids``.
        """
        ids, starts, _ = self._encode(text)
        return ids, starts

    def encode_words(self, text, boundaries):
        """Tokens of ``text`` with word-start flags from segmenter ``boundaries``.

        ``boundaries``: bool array of ``len(text) + 1`` (True where a word starts) or None (no
        segmentation: WordPiece words). Returns ``(ids, starts, word_start, mismatches)``.
        """
        ids, starts, cps = self._encode(text)
        not_cont = ~self.is_continuation[ids]
        if boundaries is None:
            return ids, starts, not_cont, 0
        at_boundary = boundaries[starts]
        cjk = is_cjk(cps[starts])
        word_start = not_cont & (at_boundary | ~cjk)
        inside = boundaries[:-1] & (cps != _SPACE) & (cps != _NEWLINE)
        inside[starts] = False
        mismatches = (
            int(np.count_nonzero(~not_cont & at_boundary))
            + int(np.count_nonzero(not_cont & ~cjk & ~at_boundary))
            + int(np.count_nonzero(inside))
        )
        return ids, starts, word_start, mismatches

    def _encode(self, text):
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        single = self._single[np.minimum(cps, _TABLE_SIZE - 1)]
        single[cps >= _TABLE_SIZE] = -1
        is_single = single >= 0
        other = ~is_single & (cps != _NEWLINE)
        edges = np.diff(other.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
        run_starts = np.flatnonzero(edges == 1)
        run_ends = np.flatnonzero(edges == -1)
        nonspace = np.concatenate(([0], np.cumsum(other & (cps != _SPACE))))
        keep = nonspace[run_ends] > nonspace[run_starts]
        run_starts, run_ends = run_starts[keep], run_ends[keep]
        encs = self.hf.encode_batch(
            [text[a:b] for a, b in zip(run_starts.tolist(), run_ends.tolist())], add_special_tokens=False
        )
        run_ids = np.fromiter(itertools.chain.from_iterable([e.ids for e in encs]), dtype=np.int64)
        run_offsets = np.fromiter(
            itertools.chain.from_iterable(itertools.chain.from_iterable([e.offsets for e in encs])),
            dtype=np.int64,
        )
        run_lengths = np.fromiter(map(len, encs), dtype=np.int64, count=len(encs))
        run_pos = run_offsets[0::2] + np.repeat(run_starts, run_lengths)
        single_pos = np.flatnonzero(is_single)
        starts = np.concatenate((single_pos, run_pos))
        ids = np.concatenate((single[single_pos].astype(np.int64), run_ids))
        # Two sorted runs: the stable sort (timsort) merges them in linear time.
        order = np.argsort(starts, kind="stable")
        return ids[order], starts[order], cps
