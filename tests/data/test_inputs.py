"""``lub_fast.data.inputs``: reading raw text as documents in bounded chunks, and cutting files into
units at byte positions that workers agree on without reading what comes before."""

import gzip
import json

import pytest

from lub_fast.data import inputs
from lub_fast.data.pipeline import PrepareConfig


def _read_all(files, chunk_kb):
    """Every document of every unit, in order, and the reader's counts."""
    reader = inputs.Reader([str(f) for f in files], PrepareConfig(chunk_kb=chunk_kb))
    units = inputs.plan_units([str(f) for f in files], chunk_kb * 1024)
    docs = [doc for unit in units for chunk in reader.chunks(unit) for doc in chunk]
    return units, docs, reader.counts


def _lines(*docs):
    """The lines of documents, the pieces of a long line joined (a document split inside a long line
    begins with a piece continuing the one before)."""
    lines = []
    for doc in docs:
        for i, piece in enumerate(doc[3]):
            if i in doc[4]:
                lines[-1] += piece
            else:
                lines.append(piece)
    return [line.rstrip("\n") for line in lines]


def test_prepare_long_line_pieces_end_at_sentences_and_stay_small(tmp_path):
    sentence = "中华人民共和国成立了，人民站起来了。"
    line = sentence * 20_000  # 1 MB
    path = tmp_path / "long.txt"
    path.write_text("第一行。\n" + line + "\n最后一行。\n", encoding="utf-8")
    config = PrepareConfig(chunk_kb=64)
    reader = inputs.Reader([str(path)], config)
    units = inputs.plan_units([str(path)], 64 * 1024)
    chunks = [chunk for unit in units for chunk in reader.chunks(unit)]
    pieces = [(line_text, i in continued) for chunk in chunks for _, _, _, lines, continued in chunk
              for i, line_text in enumerate(lines)]  # fmt: skip
    sizes = [sum(len(t.encode()) for _, _, _, lines, _ in chunk for t in lines) for chunk in chunks]
    assert len(units) > 10 and max(sizes) <= 2 * 64 * 1024, f"chunk bytes {max(sizes)}: bounded by the chunk size"
    assert reader.counts["lines_read"] == 3
    assert [p[1] for p in pieces].count(False) == 3, "one first piece per line"
    assert "".join(t for t, _ in pieces[1:-1]) == line + "\n"
    assert len(pieces) > 10 and all(t.rstrip().endswith("。") for t, _ in pieces[1:-1]), "pieces end at sentence ends"


@pytest.mark.parametrize("chunk_kb", [1, 3, 7, 64])
def test_inputs_units_read_every_line_once_and_keep_documents(tmp_path, real_lines, write_documents, chunk_kb):
    """Cut at every chunk_kb KB, the units together read the file's lines once each, in order, in
    the documents of the file (every document shorter than the chunk stays whole)."""
    lines = real_lines[:400]
    path = write_documents(str(tmp_path / "docs.txt"), lines, lines_per_document=5)
    units, docs, counts = _read_all([path], chunk_kb)
    assert len(units) >= (1 if chunk_kb == 64 else 8), len(units)
    read = _lines(*docs)
    assert read == lines, "each line once, in order"
    assert counts["lines_read"] == 400 + 80 and counts["blank"] == 80
    whole = [lines[i : i + 5] for i in range(0, 400, 5)]
    got = [_lines(doc) for doc in docs if not doc[4] or doc[4][0]]
    short = [d for d in whole if len("\n".join(d).encode()) < chunk_kb * 1024 // 2]
    assert all(d in got for d in short), "documents shorter than half a chunk are never cut"
    assert counts["documents_split"] == len(docs) - len(whole)


def test_inputs_units_cut_a_document_longer_than_the_chunk_once_per_boundary(tmp_path, real_lines):
    path = tmp_path / "one.txt"
    path.write_text("\n".join(real_lines[:600]) + "\n", encoding="utf-8")  # one document, no blank line
    units, docs, counts = _read_all([path], 4)
    assert _lines(*docs) == real_lines[:600]
    assert counts["documents_split"] == len(docs) - 1 and len(docs) >= len(units) - 1 > 5, (len(docs), len(units))


def test_inputs_line_numbers_of_a_unit_count_from_the_file_start(tmp_path):
    rows = [json.dumps({"text": f"第{i}行。"}, ensure_ascii=False) for i in range(3000)]
    rows[2500] = '{"text": "坏'  # malformed: the error names line 2501
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    units, docs, _ = _read_all([path], 2)
    assert len(units) > 10 and len(docs) == 3000
    _, offset, first, _, _ = next(d for d in docs if d[3][0].startswith('{"text": "坏'))
    assert offset > 0 and inputs.line_number(str(path), offset, first) == 2501


def test_inputs_small_files_share_a_unit_and_compressed_files_stay_whole(tmp_path, real_lines, write_documents):
    small = [write_documents(str(tmp_path / f"s{i}.txt"), real_lines[i * 10 : i * 10 + 10]) for i in range(5)]
    packed = tmp_path / "big.txt.gz"
    with gzip.open(packed, "wb") as f:
        f.write(("\n".join(real_lines[:1000]) + "\n").encode())
    units = inputs.plan_units(small + [str(packed)], 64 * 1024)
    assert [len(u.segments) for u in units] == [6], "five small files and the compressed one in one unit"
    assert units[0].segments[-1].whole and not any(s.whole for s in units[0].segments[:-1])
    units, _, counts = _read_all(small + [packed], 1)
    assert sum(1 for u in units for s in u.segments if s.file_index == 5) == 1, "a .gz file is one segment"
    assert counts["lines_read"] == 5 * (10 + 1) + 1000
