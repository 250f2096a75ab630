import os
import shutil

import numpy as np
import pytest

from lub_fast.data.segment import Segmenter, read_user_dict
from lub_fast.data.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer, build_vocab, file_sha256

MIXED = [
    "Héllo WORLD İstanbul ǅ café naïve",
    "卡拉OK和T恤 3.14 iPhone6手机 ｔｈｅ full-width ＡＢＣ１２３",
    "豈更車 \u0301中\u0301 a\u0301 a\x00b \ufeffbom\u200bzero width",
    "😀emoji𠀀𪚥 ［括号］「引号」（圆括号）《书名》—— …… ·",
    "\U0002b820\U0002b821中\U0002b91f\U0002b920文",  # HF's CJK ranges skip U+2B820-U+2B91F
    "a,b;c!d?e [MASK] [CLS] http://example.com/a_b?c=1&d=2 user@mail.cn",
    "x" * 150 + " " + "中" * 3 + "y" * 99,
    "",
    " ",
    "\n\n第一句。\n第二句！\n",
]


def test_tokenizer_ids_equal_hf_on_real_text(tokenizer, real_lines):
    text = "\n".join(real_lines[:2000])
    ids, starts = tokenizer.encode(text)
    ref = tokenizer.hf.encode(text, add_special_tokens=False)
    assert ids.tolist() == ref.ids, "ids differ from HF tokenizers on the whole text"
    assert starts.tolist() == [o[0] for o in ref.offsets]


@pytest.mark.parametrize("text", MIXED)
def test_tokenizer_ids_equal_hf_on_mixed_scripts(tokenizer, text):
    ids, starts = tokenizer.encode(text)
    ref = tokenizer.hf.encode(text, add_special_tokens=False)
    assert ids.tolist() == ref.ids
    assert starts.tolist() == [o[0] for o in ref.offsets]


def test_tokenizer_equals_transformers_bert_tokenizer(tokenizer, vocab_path, real_lines, tmp_path):
    transformers = pytest.importorskip("transformers")
    shutil.copy(vocab_path, tmp_path / "vocab.txt")
    hf = transformers.BertTokenizer.from_pretrained(str(tmp_path), do_lower_case=True)
    for line in real_lines[:300] + MIXED[:4]:  # MIXED[4] has "[MASK]": special to transformers, text to us
        ours = tokenizer.encode(line)[0].tolist()
        theirs = hf(line, add_special_tokens=False)["input_ids"]
        assert ours == theirs, line


def test_build_vocab_deterministic_bert_format(real_lines, vocab_path, tokenizer, tmp_path):
    again = build_vocab(real_lines, 6000, str(tmp_path / "vocab.txt"))
    assert file_sha256(again) == file_sha256(vocab_path), "same corpus, same vocabulary"
    tokens = open(vocab_path, encoding="utf-8").read().split("\n")[:-1]
    assert tuple(tokens[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS
    assert len(tokens) == len(set(tokens))
    assert any(t.startswith("##") for t in tokens), "WordPiece continuations are trained"
    ids, _ = tokenizer.encode("\n".join(real_lines[2000:3000]))
    unk_rate = float(np.mean(ids == tokenizer.unk_id))
    assert unk_rate < 0.01, f"[UNK] rate {unk_rate:.4f} on lines of the same corpus"


def _vocab(tmp_path, tokens):
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in list(SPECIAL_TOKENS) + tokens), encoding="utf-8")
    return WordPieceTokenizer(str(path))


def _words(tok, text, segmenter):
    ids, _, word_start, mismatches = tok.encode_words(text, segmenter.boundaries(text))
    words = []
    for token, start in zip((tok.vocab[i] for i in ids), word_start):
        if start:
            words.append([])
        words[-1].append(token)
    return words, mismatches


def test_word_starts_follow_jieba_words(tmp_path):
    tok = _vocab(tmp_path, list("中华人民共和国成立了"))
    words, mismatches = _words(tok, "中华人民共和国成立了", Segmenter("jieba"))
    assert words == [list("中华人民共和国"), list("成立"), ["了"]]
    assert mismatches == 0


def test_word_starts_wordpiece_continuations_and_mismatches(tmp_path):
    tok = _vocab(tmp_path, ["卡", "拉", "和", "t", "恤", "hello", "##world", "3", ".", "14", "ok"])
    words, mismatches = _words(tok, "卡拉OK和T恤 helloworld 3.14", Segmenter("jieba"))
    # jieba: 卡拉 / OK / 和 / T恤 / helloworld / 3 / . / 14
    assert words == [["卡", "拉"], ["ok"], ["和"], ["t", "恤"], ["hello", "##world"], ["3"], ["."], ["14"]]
    assert mismatches == 0
    # 卡拉OK as one user-dictionary word: the tokens win, OK starts a word, one mismatch.
    user_dict = tmp_path / "user.txt"
    user_dict.write_text("卡拉OK 100000 n\n", encoding="utf-8")
    words, mismatches = _words(tok, "卡拉OK和", Segmenter("jieba", str(user_dict)))
    assert words == [["卡", "拉"], ["ok"], ["和"]]
    assert mismatches == 1


def test_word_starts_boundary_inside_a_token_is_a_mismatch(tmp_path):
    tok = _vocab(tmp_path, ["ｔｈｅ", "中"])
    words, mismatches = _words(tok, "中ｔｈｅ", Segmenter("jieba"))  # jieba cuts full-width letters apart
    assert words == [["中"], ["ｔｈｅ"]]
    assert mismatches == 2, "boundaries before ｈ and ｅ fall inside the token ｔｈｅ"


def test_word_starts_none_segmenter_is_wordpiece(tmp_path):
    tok = _vocab(tmp_path, list("中华人民") + ["hello", "##world"])
    words, mismatches = _words(tok, "中华人民helloworld", Segmenter("none"))
    assert words == [["中"], ["华"], ["人"], ["民"], ["hello", "##world"]]
    assert mismatches == 0


def test_segmenters_jieba_rjieba_agree_on_real_text(real_lines):
    text = "\n".join(real_lines)
    jieba_words = Segmenter("jieba").cut(text)
    rjieba_words = Segmenter("rjieba").cut(text)
    assert jieba_words == rjieba_words, f"{len(jieba_words)} vs {len(rjieba_words)} words"


def test_segmenters_agree_with_user_dict(real_lines, tmp_path):
    user_dict = tmp_path / "user.txt"
    user_dict.write_text("\ufeff新年讲话 200000 n\n泽民主席\n迈向充满\n", encoding="utf-8")
    assert read_user_dict(str(user_dict))[0] == ("新年讲话", 200000, "n")
    text = "\n".join(real_lines[:1000])
    jieba_words = Segmenter("jieba", str(user_dict)).cut(text)
    rjieba_words = Segmenter("rjieba", str(user_dict)).cut(text)
    assert "新年讲话" in jieba_words
    assert jieba_words == rjieba_words


def test_segmenter_boundaries_cover_the_text():
    seg = Segmenter("rjieba")
    text = "中华人民共和国成立了。\nhello world"
    b = seg.boundaries(text)
    assert b.shape == (len(text) + 1,)
    assert b[0] and b[-1] and b[text.index("\n") + 1]
    assert not b[1], "中华人民共和国 is one word"


def test_tokenizer_is_picklable_for_workers(tokenizer):
    import pickle

    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("中文abc")[0].tolist() == tokenizer.encode("中文abc")[0].tolist()
    assert os.path.samefile(clone.vocab_path, tokenizer.vocab_path)


def test_model_vocab_reads_tokenizer_json_and_refuses_what_is_not_wordpiece(tmp_path):
    """``model_vocab``: vocab.txt, else tokenizer.json's WordPiece in id order; the finetune loader
    refuses a non-WordPiece tokenizer.json and ids with gaps through it."""
    import json

    from tokenizers import Tokenizer, models

    from lub_fast.data.tokenizer import VocabularyError, _bert_pipeline, model_vocab
    from lub_fast.tasks.base import load_tokenizer

    tokens = list(SPECIAL_TOKENS) + ["人", "中", "##国", "a"]
    assert model_vocab(tmp_path) is None
    vocab = {t: i for i, t in enumerate(tokens)}
    _bert_pipeline(models.WordPiece(vocab, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    assert model_vocab(tmp_path) == (tokens, str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    assert model_vocab(tmp_path) == (tokens, str(tmp_path / "vocab.txt"))

    (tmp_path / "vocab.txt").unlink()
    gaps = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    gaps["model"]["vocab"]["a"] = 20
    (tmp_path / "tokenizer.json").write_text(json.dumps(gaps), encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"ids are not 0..8 without gaps"):
        load_tokenizer(tmp_path)
    Tokenizer(models.Unigram([(t, -1.0) for t in tokens], unk_id=1)).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(VocabularyError, match=r"a Unigram tokenizer, not WordPiece"):
        load_tokenizer(tmp_path)
