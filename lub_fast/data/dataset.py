"""Pretraining examples from shards, as BERT's ``create_pretraining_data.py`` builds them.

Devlin et al. 2019 (google-research/bert ``create_pretraining_data.py``), with sentence-order
prediction from ALBERT (Lan et al. 2020, google-research/albert):

- Packing. Each document's sentences are cut greedily into chunks: sentences are added until the
  chunk holds at least ``target`` tokens (or the document ends); ``target`` is ``max_seq_len - 3``
  (``- 2`` without pairs), or with probability ``short_seq_prob`` a uniform integer in
  ``[2, target]``. For SOP every chunk holds at least two sentences (a last single sentence joins
  the chunk before it) and documents of one sentence are dropped and counted
  (``counts["single_sentence_documents"]``).
- Pairs. ``pair="sop"``: segment A is the chunk's first ``a_end`` sentences (``a_end`` uniform in
  ``[1, n - 1]``), B the rest; with probability 1/2 they are swapped (``sentence_order_label`` 1 =
  swapped). ``pair="nsp"``: with probability 1/2, or always for a one-sentence chunk, B is taken from
  a random other document, starting at a random sentence, until it reaches the chunk's length minus
  A's (``next_sentence_label`` 1 = random); unlike BERT the chunk's unused sentences are not put
  back. ``pair=None``: one segment, the whole chunk (RoBERTa's packing within a document).
- Truncation as BERT's ``truncate_seq_pair``: tokens leave the longer segment, each from its front
  or its back with probability 1/2 (the front count is drawn as a binomial).

Determinism. The chunk plan (start sentence of every chunk; 4 bytes per example for shards under
4G sentences) is computed from the memory-mapped sentence index with vectorised numpy and depends
only on ``seed`` (and the settings above).

Plan cache. A shard's plan is computed once and kept in ``$LUB_FAST_CACHE/plans`` (default
``~/.cache/lub_fast/plans``) as ``<digest>.npy`` (the starts) and ``<digest>.json`` (counts; written
last, it marks the plan complete), where the digest hashes the plan version, the sha256 of the
shard's index files and the settings: a plan is never stale, a shard directory is never written
to, and one cache serves every copy of a corpus. Each plan is built under a POSIX lock
(``<digest>.lock``): processes opening a dataset at once (the ranks of a machine, or of many on a
shared ``LUB_FAST_CACHE``) each build the plans nobody else holds, then wait for the rest, so
every plan is computed by one process and every process maps the same files (one copy in the page
cache). Opening a dataset whose plans are cached costs O(number of shards) in time and memory.
Without a writable cache the plans are built in memory (and a warning says so).

Example ``i`` of rank ``r`` is the plan's chunk at position ``perm(r + world_size * i)`` of a
keyed bijection of ``[0, num_examples)`` (a Feistel network with cycle walking; Black and Rogaway,
"Ciphers with arbitrary finite domains", 2002) and every random choice in it is a counter-based
draw keyed by ``(seed, epoch, global index)``: the example is a pure function of those, so
resuming needs only the counter, and ranks see disjoint examples.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import warnings

import numpy as np

from lub_fast.data.shards import ShardError, check_index, open_shards, write_json_atomic
from lub_fast.data.tokenizer import SPECIAL_TOKENS, read_vocab

PAIRS = (None, "sop", "nsp")
PLAN_VERSION = 1  # part of every cached plan's digest: bump it whenever plan_chunks' output changes

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_SALT_PLAN, _SALT_ORDER, _SALT_EXAMPLE = 0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0


def mix64(z):
    """SplitMix64's output function on a Python int (a bijection of uint64)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64_np(z):
    """``mix64`` on a uint64 array (numpy's uint64 arithmetic wraps mod 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(*parts):
    k = 0
    for part in parts:
        k = mix64((k ^ (part & _MASK64)) & _MASK64)
    return k


class _Draws:
    """Counter-based random draws of one example."""

    def __init__(self, key):
        self.key = key
        self.counter = 0

    def next(self):
        self.counter += 1
        return mix64((self.key + self.counter * _GOLDEN) & _MASK64)

    def below(self, n):
        """Uniform integer in ``[0, n)``."""
        return (self.next() * n) >> 64

    def binomial_half(self, n):
        """Binomial(n, 1/2): the number of set bits among n random bits."""
        total = 0
        while n > 0:
            bits = min(n, 64)
            total += (self.next() & ((1 << bits) - 1)).bit_count()
            n -= bits
        return total


def permute(index, n, key):
    """A keyed bijection of ``range(n)``: 4-round Feistel network on 2h bits with cycle walking."""
    if n <= 1:
        return index
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = index
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (mix64((key + (r << 56) + right) & _MASK64) & mask)
        x = (left << half) | right
        if x < n:
            return x


def plan_chunks(sentence_offsets, document_offsets, key, max_tokens, short_seq_prob, min_sentences):
    """Greedy chunks of every document, vectorised over documents.

    ``sentence_offsets``: int64 ``[S + 1]`` token offsets; ``document_offsets``: int64 ``[D + 1]``
    sentence offsets. Returns ``(starts, dropped)``: the sorted start sentence of every chunk (a
    chunk ends at the next start or its document's end) and the number of documents with fewer
    than ``min_sentences`` sentences (skipped).
    """
    offsets = np.asarray(sentence_offsets, dtype=np.int64)
    docs = np.asarray(document_offsets, dtype=np.int64)
    eligible = np.diff(docs) >= min_sentences
    doc = np.flatnonzero(eligible).astype(np.uint64)
    p, end = docs[:-1][eligible], docs[1:][eligible]
    starts, k = [], 0
    base = np.uint64(key)
    while p.size:
        starts.append(p)
        r = _mix64_np(_mix64_np(base ^ doc) + np.uint64((k + 1) * _GOLDEN & _MASK64))
        r2 = _mix64_np(r)
        short = (r >> np.uint64(11)).astype(np.float64) * 2.0**-53 < short_seq_prob
        short_target = 2 + (((r2 >> np.uint64(32)) * np.uint64(max_tokens - 1)) >> np.uint64(32)).astype(np.int64)
        target = np.where(short, short_target, max_tokens)
        m = np.searchsorted(offsets, offsets[p] + target, side="left")
        m = np.minimum(np.maximum(m, p + min_sentences), end)
        if min_sentences > 1:
            m = np.where(end - m < min_sentences, end, m)  # a too-short tail joins this chunk
        alive = m < end
        p, end, doc = m[alive], end[alive], doc[alive]
        k += 1
    out = np.sort(np.concatenate(starts)) if starts else np.zeros(0, dtype=np.int64)
    dtype = np.uint32 if len(offsets) < 2**32 else np.int64
    return out.astype(dtype), int(np.count_nonzero(~eligible))


def plan_cache_dir():
    """``$LUB_FAST_CACHE/plans`` (default ``~/.cache/lub_fast/plans``)."""
    root = os.environ.get("LUB_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lub_fast")
    return os.path.join(root, "plans")


def _plan_spec(shard, key, max_tokens, short_seq_prob, min_sentences):
    files = shard.header["files"]
    return {
        "plan_version": PLAN_VERSION,
        "shard": shard.name,
        "sentences_sha256": files["sentences"]["sha256"],
        "documents_sha256": files["documents"]["sha256"],
        "num_sentences": shard.num_sentences,
        "key": key,
        "max_tokens": max_tokens,
        "short_seq_prob": float(short_seq_prob),
        "min_sentences": min_sentences,
    }


def _plan_digest(spec):
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _build_plan(shard, spec):
    check_index(shard, full=True)  # the plan reads every offset anyway: a corrupt index stops here
    return plan_chunks(
        shard.sentence_offsets, shard.document_offsets, spec["key"], spec["max_tokens"], spec["short_seq_prob"],
        spec["min_sentences"],
    )


def _load_plan(stem, shard):
    """``(starts, dropped)`` of a complete cached plan, or ``None``."""
    try:
        with open(f"{stem}.json", encoding="utf-8") as f:
            info = json.load(f)
        starts = np.load(f"{stem}.npy", mmap_mode="r").view(np.ndarray) if info["examples"] else np.zeros(0, np.uint32)
    except (OSError, ValueError, KeyError):
        return None
    if starts.shape != (info["examples"],) or (len(starts) and int(starts[-1]) >= shard.num_sentences):
        return None
    return starts, info["dropped"]


def _lock_and_build(stem, shard, spec, wait):
    """Build and cache the plan under its lock; ``None`` when another process holds the lock and
    ``wait`` is false."""
    fd = os.open(f"{stem}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        plan = _load_plan(stem, shard)  # the holder before us built it
        if plan is None:
            starts, dropped = _build_plan(shard, spec)
            tmp = f"{stem}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, starts)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, f"{stem}.npy")
            write_json_atomic(f"{stem}.json", dict(spec, examples=len(starts), dropped=dropped))
            plan = _load_plan(stem, shard)
        # The .json exists, so whoever opens (or creates) the lock file from now on builds nothing;
        # each process removes the path when done, and the last one leaves no lock file behind.
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{stem}.lock")
        return plan
    finally:
        os.close(fd)


def shard_plans(shards, keys, max_tokens, short_seq_prob, min_sentences):
    """The chunk plan of every shard (``plan_chunks`` with ``keys[i]`` for ``shards[i]``) as a list
    of ``(starts, dropped)``, ``starts`` memory-mapped from ``plan_cache_dir()``, each built by one
    process: first the plans nobody is building, then a
    wait for the others' (a process that died holding a lock released it, and the waiter builds).
    A cache that cannot be written is read; the plans it lacks are built in memory, with a warning."""
    specs = [_plan_spec(s, k, max_tokens, short_seq_prob, min_sentences) for s, k in zip(shards, keys)]
    cache_dir = plan_cache_dir()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        problem = None if os.access(cache_dir, os.W_OK) else "not writable"
    except OSError as error:
        problem = str(error)
    stems = [os.path.join(cache_dir, _plan_digest(spec)) for spec in specs]
    plans = [_load_plan(stem, shard) for stem, shard in zip(stems, shards)]
    if problem is not None:
        if None in plans:
            warnings.warn(
                f"lub_fast: no plan cache in {cache_dir} ({problem}); building the example plans in memory "
                "(set LUB_FAST_CACHE to a writable directory to build them once)",
                stacklevel=3,
            )
        return [plan or _build_plan(shard, spec) for plan, shard, spec in zip(plans, shards, specs)]
    for wait in (False, True):
        for i in [i for i, plan in enumerate(plans) if plan is None]:
            plans[i] = _lock_and_build(stems[i], shards[i], specs[i], wait)
    return plans


class PretrainDataset:
    """BERT-style pretraining examples from one or more shard directories (map-style dataset).

    ``dataset[i]`` (``0 <= i < len(dataset)``, this rank's examples) is a dict of numpy arrays:
    ``input_ids`` int64 ``[T]`` = [CLS] A [SEP] (B [SEP]), ``token_type_ids`` int64 ``[T]``,
    ``word_start`` bool ``[T]`` ([CLS]/[SEP] and each segment's first token are word starts),
    ``index`` (int, the global example index ``rank + world_size * i``, the masking key) and, with
    pairs, ``sentence_order_label`` or ``next_sentence_label`` (int). ``T <= max_seq_len``.

    ``verify_checksums``: compare the sha256 of every file of every ``world_size``-th shard from
    ``rank`` on (all shards with one rank) with its header, so that corruption that leaves valid ids
    stops the run (``ShardError``) before it trains on it.
    """

    def __init__(
        self,
        shard_dirs,
        max_seq_len=128,
        pair="sop",
        short_seq_prob=0.1,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
        shuffle=True,
        check_tokens=False,
        verify_checksums=True,
    ):
        if pair not in PAIRS:
            raise ValueError(f"pair must be one of {PAIRS}, got {pair!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank ({rank}) < world_size ({world_size})")
        self.max_tokens = max_seq_len - (3 if pair else 2)
        if self.max_tokens < 2:
            raise ValueError(f"max_seq_len {max_seq_len} leaves fewer than 2 tokens for text")
        if isinstance(shard_dirs, (str, bytes)) or hasattr(shard_dirs, "__fspath__"):
            shard_dirs = [shard_dirs]
        sets = [open_shards(d, check_tokens=check_tokens) for d in shard_dirs]
        if not sets:
            raise ValueError("no shard directory given")
        for s in sets[1:]:
            if s.vocab_sha256 != sets[0].vocab_sha256:
                raise ShardError(f"{s.directory}: vocabulary differs from {sets[0].directory}'s (vocab sha256)")
        self.max_seq_len = max_seq_len
        self.pair = pair
        self.short_seq_prob = short_seq_prob
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.shards = [shard for s in sets for shard in s.shards]
        if verify_checksums:  # this rank's share: the ranks together hash the corpus once
            for shard in self.shards[rank::world_size]:
                shard.verify_checksums()
        self.vocab_path = sets[0].vocab_path
        vocab = read_vocab(self.vocab_path)
        self.vocab_size = len(vocab)
        self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id = (
            vocab.index(t) for t in SPECIAL_TOKENS
        )

        min_sentences = 2 if pair == "sop" else 1
        keys = [_key(_SALT_PLAN, seed, i) for i in range(len(self.shards))]
        plans = shard_plans(self.shards, keys, self.max_tokens, short_seq_prob, min_sentences)
        self._plans = [starts for starts, _ in plans]
        dropped = sum(n for _, n in plans)
        self._example_offsets = np.concatenate(([0], np.cumsum([len(p) for p in self._plans]))).astype(np.int64)
        self._doc_offsets = np.concatenate(([0], np.cumsum([s.num_documents for s in self.shards]))).astype(np.int64)
        self.num_examples = int(self._example_offsets[-1])
        num_documents = int(self._doc_offsets[-1])
        if pair == "nsp" and self.num_examples and num_documents < 2:
            raise ValueError("next-sentence prediction needs at least two documents")
        self.counts = {
            "documents": num_documents,
            "single_sentence_documents": dropped if pair == "sop" else 0,
            "examples": self.num_examples,
        }

    def __getstate__(self):
        # A spawned DataLoader worker maps the cached plans (and the shards) again instead of
        # receiving copies: pickled, a memory map would travel as its whole data.
        state = dict(self.__dict__)
        state["_plans"] = [p.base.filename if isinstance(p.base, np.memmap) else p for p in self._plans]
        return state

    def __setstate__(self, state):
        plans = [np.load(p, mmap_mode="r").view(np.ndarray) if isinstance(p, str) else p for p in state["_plans"]]
        self.__dict__.update(state, _plans=plans)

    def set_epoch(self, epoch):
        """Examples of another epoch: a new order and new pair/truncation draws over the same plan."""
        self.epoch = epoch

    def __len__(self):
        return self.num_examples // self.world_size

    def __getitem__(self, i):
        return self._example(*self.segments(i))

    def segments(self, i):
        """Example ``i`` before its arrays are built: ``(index, a, b, label)`` with segments as
        ``(shard, token_start, token_stop)`` (``b`` is ``None`` without pairs) and ``label`` as
        ``(name, value)`` or ``None``; about half of ``dataset[i]``'s time (for label statistics)."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        index = self.rank + self.world_size * i
        chunk = permute(index, self.num_examples, _key(_SALT_ORDER, self.seed, self.epoch)) if self.shuffle else index
        draws = _Draws(_key(_SALT_EXAMPLE, self.seed, self.epoch, index))
        s = int(np.searchsorted(self._example_offsets, chunk, side="right")) - 1
        shard, plan, local = self.shards[s], self._plans[s], chunk - int(self._example_offsets[s])
        start = int(plan[local])
        doc = int(np.searchsorted(shard.document_offsets, start, side="right")) - 1
        end = int(shard.document_offsets[doc + 1])
        if local + 1 < len(plan):
            end = min(end, int(plan[local + 1]))
        offsets = shard.sentence_offsets
        if self.pair is None:
            a = self._truncate((shard, int(offsets[start]), int(offsets[end])), None, draws)[0]
            return index, a, None, None
        n = end - start
        a_end = start + 1 + (draws.below(n - 1) if n > 1 else 0)
        a = (shard, int(offsets[start]), int(offsets[a_end]))
        if self.pair == "sop":
            b = (shard, int(offsets[a_end]), int(offsets[end]))
            label = draws.below(2)
            if label:
                a, b = b, a
            return index, *self._truncate(a, b, draws), ("sentence_order_label", label)
        label = 1 if n == 1 else draws.below(2)
        if label:
            chunk_tokens = min(int(offsets[end] - offsets[start]), self.max_tokens)
            b = self._random_segment(s, doc, max(1, chunk_tokens - (a[2] - a[1])), draws)
        else:
            b = (shard, int(offsets[a_end]), int(offsets[end]))
        return index, *self._truncate(a, b, draws), ("next_sentence_label", label)

    def _random_segment(self, shard_index, doc, target, draws):
        """Sentences of a random other document from a random sentence on, until ``target`` tokens."""
        own = int(self._doc_offsets[shard_index]) + doc
        other = draws.below(int(self._doc_offsets[-1]) - 1)
        other += other >= own
        s = int(np.searchsorted(self._doc_offsets, other, side="right")) - 1
        shard = self.shards[s]
        d = other - int(self._doc_offsets[s])
        first, last = int(shard.document_offsets[d]), int(shard.document_offsets[d + 1])
        begin = first + draws.below(last - first)
        offsets = shard.sentence_offsets[begin : last + 1]
        stop = min(int(np.searchsorted(offsets, offsets[0] + target, side="left")), last - begin)
        return shard, int(offsets[0]), int(offsets[max(stop, 1)])

    def _truncate(self, a, b, draws):
        """BERT's truncate_seq_pair on (shard, start, stop) token ranges."""
        cut_a, cut_b = truncation(a[2] - a[1], b[2] - b[1] if b is not None else 0, self.max_tokens)
        return _cut(a, cut_a, draws), (_cut(b, cut_b, draws) if b is not None else None)

    def _example(self, index, a, b, label):
        parts_ids = [np.array([self.cls_token_id]), _ids(a), np.array([self.sep_token_id])]
        parts_ws = [np.ones(1, bool), _word_start(a), np.ones(1, bool)]
        types = [np.zeros(a[2] - a[1] + 2, np.int64)]
        if b is not None:
            parts_ids += [_ids(b), np.array([self.sep_token_id])]
            parts_ws += [_word_start(b), np.ones(1, bool)]
            types.append(np.ones(b[2] - b[1] + 1, np.int64))
        out = {
            "input_ids": np.concatenate(parts_ids).astype(np.int64),
            "token_type_ids": np.concatenate(types),
            "word_start": np.concatenate(parts_ws),
            "index": index,
        }
        if label is not None:
            out[label[0]] = label[1]
        return out


def truncation(len_a, len_b, max_tokens):
    """Tokens BERT's ``truncate_seq_pair`` removes from A and B: while too long, one from the longer
    (from B on a tie). Returns ``(cut_a, cut_b)``."""
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return 0, 0
    first = min(excess, abs(len_a - len_b))  # down to equal lengths, from the longer one
    rest = excess - first  # then alternately, B first
    return (first if len_a > len_b else 0) + rest // 2, (first if len_a <= len_b else 0) + rest - rest // 2


def _cut(segment, n, draws):
    """Remove ``n`` tokens of a segment, each from the front or the back with probability 1/2."""
    if n <= 0:
        return segment
    front = draws.binomial_half(n)
    shard, start, stop = segment
    return shard, start + front, stop - (n - front)


def _ids(segment):
    shard, start, stop = segment
    return shard.ids[start:stop].astype(np.int64)


def _word_start(segment):
    shard, start, stop = segment
    flags = shard.word_start(start, stop)
    flags[0] = True  # a segment cut inside a word starts with what is left of it
    return flags
