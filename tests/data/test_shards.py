import json
import os
import pickle
import shutil

import numpy as np
import pytest

from lub_fast.data.shards import (
    FORMAT_VERSION,
    Shard,
    ShardError,
    ShardWriter,
    open_shards,
    token_dtype,
)


@pytest.fixture
def shard_copy(prepared_dir, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(prepared_dir, out)
    return out


def test_token_dtype_by_vocab_size():
    assert token_dtype(21128) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_shard_writer_roundtrip_odd_sizes(tmp_path, dtype):
    rng = np.random.default_rng(0)
    writer = ShardWriter(str(tmp_path), 0, dtype)
    all_ids, all_flags, all_sent, all_docs = [], [], [], []
    for n in (1, 7, 13, 64, 97, 3):  # bit packing carries across appends
        ids = rng.integers(0, 60000, n)
        flags = rng.random(n) < 0.6
        sent = np.array([n]) if n < 5 else np.array([n // 2, n - n // 2])
        writer.append(ids, flags, sent, np.array([len(sent)]))
        all_ids.append(ids), all_flags.append(flags), all_sent.append(sent), all_docs.append(len(sent))
    header = writer.close({})
    shard = Shard(str(tmp_path), header)
    ids, flags = np.concatenate(all_ids), np.concatenate(all_flags)
    assert header["max_token_id"] == ids.max(), "recorded at write time: open_shards checks it without reading ids"
    np.testing.assert_array_equal(shard.ids, ids)
    assert shard.ids.dtype == dtype
    np.testing.assert_array_equal(shard.word_start(0, len(ids)), flags)
    for a, b in [(0, 1), (3, 11), (8, 16), (9, 10), (100, len(ids))]:
        np.testing.assert_array_equal(shard.word_start(a, b), flags[a:b], err_msg=f"tokens {a}:{b}")
    np.testing.assert_array_equal(shard.sentence_offsets, np.concatenate(([0], np.cumsum(np.concatenate(all_sent)))))
    np.testing.assert_array_equal(shard.document_offsets, np.concatenate(([0], np.cumsum(all_docs))))
    shard.verify_checksums()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_open_shards_valid(prepared_dir):
    shards = open_shards(prepared_dir, check_checksums=True)
    assert len(shards.shards) >= 3, "the fixture is prepared into several shards"
    assert shards.num_documents == 75
    assert shards.num_tokens == sum(s.num_tokens for s in shards.shards) > 0
    assert os.path.isfile(shards.vocab_path)
    for shard in shards.shards:
        assert int(shard.ids.max()) < shards.vocab_size


def test_open_shards_truncated_ids(shard_copy):
    path = shard_copy / "shard-00001.ids"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2)
    with pytest.raises(ShardError, match=r"shard-00001\.ids: .*truncated or mismatched"):
        open_shards(shard_copy)


def test_open_shards_missing_file(shard_copy):
    os.remove(shard_copy / "shard-00000.wstart")
    with pytest.raises(ShardError, match=r"shard-00000\.wstart: missing"):
        open_shards(shard_copy)


def test_open_shards_other_vocab(shard_copy):
    with open(shard_copy / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("新词\n")
    with pytest.raises(ShardError, match=r"vocab\.txt: sha256 differs"):
        open_shards(shard_copy)


def test_open_shards_token_out_of_range(shard_copy):
    ids = np.memmap(shard_copy / "shard-00000.ids", dtype="<u2", mode="r+")
    ids[5] = 65000
    ids.flush()
    del ids
    with pytest.raises(ShardError, match=r"shard-00000\.ids: token 5 has id 65000, not below"):
        open_shards(shard_copy, check_tokens=True)
    assert open_shards(shard_copy).shards[0].ids[5] == 65000, "opening reads no ids (prepare --verify does)"


def test_open_shards_checks_the_headers_max_token_id(shard_copy):
    header_path = shard_copy / "shard-00001.json"
    header = json.loads(header_path.read_text())
    vocab_size = json.loads((shard_copy / "meta.json").read_text())["vocab_size"]
    assert 0 < header["max_token_id"] < vocab_size
    header["max_token_id"] = vocab_size
    header_path.write_text(json.dumps(header))
    with pytest.raises(ShardError, match=rf"shard-00001\.json: max_token_id {vocab_size} is not below the vocabulary"):
        open_shards(shard_copy)
    del header["max_token_id"]
    header_path.write_text(json.dumps(header))
    with pytest.raises(ShardError, match=r"shard-00001\.json: a version 2 header lacks 'max_token_id'"):
        open_shards(shard_copy)


def test_open_shards_reads_format_version_1(shard_copy, prepared_dir):
    """Version 1 (before max_token_id): the same shards, read the same; their ids are checked by
    prepare --verify (check_tokens) only."""
    for path in [shard_copy / "meta.json", *shard_copy.glob("shard-*.json")]:
        header = json.loads(path.read_text())
        header["version"] = 1
        header.pop("max_token_id", None)
        path.write_text(json.dumps(header))
    old, new = open_shards(shard_copy, check_tokens=True), open_shards(prepared_dir)
    assert [s.num_tokens for s in old.shards] == [s.num_tokens for s in new.shards]
    np.testing.assert_array_equal(old.shards[1].ids, new.shards[1].ids)


def test_shard_pickles_as_paths(prepared_dir):
    shard = open_shards(prepared_dir).shards[0]
    data = pickle.dumps(shard)
    assert len(data) < 4096 < shard.ids.nbytes, f"{len(data)} bytes pickled"
    again = pickle.loads(data)
    np.testing.assert_array_equal(again.ids, shard.ids)
    np.testing.assert_array_equal(again.sentence_offsets, shard.sentence_offsets)


def test_open_shards_checksums_on_demand(shard_copy):
    ids = np.memmap(shard_copy / "shard-00002.ids", dtype="<u2", mode="r+")
    ids[0] = (int(ids[0]) + 1) % 100
    ids.flush()
    del ids
    shards = open_shards(shard_copy)  # sizes and ranges still fine
    with pytest.raises(ShardError, match=r"shard-00002\.ids: sha256"):
        shards.verify_checksums()
    with pytest.raises(ShardError, match=r"shard-00002\.ids: sha256"):
        open_shards(shard_copy, check_checksums=True)


def test_open_shards_mismatched_shard_from_other_run(shard_copy, tmp_path):
    header_path = shard_copy / "shard-00001.json"
    header = json.loads(header_path.read_text())
    header["settings_sha256"] = "0" * 64
    header_path.write_text(json.dumps(header))
    with pytest.raises(ShardError, match=r"shard-00001\.json: settings_sha256"):
        open_shards(shard_copy)


def test_open_shards_header_counts_disagree_with_files(shard_copy):
    header_path = shard_copy / "shard-00000.json"
    header = json.loads(header_path.read_text())
    header["num_sentences"] += 1
    header_path.write_text(json.dumps(header))
    with pytest.raises(ShardError, match=r"shard-00000\.sentences: .* bytes, the header's counts need"):
        open_shards(shard_copy)


def test_open_shards_corrupt_index(shard_copy):
    offsets = np.memmap(shard_copy / "shard-00000.sentences", dtype="<i8", mode="r+")
    offsets[2], offsets[3] = offsets[3], offsets[2]
    offsets.flush()
    del offsets
    open_shards(shard_copy)  # opening reads the index ends only
    with pytest.raises(ShardError, match=r"shard-00000\.sentences: sentence offsets must rise"):
        open_shards(shard_copy, check_tokens=True)


def test_open_shards_version_and_missing_meta(shard_copy, tmp_path):
    meta_path = shard_copy / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=rf"meta\.json: format .* version {FORMAT_VERSION + 1}, this lub_fast reads"):
        open_shards(shard_copy)
    meta_path.write_text("{not json")
    with pytest.raises(ShardError, match=r"meta\.json: not valid JSON"):
        open_shards(shard_copy)
    os.remove(meta_path)
    with pytest.raises(ShardError, match=r"meta\.json: missing \(prepare did not finish"):
        open_shards(shard_copy)
    with pytest.raises(ShardError, match="not a directory"):
        open_shards(tmp_path / "nowhere")
