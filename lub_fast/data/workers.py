"""What a ``prepare`` worker does: a unit of raw text in, its token arrays and counts out, and a
shard written from the arrays of its units (``lub_fast.data.pipeline`` schedules both).

A unit (``lub_fast.data.inputs.Unit``) is read and cut into chunks of documents; each chunk is
cleaned and split into sentences (``lub_fast.data.clean``), segmented into words
(``lub_fast.data.segment``) and tokenized with word-start flags (``lub_fast.data.tokenizer``); the
arrays go to the unit's file in ``OUTPUT/.units/``, the counts back to the parent. Once all of a
shard's units are there, one worker streams them into the shard (``lub_fast.data.shards``).
"""

import json
import os
import pickle
from collections import Counter

import numpy as np

from lub_fast.data.clean import clean_line, split_sentences, to_simplified
from lub_fast.data.inputs import PrepareError, Reader, input_kind, line_number
from lub_fast.data.segment import Segmenter
from lub_fast.data.shards import ShardWriter
from lub_fast.data.tokenizer import WordPieceTokenizer

WORK_DIR = ".units"  # unit files of the shards being written

_STATE = {}
_ARRAYS = 4  # ids, word starts, tokens per sentence, sentences per document: what a unit file holds


def init_worker(config, files, vocab_path, units=(), output_dir=None, dtype=None):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers is the parallelism
    tokenizer = WordPieceTokenizer(vocab_path) if vocab_path is not None else None
    _STATE.update(
        config=config,
        files=files,
        tokenizer=tokenizer,
        segmenter=Segmenter(config.segmenter, config.user_dict) if tokenizer is not None else None,
        units=units,
        output_dir=output_dir,
        dtype=dtype,
    )


def init_worker_from_file(path):
    """The pool initializer: ``init_worker`` with the arguments pickled in ``path``."""
    with open(path, "rb") as f:
        init_worker(*pickle.load(f))


def _document_lines(where, jsonl, lines, counts, strict):
    """The text lines of a document; None (the reason counted) for a JSON line that holds none.
    ``where()`` names the document's first line in errors."""
    if not jsonl:
        return lines
    try:
        obj = json.loads(lines[0])
    except json.JSONDecodeError as e:
        if strict:
            raise PrepareError(f"{where()}: malformed JSON ({e.msg} at column {e.colno}) (--strict)") from None
        counts["malformed_json"] += 1
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        if strict:
            raise PrepareError(f"{where()}: no string field 'text' (--strict)")
        counts["no_text_field"] += 1
        return None
    return obj["text"].splitlines()


# Why an input line with no sentence kept is dropped, by how far it got: nothing left after cleaning,
# sentences all too short, sentences that got no token.
_LINE_LEVELS = ("empty_after_cleaning", "short_lines", "no_token_lines")


def _clean_chunk(docs):
    """Clean and split a chunk: ``(sentences, owner, source, levels, not_documents, counts)``.

    ``owner``: the document of each sentence; ``source``: the input line (a .txt line or a JSON
    line) of each sentence, an index into ``levels`` (-1 for a piece of a line that began in an
    earlier chunk, which counts it); ``levels``: per input line, how far it got (``_LINE_LEVELS``)
    should none of its sentences get a token; ``not_documents``: JSON lines without a document.
    """
    config, files = _STATE["config"], _STATE["files"]
    counts = Counter()
    sentences, owner, source, levels = [], [], [], []
    not_documents, line = 0, -1
    for d, (file_index, offset, first, lines, continued) in enumerate(docs):
        path = files[file_index]
        jsonl = input_kind(path) == "jsonl"

        def where(path=path, offset=offset, first=first):
            return f"{path}:{line_number(path, offset, first)}"

        text_lines = _document_lines(where, jsonl, lines, counts, config.strict)
        if text_lines is None:
            not_documents += 1
            continue
        if jsonl:
            levels.append(0)
            line = len(levels) - 1
        continued = set(continued)
        for i, text in enumerate(text_lines):
            if not jsonl and i not in continued:
                levels.append(0)
                line = len(levels) - 1
            if config.t2s:
                converted = to_simplified(text)
                counts["t2s"] += converted != text
                text = converted
            text, removed = clean_line(text)
            counts["control_chars"] += removed > 0
            if not text:
                continue
            pieces, long_sentences, hard_cuts = split_sentences(text, config.max_sentence_chars)
            kept = [p for p in pieces if len(p) >= config.min_chars]
            counts["long_lines"] += long_sentences
            counts["hard_cuts"] += hard_cuts
            counts["too_short"] += len(pieces) - len(kept)
            if line >= 0:
                levels[line] = max(levels[line], 2 if kept else 1)
            sentences.extend(kept)
            owner.extend([d] * len(kept))
            source.extend([line] * len(kept))
    return sentences, owner, source, levels, not_documents, counts


def vocab_chunk(docs):
    return _clean_chunk(docs)[0]


def _process_chunk(docs):
    """Token ids, word starts, tokens per sentence, sentences per document, counts of one chunk."""
    tokenizer, segmenter = _STATE["tokenizer"], _STATE["segmenter"]
    sentences, owner, source, levels, not_documents, counts = _clean_chunk(docs)
    text = "\n".join(sentences)
    ids, starts, word_start, mismatches = tokenizer.encode_words(text, segmenter.boundaries(text))
    lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
    sentence_starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1])) if len(sentences) else lengths
    tokens_per_sentence = np.bincount(
        np.searchsorted(sentence_starts, starts, side="right") - 1, minlength=len(sentences)
    )
    keep = tokens_per_sentence > 0
    sentences_per_doc = np.bincount(np.asarray(owner, dtype=np.int64)[keep], minlength=len(docs))
    kept_lines = np.zeros(len(levels), dtype=bool)
    kept_source = np.asarray(source, dtype=np.int64)[keep]
    kept_lines[kept_source[kept_source >= 0]] = True
    levels = np.asarray(levels, dtype=np.int64)
    counts["lines_kept"] += int(np.count_nonzero(kept_lines))
    for level, reason in enumerate(_LINE_LEVELS):
        counts[reason] += int(np.count_nonzero(~kept_lines & (levels == level)))
    counts["no_tokens"] += int(np.count_nonzero(~keep))
    counts["empty_documents"] += int(np.count_nonzero(sentences_per_doc == 0)) - not_documents
    counts["word_mismatches"] += mismatches
    counts["unk_tokens"] += int(np.count_nonzero(ids == tokenizer.unk_id))
    return (
        ids.astype(_STATE["dtype"]),
        word_start,
        tokens_per_sentence[keep],
        sentences_per_doc[sentences_per_doc > 0],
        counts,
    )


def _unit_file(output_dir, index):
    return os.path.join(output_dir, WORK_DIR, f"unit-{index:08d}.npy")


def prepare_unit(index):
    """Read, clean, segment and tokenize unit ``index`` into its unit file (the arrays of its chunks,
    ``np.save``d one after the other). Returns what the parent needs, O(1) in the unit's size:
    ``(counts, named, invalid_utf8, documents)``."""
    reader = Reader(_STATE["files"], _STATE["config"])
    counts, documents = Counter(), 0
    path = _unit_file(_STATE["output_dir"], index)
    with open(path + ".tmp", "wb") as f:
        for docs in reader.chunks(_STATE["units"][index]):
            *arrays, chunk_counts = _process_chunk(docs)
            for array in arrays:
                np.save(f, array, allow_pickle=False)
            counts.update(chunk_counts)
            documents += len(arrays[-1])
    os.replace(path + ".tmp", path)
    counts.update(reader.counts)
    return dict(counts), reader.named, dict(reader.invalid_utf8), documents


def write_shard(index, units, extra):
    """Write shard ``index`` from the unit files of ``units`` (deleted after); returns its header."""
    output_dir = _STATE["output_dir"]
    writer = ShardWriter(output_dir, index, _STATE["dtype"])
    try:
        for unit in units:
            path = _unit_file(output_dir, unit)
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                while f.tell() < size:
                    writer.append(*[np.load(f, allow_pickle=False) for _ in range(_ARRAYS)])
        header = writer.close(extra)
    except BaseException:
        writer.abort()
        raise
    for unit in units:
        os.remove(_unit_file(output_dir, unit))
    return header

