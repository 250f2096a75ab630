import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from lub_fast.data import dataset as dataset_module
from lub_fast.data.dataset import PretrainDataset, permute, plan_chunks, truncation
from lub_fast.data.shards import ShardError, open_shards
from lub_fast.data.pipeline import prepare_corpus


def _same(x, y):
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _find(shards, tokens):
    """Whether ``tokens`` occur contiguously in some shard's ids."""
    needle = np.asarray(tokens, dtype=shards.shards[0].ids.dtype).tobytes()
    for shard in shards.shards:
        hay = np.asarray(shard.ids).tobytes()
        at = hay.find(needle)
        while at != -1 and at % 2:
            at = hay.find(needle, at + 1)
        if at != -1:
            return True
    return False


def test_truncation_matches_bert_loop():
    def bert(la, lb, m):
        ca = cb = 0
        while la + lb > m:
            if la > lb:
                la, ca = la - 1, ca + 1
            else:
                lb, cb = lb - 1, cb + 1
        return ca, cb

    for la in range(30):
        for lb in range(30):
            for m in (2, 5, 17, 40):
                assert truncation(la, lb, m) == bert(la, lb, m), (la, lb, m)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 100, 1000, 4099])
def test_permute_is_a_bijection(n):
    images = [permute(i, n, 12345) for i in range(n)]
    assert sorted(images) == list(range(n))
    if n >= 100:
        assert images != list(range(n)) and images != [permute(i, n, 54321) for i in range(n)]


def test_plan_chunks_greedy_fill():
    lengths = np.array([3, 4, 5, 1, 9, 2, 2, 2])
    sentences = np.concatenate(([0], np.cumsum(lengths)))
    documents = np.array([0, 5, 6, 8])  # 5 sentences, 1, 2
    starts, dropped = plan_chunks(sentences, documents, key=1, max_tokens=8, short_seq_prob=0.0, min_sentences=1)
    # doc 0: [3,4] reaches 8? 7 < 8 so [3,4,5]; then [1,9]; doc 1: [2]; doc 2: [2,2]
    assert starts.tolist() == [0, 3, 5, 6] and dropped == 0
    starts, dropped = plan_chunks(sentences, documents, key=1, max_tokens=8, short_seq_prob=0.0, min_sentences=2)
    assert starts.tolist() == [0, 3, 6] and dropped == 1, "SOP: doc 1 has one sentence"


def test_dataset_examples_are_pure_functions_of_seed_and_index(prepared_dir):
    a = PretrainDataset(prepared_dir, max_seq_len=64, seed=3)
    b = PretrainDataset(prepared_dir, max_seq_len=64, seed=3)
    order = np.random.default_rng(0).permutation(len(a))[:200]
    for i in order:
        _same(a[int(i)], b[int(i)])
    assert a[5]["index"] == 5
    other_seed = PretrainDataset(prepared_dir, max_seq_len=64, seed=4)
    assert any(not np.array_equal(a[i]["input_ids"], other_seed[i]["input_ids"]) for i in range(20))
    a.set_epoch(1)
    assert any(not np.array_equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(20)), "epochs reorder"


def test_dataset_ranks_partition_examples(prepared_dir):
    whole = PretrainDataset(prepared_dir, max_seq_len=64, seed=1)
    ranks = [PretrainDataset(prepared_dir, max_seq_len=64, seed=1, rank=r, world_size=3) for r in range(3)]
    assert all(len(r) == len(whole) // 3 for r in ranks)
    seen = set()
    for r, ds in enumerate(ranks):
        for i in range(0, len(ds), 7):
            ex = ds[i]
            assert ex["index"] == r + 3 * i
            _same(ex, whole[r + 3 * i])
            seen.add(ex["index"])
    assert len(seen) == sum(len(range(0, len(ds), 7)) for ds in ranks), "no example on two ranks"


@pytest.mark.parametrize("pair", ["sop", "nsp", None])
def test_dataset_example_layout(prepared_dir, pair):
    ds = PretrainDataset(prepared_dir, max_seq_len=48, pair=pair, seed=0)
    label_key = {"sop": "sentence_order_label", "nsp": "next_sentence_label", None: None}[pair]
    lengths = []
    for i in range(0, len(ds), max(1, len(ds) // 300)):
        ex = ds[i]
        ids, types, ws = ex["input_ids"], ex["token_type_ids"], ex["word_start"]
        assert ids.dtype == np.int64 and types.dtype == np.int64 and ws.dtype == bool
        assert len(ids) == len(types) == len(ws) <= 48
        sep = np.flatnonzero(ids == ds.sep_token_id)
        assert ids[0] == ds.cls_token_id and sep[-1] == len(ids) - 1
        assert len(sep) == (2 if pair else 1)
        np.testing.assert_array_equal(types, np.arange(len(ids)) > sep[0])
        assert ws[0] and ws[sep].all()
        assert (label_key in ex) == (pair is not None)
        if pair:
            assert ex[label_key] in (0, 1)
            assert sep[0] >= 2 and sep[1] - sep[0] >= 2, "both segments hold tokens"
        lengths.append(len(ids))
    assert np.median(lengths) == 48, "examples are filled to max_seq_len"


def test_dataset_sop_segments_are_consecutive_or_swapped(prepared_dir):
    ds = PretrainDataset(prepared_dir, max_seq_len=512, pair="sop", seed=0)
    shards = open_shards(prepared_dir)
    labels = []
    for i in range(150):
        ex = ds[i]
        ids = ex["input_ids"]
        sep = np.flatnonzero(ids == ds.sep_token_id)
        a, b = ids[1 : sep[0]], ids[sep[0] + 1 : sep[1]]
        if len(ids) == 512:
            continue  # truncated: the segments need not touch
        label = ex["sentence_order_label"]
        first, second = (b, a) if label else (a, b)
        assert _find(shards, np.concatenate((first, second))), f"example {i}: label {label} but not contiguous"
        labels.append(label)
    assert 0 < np.mean(labels) < 1, f"both orders are checked ({len(labels)} examples)"


def _label_rate(ds, samples=100_000):
    """The mean label over whole epochs of ``ds`` (at least ``samples`` examples), from
    ``segments`` (no arrays built)."""
    labels, epoch = [], 0
    while len(labels) < samples:
        ds.set_epoch(epoch)
        labels += [ds.segments(i)[3][1] for i in range(len(ds))]
        epoch += 1
    return np.mean(labels), len(labels)


def _single_sentence_chunks(ds):
    """The fraction of the plan's chunks that hold one sentence (NSP always pairs those at random)."""
    singles = 0
    for shard, starts in zip(ds.shards, ds._plans):
        starts = np.asarray(starts, dtype=np.int64)
        doc_ends = shard.document_offsets[np.searchsorted(shard.document_offsets, starts, side="right")]
        ends = np.minimum(np.append(starts[1:], shard.num_sentences), doc_ends)
        singles += int(np.count_nonzero(ends - starts == 1))
    return singles / ds.num_examples


def test_dataset_sop_swaps_half_the_pairs(prepared_dir):
    rate, n = _label_rate(PretrainDataset(prepared_dir, max_seq_len=64, pair="sop", seed=5))
    assert abs(rate - 0.5) <= 0.01, f"swapped fraction {rate:.4f} of {n} examples"


def test_dataset_nsp_takes_half_the_second_segments_from_other_documents(prepared_dir):
    ds = PretrainDataset(prepared_dir, max_seq_len=64, pair="nsp", seed=5)
    expected = 0.5 + 0.5 * _single_sentence_chunks(ds)
    rate, n = _label_rate(ds)
    assert abs(rate - expected) <= 0.01, f"random-next fraction {rate:.4f} of {n} examples, expected {expected:.4f}"


def test_dataset_nsp_negatives_come_from_other_documents(prepared_dir):
    ds = PretrainDataset(prepared_dir, max_seq_len=512, pair="nsp", seed=0)
    shards = open_shards(prepared_dir)
    labels = []
    for i in range(150):
        ex = ds[i]
        ids = ex["input_ids"]
        sep = np.flatnonzero(ids == ds.sep_token_id)
        a, b = ids[1 : sep[0]], ids[sep[0] + 1 : sep[1]]
        label = ex["next_sentence_label"]
        assert _find(shards, a) and _find(shards, b)
        if label == 0 and len(ids) < 512:
            assert _find(shards, np.concatenate((a, b))), f"example {i}: positive pair is not contiguous"
        labels.append(label)
    assert 0 < np.mean(labels) < 1, "both kinds of pair are checked"


def test_dataset_short_seq_prob_shortens_examples(prepared_dir):
    def short_fraction(p):
        ds = PretrainDataset(prepared_dir, max_seq_len=128, pair=None, short_seq_prob=p, seed=0)
        return np.mean([len(ds[i]["input_ids"]) < 64 for i in range(0, len(ds), 2)])

    never, always, default = short_fraction(0.0), short_fraction(1.0), short_fraction(0.1)
    assert never < 0.05 and always > 0.2, f"examples under 64 tokens: {never:.3f} at p=0, {always:.3f} at p=1"
    assert never < default < never + 0.1, f"{default:.3f} at p=0.1"


def test_dataset_word_start_matches_shard(prepared_dir):
    ds = PretrainDataset(prepared_dir, max_seq_len=512, pair=None, seed=0, shuffle=False)
    shard = open_shards(prepared_dir).shards[0]
    ex = ds[0]
    body = ex["input_ids"][1:-1]
    n = len(body)
    offset = next(o for o in range(64) if np.array_equal(shard.ids[o : o + n], body))  # front truncation
    flags = shard.word_start(offset, offset + n)
    flags[0] = True
    np.testing.assert_array_equal(ex["word_start"][1:-1], flags)


def test_dataset_single_sentence_documents(tmp_path, vocab_path, real_lines, write_documents):
    path = write_documents(tmp_path / "one.txt", real_lines[:60], lines_per_document=1)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(real_lines[100:110]) + "\n")
    out = prepare_corpus([path], str(tmp_path / "out"), vocab=vocab_path, segmenter="rjieba")
    single = sum(int(n == 1) for s in open_shards(out.output_dir).shards for n in np.diff(s.document_offsets))
    sop = PretrainDataset(out.output_dir, max_seq_len=64, pair="sop")
    assert sop.counts["single_sentence_documents"] == single > 0
    assert len(sop) > 0 and all(sop[i]["sentence_order_label"] in (0, 1) for i in range(len(sop)))
    nsp = PretrainDataset(out.output_dir, max_seq_len=64, pair="nsp")
    assert nsp.counts["single_sentence_documents"] == 0
    assert all(nsp[i]["next_sentence_label"] in (0, 1) for i in range(len(nsp)))


def test_dataset_vocab_and_special_ids(prepared_dir, tokenizer):
    ds = PretrainDataset(prepared_dir)
    assert Path(ds.vocab_path).read_text(encoding="utf-8") == Path(tokenizer.vocab_path).read_text(encoding="utf-8")
    assert (ds.pad_token_id, ds.cls_token_id, ds.sep_token_id, ds.mask_token_id, ds.unk_token_id) == (
        tokenizer.pad_id,
        tokenizer.cls_id,
        tokenizer.sep_id,
        tokenizer.mask_id,
        tokenizer.unk_id,
    )
    assert ds.vocab_size == tokenizer.vocab_size
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_rejects_shards_of_another_vocabulary(tmp_path, prepared_dir, corpus_path, real_lines):
    from lub_fast.data.tokenizer import build_vocab

    other = build_vocab(real_lines[:500], 2000, str(tmp_path / "vocab.txt"))
    out = prepare_corpus([corpus_path], str(tmp_path / "other"), vocab=other, segmenter="none")
    with pytest.raises(ShardError, match="vocabulary differs"):
        PretrainDataset([prepared_dir, out.output_dir])
    one, both = PretrainDataset(prepared_dir), PretrainDataset([prepared_dir, prepared_dir])
    assert both.counts["documents"] == 2 * one.counts["documents"]
    assert abs(len(both) - 2 * len(one)) < 0.1 * len(one), "shards differ only in their short-target draws"


def _flip_bit(path, byte, bit=0):
    with open(path, "r+b") as f:
        f.seek(byte)
        value = f.read(1)[0]
        f.seek(byte)
        f.write(bytes([value ^ (1 << bit)]))


@pytest.mark.parametrize("kind, byte", [("ids", 0), ("wstart", 3)])
def test_dataset_verifies_checksums_of_its_share_of_shards(tmp_path, prepared_dir, kind, byte):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(prepared_dir, copy)
    path = copy / f"shard-00001.{kind}"
    _flip_bit(path, byte)  # the lowest bit of an id below 6000 keeps it valid
    open_shards(copy)  # sizes, index and id ranges cannot see it
    with pytest.raises(ShardError, match=rf"shard-00001\.{kind}: sha256 .* differs from shard-00001\.json's"):
        PretrainDataset(copy, max_seq_len=64)
    assert len(PretrainDataset(copy, max_seq_len=64, verify_checksums=False)) > 0
    PretrainDataset(copy, max_seq_len=64, rank=0, world_size=2)  # rank 0 hashes shards 0, 2, ...
    with pytest.raises(ShardError, match=rf"shard-00001\.{kind}"):
        PretrainDataset(copy, max_seq_len=64, rank=1, world_size=2)


def _count_builds(monkeypatch, log):
    """Append the shard name of every plan built (in this process or its forks) to ``log``."""
    build = dataset_module._build_plan

    def counted(shard, spec):
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{spec['shard']}\n")
        return build(shard, spec)

    monkeypatch.setattr(dataset_module, "_build_plan", counted)
    return lambda: Path(log).read_text(encoding="utf-8").split() if os.path.exists(log) else []


def test_dataset_plans_are_cached_once_per_settings(tmp_path, monkeypatch, prepared_dir):
    monkeypatch.setenv("LUB_FAST_CACHE", str(tmp_path / "cache"))
    builds = _count_builds(monkeypatch, tmp_path / "builds")
    first = PretrainDataset(prepared_dir, max_seq_len=64, seed=2)
    assert sorted(builds()) == [s.name for s in first.shards]
    again = PretrainDataset(prepared_dir, max_seq_len=64, seed=2)
    assert len(builds()) == len(first.shards), "the second open maps the cached plans"
    assert len(again) == len(first)
    for i in range(0, len(first), 11):
        _same(first[i], again[i])
    PretrainDataset(prepared_dir, max_seq_len=96, seed=2)
    assert len(builds()) == 2 * len(first.shards), "other settings, other plans"
    assert len(os.listdir(tmp_path / "cache" / "plans")) == 2 * 2 * len(first.shards), "a .npy and a .json each"


def _open_in_child(prepared_dir, barrier, queue):
    barrier.wait()
    ds = PretrainDataset(prepared_dir, max_seq_len=64, seed=7, verify_checksums=False)
    queue.put([int(ds[i]["input_ids"].sum()) for i in range(0, len(ds), 17)])


def test_dataset_ranks_opening_at_once_build_each_plan_once(tmp_path, monkeypatch, prepared_dir):
    monkeypatch.setenv("LUB_FAST_CACHE", str(tmp_path / "cache"))
    builds = _count_builds(monkeypatch, tmp_path / "builds")
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    children = [ctx.Process(target=_open_in_child, args=(prepared_dir, barrier, queue)) for _ in range(3)]
    for child in children:
        child.start()
    results = [queue.get(timeout=300) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    names = [s.name for s in PretrainDataset(prepared_dir, max_seq_len=64, seed=7, verify_checksums=False).shards]
    assert sorted(builds()) == names, f"plans built: {sorted(builds())}"
    assert results[0] == results[1] == results[2]
    assert not [n for n in os.listdir(tmp_path / "cache" / "plans") if not n.endswith((".npy", ".json"))]


def test_dataset_pickles_without_its_data(tmp_path, monkeypatch, prepared_dir):
    monkeypatch.setenv("LUB_FAST_CACHE", str(tmp_path / "cache"))
    ds = PretrainDataset(prepared_dir, max_seq_len=64, seed=2)
    data = pickle.dumps(ds)
    plan_bytes = sum(p.nbytes for p in ds._plans)
    assert len(data) < 16384 and plan_bytes > 0, f"{len(data)} bytes pickled ({plan_bytes} bytes of plans)"
    again = pickle.loads(data)
    assert all(isinstance(p.base, np.memmap) for p in again._plans), "the plans are mapped again, not copied"
    assert all(isinstance(s.ids.base, np.memmap) for s in again.shards)
    for i in range(0, len(ds), 11):
        _same(again[i], ds[i])


def test_dataset_without_a_writable_cache_builds_plans_in_memory(tmp_path, monkeypatch, prepared_dir):
    cached = PretrainDataset(prepared_dir, max_seq_len=64, seed=2)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("LUB_FAST_CACHE", str(not_a_dir))
    with pytest.warns(UserWarning, match="no plan cache in .*file/plans .* building the example plans in memory"):
        in_memory = PretrainDataset(prepared_dir, max_seq_len=64, seed=2)
    assert len(in_memory) == len(cached)
    for i in range(0, len(cached), 11):
        _same(in_memory[i], cached[i])


def test_dataset_plan_build_checks_the_index(tmp_path, monkeypatch, prepared_dir):
    monkeypatch.setenv("LUB_FAST_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "shards"
    shutil.copytree(prepared_dir, copy)
    offsets = np.memmap(copy / "shard-00000.sentences", dtype="<i8", mode="r+")
    offsets[2], offsets[3] = offsets[3], offsets[2]
    offsets.flush()
    del offsets
    with pytest.raises(ShardError, match=r"shard-00000\.sentences: sentence offsets must rise"):
        PretrainDataset(copy, max_seq_len=64, verify_checksums=False)


def test_dataset_reads_format_version_1_shards_alike(tmp_path, prepared_dir):
    copy = tmp_path / "v1"
    shutil.copytree(prepared_dir, copy)
    for path in [copy / "meta.json", *copy.glob("shard-*.json")]:
        header = json.loads(path.read_text())
        header["version"] = 1
        header.pop("max_token_id", None)
        path.write_text(json.dumps(header))
    old, new = PretrainDataset(copy, max_seq_len=64, seed=3), PretrainDataset(prepared_dir, max_seq_len=64, seed=3)
    assert len(old) == len(new)
    for i in range(0, len(new), 7):
        _same(old[i], new[i])
