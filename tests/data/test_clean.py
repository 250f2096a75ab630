import random

import pytest

from lub_fast.data.clean import clean_line, looks_binary, split_sentences, to_simplified


def test_clean_line_removes_controls_bom_zero_width():
    text, removed = clean_line("\ufeff中\u200b文\x00 \x07a\u3000\u00a0b\t c\r\ue000")
    assert text == "中文 a b c"
    assert removed == 5, f"removed {removed}: BOM, ZWSP, NUL, BEL, private use"


def test_clean_line_whitespace_and_format_only_is_empty():
    assert clean_line(" \u3000\t\u200b\ufeff\r") == ("", 2)


def test_clean_line_removes_replacement_character():
    assert clean_line("坏\ufffd字") == ("坏字", 0)


def test_clean_line_matches_hf_bert_normalizer():
    from tokenizers import normalizers

    hf = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False)
    pool = [chr(c) for c in range(0x250)] + [chr(c) for c in range(0x2000, 0x2070)]
    pool += list("\u3000\ufeff\ufffd\ue000\u4e2d\u3002\u00a0\u1680\u2028\u2029\u202f\u205f") + ["\U0001f600"]
    rng = random.Random(0)
    for _ in range(2000):
        s = "".join(rng.choice(pool) for _ in range(24))
        ours, _ = clean_line(s)
        theirs = " ".join(hf.normalize_str(s).split())
        assert ours == theirs, f"{s!r}: {ours!r} != {theirs!r}"


def test_split_sentences_at_chinese_punctuation_keeps_closing_quotes():
    sentences, long_sentences, hard_cuts = split_sentences("你好。我很好！真的吗？他说：“走吧。”然后走了……好", 256)
    assert sentences == ["你好。", "我很好！", "真的吗？", "他说：“走吧。”", "然后走了……", "好"]
    assert (long_sentences, hard_cuts) == (0, 0)


def test_split_sentences_long_sentence_at_clauses_then_hard_cut():
    clause = "甲" * 50 + "，"
    sentences, long_sentences, hard_cuts = split_sentences(clause * 10 + "乙" * 300 + "。", 120)
    assert all(len(s) <= 120 for s in sentences), max(map(len, sentences))
    assert "".join(sentences) == clause * 10 + "乙" * 300 + "。"
    assert long_sentences == 1
    assert hard_cuts == 2, f"300 unpunctuated characters at 120 a piece need 2 cuts, got {hard_cuts}"
    assert sentences[0] == clause * 2, "clauses are packed up to the limit"


def test_split_sentences_ten_megabyte_line():
    line = ("中华人民共和国成立了" * 5 + "。") * 100_000 + "无标点" * 1_000_000
    assert len(line.encode()) > 10_000_000
    sentences, long_sentences, hard_cuts = split_sentences(line, 256)
    assert max(map(len, sentences)) <= 256
    assert sum(map(len, sentences)) == len(line)
    assert (long_sentences, hard_cuts) == (1, 3_000_000 // 256), (long_sentences, hard_cuts)


def test_looks_binary():
    assert looks_binary(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert looks_binary("text 中文".encode("utf-16-le"))
    assert not looks_binary("中文\n".encode("utf-8"))
    assert not looks_binary("中文\n".encode("gbk"))


def test_to_simplified():
    pytest.importorskip("opencc")
    assert to_simplified("漢字轉換，臺灣") == "汉字转换，台湾"
