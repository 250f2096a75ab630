"""``lub_fast.data.inputs``: reading raw text as documents in bounded chunks."""

from lub_fast.data import inputs
from lub_fast.data.pipeline import PrepareConfig


def test_prepare_long_line_pieces_end_at_sentences_and_stay_small(tmp_path):
    sentence = "中华人民共和国成立了，人民站起来了。"
    line = sentence * 20_000  # 1 MB
    path = tmp_path / "long.txt"
    path.write_text("第一行。\n" + line + "\n最后一行。\n", encoding="utf-8")
    config = PrepareConfig(chunk_kb=64)
    reader = inputs.Reader([str(path)], config)
    chunks = list(reader.chunks())
    pieces = [(line_text, i in continued) for chunk in chunks for _, _, lines, continued in chunk.docs
              for i, line_text in enumerate(lines)]
    sizes = [sum(len(t.encode()) for _, _, lines, _ in chunk.docs for t in lines) for chunk in chunks]
    assert max(sizes) <= 2 * 64 * 1024, f"chunk bytes {max(sizes)}: memory is bounded by the chunk size"
    assert reader.counts["lines_read"] == 3
    assert [p[1] for p in pieces].count(False) == 3, "one first piece per line"
    assert "".join(t for t, _ in pieces[1:-1]) == line + "\n"
    assert len(pieces) > 10 and all(t.rstrip().endswith("。") for t, _ in pieces[1:-1]), "pieces end at sentence ends"
