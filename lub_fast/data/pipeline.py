"""The ``prepare`` pipeline: raw text -> cleaned sentences -> words -> WordPiece ids -> shards.

Streaming and parallel, with a parent that only schedules. The input is planned from the files'
sizes alone (``lub_fast.data.inputs.plan_units``): units of about ``chunk_kb`` KB (uncompressed
UTF-8 files are cut at byte positions whose document boundary every reader finds on its own;
compressed and UTF-16/32 files are read whole), grouped into shards of at least ``shard_size_mb``
MiB of input. Workers (``lub_fast.data.workers``) read, clean, segment and tokenize units into unit files (``.units/`` in the
output) and, once all of a shard's units are done, write the shard from them; the parent receives
only counts (O(1) per unit) and merges them into the summary. Memory is bounded by the chunk size,
not the corpus, and the output is byte-identical for any worker count, and for any split into parts
(``part=(k, n)``: the k-th of n contiguous runs of the planned shards). A shard's header, written
last and atomically, marks it complete and holds its counts: a re-run with the same settings skips
complete shards (without reading their input) and goes on from there.

Every kept line is split into sentences at Chinese sentence punctuation (``lub_fast.data.clean``),
segmented into words (``lub_fast.data.segment``) and tokenized (``lub_fast.data.tokenizer``); the
counts of what was kept, dropped and fixed go to ``summary.json`` (``lub_fast.data.summary``).
"""

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from lub_fast.config_cli import ConfigError, check_fields, check_value, field_error, option
from lub_fast.config_cli import output_dir as output_dir_check
from lub_fast.data.clean import to_simplified
from lub_fast.data.inputs import NAMED_FIRST, PrepareError, Reader, find_inputs, plan_units
from lub_fast.data.parts import shard_dirs
from lub_fast.data.segment import SEGMENTERS, segmenter_settings
from lub_fast.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    SHARD_FILES,
    VOCAB_FILE,
    expected_sizes,
    open_shards,
    shard_name,
    token_dtype,
    write_json_atomic,
)
from lub_fast.data.summary import PrepareSummary, report
from lub_fast.data.tokenizer import check_vocab_file, file_sha256, read_vocab, tokenizer_settings
from lub_fast.data.tokenizer import build_vocab as build_vocab_fn
from lub_fast.data.workers import WORK_DIR, init_worker, init_worker_from_file, prepare_unit, vocab_chunk, write_shard

PREPARE_FILE = "prepare.json"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What ``prepare`` does with the text; all fields but ``strict`` determine the output."""

    segmenter: str = "jieba"
    user_dict: str | None = None
    t2s: bool = False
    strict: bool = False
    min_chars: int = option(2, flag="--min-chars", ge=1)
    max_sentence_chars: int = option(256, flag="--max-sentence-chars", ge=1)
    shard_size_mb: float = option(256.0, flag="--shard-size", gt=0)
    chunk_kb: int = option(1024, flag="--chunk-size", ge=1)

    def __post_init__(self):
        if self.segmenter not in SEGMENTERS:
            raise PrepareError(f"--segmenter must be one of {', '.join(SEGMENTERS)}, got {self.segmenter!r}")
        try:
            check_fields(self)
            if self.max_sentence_chars < self.min_chars:
                raise field_error(self, "max_sentence_chars", f">= --min-chars = {self.min_chars}")
        except ConfigError as error:
            raise PrepareError(str(error)) from None





def merge_named(into, named):
    """Append ``named`` (reason -> entries) to ``into``, keeping the first few per reason."""
    for reason, entries in named.items():
        kept = into.setdefault(reason, [])
        kept.extend(entries[: NAMED_FIRST - len(kept)])
    return into


@contextlib.contextmanager
def _pool(workers, init_args):
    """A process pool of ``workers`` started with ``init_worker(*init_args)``; None for one worker
    (the work runs in this process)."""
    if workers <= 1:
        init_worker(*init_args)
        yield None
        return
    # A dead worker (killed, out of memory, or a __main__ that spawn cannot re-import, as a script
    # read from stdin) breaks the pool and is reported, where multiprocessing.Pool would hang. The
    # initializer's arguments (the file list, the plan) travel through a file: spawn writes the
    # pickled process object into a pipe whose read end the parent keeps open until the write ends,
    # so a child that dies before reading more than the pipe's 64 KiB blocks the parent for good
    # (CPython's popen_spawn_posix).
    context = multiprocessing.get_context("spawn")
    with tempfile.NamedTemporaryFile(prefix="lub_fast-prepare-", suffix=".pkl") as init_file:
        pickle.dump(init_args, init_file, protocol=pickle.HIGHEST_PROTOCOL)
        init_file.flush()
        try:
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=init_worker_from_file, initargs=(init_file.name,)
            ) as pool:
                yield pool
        except BrokenProcessPool as error:
            raise PrepareError(
                f"a worker process died ({error}); with --workers > 1 the main module must be importable "
                "(not a script read from stdin), or use --workers 1"
            ) from None


def _in_order(pool, calls, in_flight):
    """``fn(*args)`` of each ``(fn, args)`` of ``calls``, in order, at most ``in_flight`` at a time."""
    if pool is None:
        for fn, args in calls:
            yield fn(*args)
        return
    pending = deque()
    for fn, args in calls:
        pending.append(pool.submit(fn, *args))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _CorpusSentences:
    """The cleaned sentences of the corpus, read afresh on every iteration (vocabulary training)."""

    def __init__(self, files, units, config, workers):
        self.files, self.units, self.config, self.workers = files, units, config, workers

    def __iter__(self):
        reader = Reader(self.files, self.config)
        calls = ((vocab_chunk, (docs,)) for unit in self.units for docs in reader.chunks(unit))
        with _pool(self.workers, (self.config, self.files, None)) as pool:
            for sentences in _in_order(pool, calls, 2 * self.workers):
                yield from sentences


def plan_shards(units, shard_bytes):
    """Consecutive units grouped into shards of at least ``shard_bytes`` of input (the last one
    less): ``[(first unit, end unit), ...]``, a function of the input alone."""
    shards, first, size = [], 0, 0
    for unit in units:
        size += unit.size
        if size >= shard_bytes:
            shards.append((first, unit.index + 1))
            first, size = unit.index + 1, 0
    if first < len(units):
        shards.append((first, len(units)))
    return shards


def _write_shards(todo, units, workers, init_args, extra, on_unit):
    """Write the shards ``todo`` (``(index, first unit, end unit)``) in parallel; yields their headers
    in order. Workers prepare units into unit files; once all of a shard's units are done, a worker
    writes the shard from them. The parent sees O(1) per unit: its counts and named entries."""
    with _pool(workers, init_args) as pool:
        calls = ((prepare_unit, (u,)) for _, first, end in todo for u in range(first, end))
        results = _in_order(pool, calls, 2 * workers)
        writing = deque()
        for index, first, end in todo:
            counts, named, invalid = Counter(), {}, Counter()
            for u in range(first, end):
                unit_counts, unit_named, unit_invalid, documents = next(results)
                counts.update(unit_counts)
                merge_named(named, unit_named)
                invalid.update(unit_invalid)
                on_unit(units[u].size, documents)
            header_extra = dict(extra, first_chunk=first, num_chunks=end - first,
                                counts=dict(sorted(counts.items())), named=named, invalid_utf8=dict(invalid))  # fmt: skip
            if pool is None:
                yield write_shard(index, range(first, end), header_extra)
                continue
            writing.append(pool.submit(write_shard, index, range(first, end), header_extra))
            while writing and writing[0].done():
                yield writing.popleft().result()
        while writing:
            yield writing.popleft().result()


# ----------------------------------------------------------------------------- output directory


def _settings(config, files, build_vocab):
    """Everything that determines the shards except the vocabulary's hash."""
    out_config = dataclasses.asdict(config)
    del out_config["strict"]
    if config.user_dict is not None:
        out_config["user_dict"] = file_sha256(config.user_dict)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": out_config,
        "build_vocab": build_vocab,
        "inputs": [[path, os.path.getsize(path)] for path in files],
        "tokenizer": tokenizer_settings(),
        "segmenter": segmenter_settings(config.segmenter, config.user_dict),
    }


def _sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _differences(old, new):
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def _remove_shards(output_dir, first):
    """Delete shard files numbered ``first`` and up (complete or not), meta.json and summary.json."""
    for name in os.listdir(output_dir):
        if name.startswith("shard-") and name[6:11].isdigit() and int(name[6:11]) >= first or name in (
            META_FILE,
            SUMMARY_FILE,
        ):
            os.remove(os.path.join(output_dir, name))
    shutil.rmtree(os.path.join(output_dir, WORK_DIR), ignore_errors=True)


def _remove_all(output_dir):
    """Delete everything prepare wrote in ``output_dir`` (other files stay)."""
    _remove_shards(output_dir, 0)
    for name in (PREPARE_FILE, VOCAB_FILE):
        if os.path.exists(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))


def _complete_shards(output_dir, settings_sha256, planned):
    """Headers of the complete shards 0, 1, ... written with these settings, as ``planned``
    (``(first unit, end unit)`` of each shard)."""
    headers = []
    while len(headers) < len(planned):
        path = os.path.join(output_dir, f"{shard_name(len(headers))}.json")
        try:
            with open(path, encoding="utf-8") as f:
                header = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return headers
        first, end = planned[len(headers)]
        if header.get("settings_sha256") != settings_sha256 or (header.get("first_chunk"), header.get("num_chunks")) != (
            first,
            end - first,
        ):
            return headers
        sizes = expected_sizes(header)
        for kind in SHARD_FILES:
            file_path = os.path.join(output_dir, header["files"][kind]["name"])
            if not os.path.isfile(file_path) or os.path.getsize(file_path) != sizes[kind]:
                return headers
        headers.append(header)
    return headers


# ----------------------------------------------------------------------------- entry points


def _vocab_data(vocab):
    """The vocab.txt bytes of ``--vocab``: a vocab.txt file as it is, or a model directory's (or a
    tokenizer.json file's) vocabulary as ``lub_fast.data.tokenizer.model_vocab`` reads it."""
    from lub_fast.data.tokenizer import TOKENIZER_JSON, VocabularyError, model_vocab, vocab_bytes, vocab_from_files

    try:
        if os.path.isdir(vocab):
            found = model_vocab(vocab)
            if found is None:
                raise PrepareError(f"{vocab}: a directory without vocab.txt or tokenizer.json")
            tokens, source = found
            vocab = source
            if source.endswith(TOKENIZER_JSON):
                return vocab_bytes(tokens)
        if not os.path.isfile(vocab):
            raise PrepareError(f"{vocab}: no such vocabulary file")
        with open(vocab, "rb") as f:
            data = f.read()
        if os.path.basename(vocab) == TOKENIZER_JSON:
            return vocab_bytes(vocab_from_files({TOKENIZER_JSON: data}, os.path.dirname(vocab)))
        return data
    except VocabularyError as error:
        raise PrepareError(str(error)) from None


def prepare_corpus(
    inputs,
    output_dir,
    *,
    vocab=None,
    build_vocab=None,
    segmenter="jieba",
    user_dict=None,
    workers=1,
    shard_size_mb=256.0,
    chunk_kb=1024,
    t2s=False,
    strict=False,
    min_chars=2,
    max_sentence_chars=256,
    overwrite=False,
    progress=False,
    part=None,
):
    """Prepare ``inputs`` (paths, directories, globs) into the shard directory ``output_dir``.

    ``part=(k, n)`` (1 <= k <= n) writes only the k-th of n contiguous runs of the shards that a
    one-machine run writes, numbered from 0 (``lub_fast.data.parts``); it needs ``vocab``.

    Exactly one of ``vocab`` (a bert-base-chinese-format vocab.txt, or a model directory: see
    ``_vocab_data``) and ``build_vocab`` (train a
    WordPiece vocabulary of about that many entries on the cleaned corpus) is needed. A re-run with
    the same arguments skips complete shards; other settings in a used directory raise
    ``PrepareError`` unless ``overwrite``. Returns a ``PrepareSummary``.
    """
    started = time.perf_counter()
    config = PrepareConfig(
        segmenter=segmenter,
        user_dict=os.fspath(user_dict) if user_dict is not None else None,
        t2s=t2s,
        strict=strict,
        min_chars=min_chars,
        max_sentence_chars=max_sentence_chars,
        shard_size_mb=shard_size_mb,
        chunk_kb=chunk_kb,
    )
    if (vocab is None) == (build_vocab is None):
        raise PrepareError("give exactly one of --vocab FILE and --build-vocab N")
    if part is not None and not 1 <= part[0] <= part[1]:
        raise PrepareError(f"part {part}: need (k, n) with 1 <= k <= n")
    if part is not None and build_vocab is not None:
        raise PrepareError(
            "--part needs --vocab (each part would build another vocabulary): build one first with "
            "--build-vocab on one machine, then give its vocab.txt to every part"
        )
    try:
        # the command-line options that are not PrepareConfig fields, before anything is written
        check_value("output", os.fspath(output_dir), check=output_dir_check)
        check_value("vocab", vocab, check=check_vocab_file)
        check_value("build-vocab", build_vocab, gt=10)
        check_value("workers", workers, ge=1)
    except ConfigError as error:
        raise PrepareError(str(error)) from None
    vocab_data = _vocab_data(vocab) if vocab is not None else None
    if user_dict is not None and not os.path.isfile(user_dict):
        raise PrepareError(f"{user_dict}: no such user dictionary")
    if t2s:
        to_simplified("")  # fail now, not in a worker, when OpenCC is missing
    skipped = []
    files = find_inputs(inputs, skipped)
    units = plan_units(files, config.chunk_kb * 1024)
    total_bytes = sum(os.path.getsize(p) for p in files)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if overwrite:
        _remove_all(output_dir)

    vocab_path = os.path.join(output_dir, VOCAB_FILE)
    base = _settings(config, files, build_vocab)
    previous = None
    if os.path.isfile(os.path.join(output_dir, PREPARE_FILE)):
        with open(os.path.join(output_dir, PREPARE_FILE), encoding="utf-8") as f:
            previous = json.load(f)["settings"]
        old_base = {k: v for k, v in previous.items() if k != "vocab_sha256"}
        if old_base != base:
            raise PrepareError(
                f"{output_dir}: holds shards prepared with other settings "
                f"(differs in: {', '.join(_differences(old_base, base))}); use --overwrite or another --output"
            )
    if vocab is not None:
        vocab_sha256 = hashlib.sha256(vocab_data).hexdigest()
        if previous is not None and previous["vocab_sha256"] != vocab_sha256:
            raise PrepareError(f"{output_dir}: holds shards of another vocabulary; use --overwrite or another --output")
        if not (os.path.isfile(vocab_path) and file_sha256(vocab_path) == vocab_sha256):
            with open(vocab_path + ".tmp", "wb") as f:
                f.write(vocab_data)
            os.replace(vocab_path + ".tmp", vocab_path)
    elif previous is not None and os.path.isfile(vocab_path) and file_sha256(vocab_path) == previous["vocab_sha256"]:
        vocab_sha256 = previous["vocab_sha256"]
    else:
        try:
            build_vocab_fn(_CorpusSentences(files, units, config, workers), build_vocab, vocab_path)
        except ValueError as e:
            raise PrepareError(f"{output_dir}: {e}") from None
        vocab_sha256 = file_sha256(vocab_path)
    settings = dict(base, vocab_sha256=vocab_sha256)
    settings_sha256 = _sha256_json(settings)
    write_json_atomic(
        os.path.join(output_dir, PREPARE_FILE), {"settings": settings, "settings_sha256": settings_sha256}
    )

    vocab_size = len(read_vocab(vocab_path))
    dtype = token_dtype(vocab_size)
    planned = plan_shards(units, max(1, int(config.shard_size_mb * (1 << 20))))
    if part is not None:
        k, n = part
        planned = planned[len(planned) * (k - 1) // n : len(planned) * k // n]
    complete = _complete_shards(output_dir, settings_sha256, planned)
    _remove_shards(output_dir, len(complete))
    os.makedirs(os.path.join(output_dir, WORK_DIR), exist_ok=True)
    todo = [(i, first, end) for i, (first, end) in enumerate(planned) if i >= len(complete)]
    extra = {"vocab_sha256": vocab_sha256, "settings_sha256": settings_sha256, "token_dtype": dtype.str}
    part_bytes = sum(u.size for first, end in planned for u in units[first:end])
    progress_bar = _ProgressBar(part_bytes, progress)
    progress_bar.update(sum(u.size for first, end in planned[: len(complete)] for u in units[first:end]), 0)
    headers = list(complete)
    init_args = (config, files, vocab_path, units, output_dir, dtype)
    try:
        headers.extend(_write_shards(todo, units, workers, init_args, extra, progress_bar.update))
    finally:
        progress_bar.close()
    os.rmdir(os.path.join(output_dir, WORK_DIR))

    # find_inputs' skipped files belong to the first part (the one of a one-machine run)
    counts, named, invalid_utf8 = Counter(), {}, Counter()
    if part is None or part[0] == 1:
        for reason, entry in skipped:
            counts[reason] += 1
            merge_named(named, {reason: [entry]})
    for header in headers:
        counts.update(header["counts"])
        merge_named(named, header["named"])
        invalid_utf8.update(header["invalid_utf8"])
    invalid_utf8 = dict(invalid_utf8)
    report_ = report(len(files), total_bytes, headers, counts, named, invalid_utf8)
    summary = PrepareSummary(
        output_dir=output_dir,
        files=len(files),
        input_bytes=total_bytes,
        shards=len(headers),
        shards_skipped=len(complete),
        documents=sum(h["num_documents"] for h in headers),
        sentences=sum(h["num_sentences"] for h in headers),
        tokens=sum(h["num_tokens"] for h in headers),
        counts=dict(sorted(counts.items())),
        invalid_utf8_by_file=invalid_utf8,
        seconds=time.perf_counter() - started,
        report=report_,
    )
    meta = dict(
        format=FORMAT,
        version=FORMAT_VERSION,
        vocab_file=VOCAB_FILE,
        vocab_sha256=vocab_sha256,
        vocab_size=vocab_size,
        token_dtype=dtype.str,
        settings=settings,
        settings_sha256=settings_sha256,
        shards=[h["name"] for h in headers],
        num_documents=summary.documents,
        num_sentences=summary.sentences,
        num_tokens=summary.tokens,
        counts=summary.counts,
        invalid_utf8_by_file=summary.invalid_utf8_by_file,
    )
    if part is not None:
        meta["part"] = list(part)
    write_json_atomic(os.path.join(output_dir, SUMMARY_FILE), report_)
    write_json_atomic(os.path.join(output_dir, META_FILE), meta)
    return summary


class _ProgressBar:
    """tqdm over input bytes (MB/s) with documents/s; silent when disabled or not on a terminal."""

    def __init__(self, total, enabled):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None if enabled else True)
        self.started = time.perf_counter()
        self.documents = 0

    def update(self, input_bytes, documents):
        self.documents += documents
        if not self.bar.disable:
            self.bar.update(input_bytes)
            rate = self.documents / max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} docs/s", refresh=False)

    def close(self):
        self.bar.close()



def verify_shard_dirs(directories):
    """``--verify DIR ...``: open every shard directory with all checks and checksums; prints one
    line a directory (its shards, bytes and seconds); a problem raises ``ShardError`` naming the
    file (the command's exit status 2). A directory of ``--part`` outputs is checked part by part."""
    for directory in [d for given in directories for d in shard_dirs(given)]:
        started = time.perf_counter()
        shards = open_shards(directory, check_tokens=True, check_checksums=True)
        size = sum(os.path.getsize(path) for shard in shards.shards for path in shard.paths.values())
        print(
            f"{directory}: {len(shards.shards)} shards, {shards.num_tokens:,} tokens, {size / 1e9:.2f} GB: "
            f"sizes, index, ids and sha256 checksums good in {time.perf_counter() - started:.1f} s"
        )
