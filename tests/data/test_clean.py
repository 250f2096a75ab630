import random

import numpy as np
import pytest

from lub_fast.data.clean import clean_line, last_sentence_end, sniff_encoding, split_sentences, to_simplified


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


def test_sniff_encoding_binary_only_by_measure():
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 10
    assert sniff_encoding(png)[0] is None and "binary file" in sniff_encoding(png)[1]
    assert sniff_encoding(np.random.default_rng(0).bytes(8192))[0] is None, "random (compressed) bytes are binary"
    text = ("中文的一行。\n" * 400).encode()
    stray = text[:3000] + b"\x00" + text[3000:]
    assert sniff_encoding(stray) == ("utf-8", ""), "a stray NUL is a control character, not a binary file"
    assert sniff_encoding(b"\x00" * 20 + text[:8000]) == ("utf-8", "")
    assert sniff_encoding("中文\n".encode("gbk")) == ("utf-8", ""), "GBK is text with invalid UTF-8"
    assert sniff_encoding(b"") == ("utf-8", "")


@pytest.mark.parametrize(
    "encoding, data, expected",
    [
        ("utf-16", "第一行。\nsecond line\n" * 200, "utf-16"),
        ("utf-16-le", "中文的第一行。\n第二行！\n" * 200, "utf-16-le"),
        ("utf-16-be", "中文的第一行。\n第二行！\n" * 200, "utf-16-be"),
        ("utf-16-le", "ASCII only text\n" * 200, "utf-16-le"),
        ("utf-32", "第一行。\n" * 200, "utf-32"),
    ],
)
def test_sniff_encoding_utf16(encoding, data, expected):
    got, why = sniff_encoding(data.encode(encoding)[:8192])
    assert got == expected, (got, why)
    assert data[:500] == data.encode(encoding)[:8192].decode(got, "replace")[:500]


def test_last_sentence_end_bytes():
    raw = "第一句。”第二句！？第三……第四".encode()
    end = last_sentence_end(raw)
    assert raw[:end].decode() == "第一句。”第二句！？第三……", raw[:end].decode()
    assert last_sentence_end("没有标点的句子".encode()) == 0
    assert last_sentence_end("结尾。".encode()) == 0, "a sentence end at the very end is no cut"


def test_to_simplified():
    pytest.importorskip("opencc")
    assert to_simplified("漢字轉換，臺灣") == "汉字转换，台湾"
