"""What a pretraining run trains on: shard directories as given, or raw text split into training
and held-out documents and prepared into shards inside the run directory; and the vocabulary
contract between the data and the init model (one vocabulary, checked before training).

``lub_fast.data.pipeline`` does the preparing.
"""

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lub_fast.data.inputs import find_inputs, input_kind, open_input
from lub_fast.data.parts import is_shard_source, shard_dirs
from lub_fast.data.pipeline import prepare_corpus
from lub_fast.data.shards import META_FILE, ShardError, open_shards
from lub_fast.lock import output_lock
from lub_fast.recipes import PretrainError
from lub_fast.train import barrier


def is_shard_dir(path) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def split_holdout(inputs, directory: Path, every: int) -> dict[str, list[str]]:
    """Stream raw text (the formats ``prepare`` reads) into ``directory/{train,heldout}.{txt,jsonl}``,
    every ``every``-th document held out. Bytes pass through unchanged (``prepare`` decodes, cleans
    and counts); .txt documents end at blank lines, .jsonl documents are lines. Returns the written
    files per split; an existing complete split is reused."""
    done = directory / "split.json"
    if done.exists():
        return json.loads(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    outs, n = {}, 0

    def out(split, kind):
        if (split, kind) not in outs:
            outs[split, kind] = open(directory / f"{split}.{kind}.tmp", "wb")  # noqa: SIM115 (closed in finally)
        return outs[split, kind]

    def split_of(index):
        return "heldout" if every and index % every == every - 1 else "train"

    try:
        for path in find_inputs(inputs):
            kind = input_kind(path)
            stream, raw = open_input(path)
            with raw, stream:
                document = []
                for line in stream:
                    if kind == "jsonl":
                        if line.strip():
                            out(split_of(n), kind).write(line if line.endswith(b"\n") else line + b"\n")
                            n += 1
                        continue
                    if line.strip():
                        document.append(line if line.endswith(b"\n") else line + b"\n")
                    elif document:
                        out(split_of(n), kind).write(b"".join(document) + b"\n")
                        document, n = [], n + 1
                if document:
                    out(split_of(n), kind).write(b"".join(document) + b"\n")
                    n += 1
    finally:
        for f in outs.values():
            f.close()
    files: dict[str, list[str]] = {"train": [], "heldout": []}
    for split, kind in sorted(outs):
        final = directory / f"{split}.{kind}"
        os.replace(directory / f"{split}.{kind}.tmp", final)
        files[split].append(str(final))
    done.write_text(json.dumps(files) + "\n")
    return files


def prepare_splits(files: dict[str, list[str]], directory: Path, *, vocab: str | None, build_vocab: int,
                   segmenter: str, workers: int, command: str) -> list:
    """``split_holdout``'s files prepared into ``directory/train`` (with ``vocab``, else a built
    vocabulary of ``build_vocab`` tokens) and ``directory/heldout`` (with the training vocabulary),
    each under its output lock (nested in the run's: keeps out a stray ``prepare``). Returns the
    ``prepare`` reports."""
    common = {"segmenter": segmenter, "workers": workers, "progress": True}
    vocab_args = {"vocab": vocab} if vocab else {"build_vocab": build_vocab}
    with output_lock(directory / "train", command):
        reports = [prepare_corpus(files["train"], str(directory / "train"), **vocab_args, **common)]
    if files["heldout"]:
        with output_lock(directory / "heldout", command):
            train_vocab = str(directory / "train" / "vocab.txt")
            reports.append(prepare_corpus(files["heldout"], str(directory / "heldout"), vocab=train_vocab, **common))
    return reports


def resolve_data(cfg, vocab: str | None, main: bool) -> tuple[list[str], list[str]]:
    """Shard directories for training and evaluation of the ``PretrainConfig`` ``cfg``; raw text is
    prepared into ``OUTPUT/data`` by rank 0 (``main``) while the other ranks wait."""
    if not cfg.data.data:
        raise PretrainError("no training data: pass --data.data=SHARD_DIR_OR_TEXT (or run with no arguments for the demo)")
    # a directory of prepare --part outputs stands for its parts' shard directories
    shards = [str(d) for p in cfg.data.data if is_shard_source(p) for d in shard_dirs(p)]
    raw = [p for p in cfg.data.data if not is_shard_source(p)]
    eval_dirs = list(cfg.data.eval_data)
    for p in eval_dirs:
        if not is_shard_dir(p):
            raise PretrainError(f"--data.eval_data {p}: not a shard directory (make one with python -m lub_fast.prepare)")
    if raw:
        for p in raw:
            if not (os.path.exists(p) or glob.glob(p)):
                raise PretrainError(f"--data.data {p}: no such file, directory or glob match")
        work = Path(cfg.output) / "data"
        if main:
            files = split_holdout(raw, work / "text", cfg.data.holdout_every)
            if not files["train"]:
                raise PretrainError(f"--data.data {', '.join(raw)}: no documents found")
            for report in prepare_splits(files, work, vocab=vocab, build_vocab=cfg.data.build_vocab,
                                         segmenter=cfg.data.segmenter, workers=cfg.data.prepare_workers,
                                         command="pretrain"):
                print(report.format())
        barrier()
        shards.append(str(work / "train"))
        if not eval_dirs and (work / "heldout" / "meta.json").exists():
            eval_dirs.append(str(work / "heldout"))
    return shards, eval_dirs


def _init_vocab(path: str) -> tuple[list[str], str] | None:
    """``(tokens, source file)`` of the init model's vocabulary: its directory's (an HF directory, or
    a TF-1 checkpoint's directory) vocab.txt, else tokenizer.json's WordPiece; None when it has none."""
    from lub_fast.data.tokenizer import VocabularyError, model_vocab

    try:
        return model_vocab(Path(path) if Path(path).is_dir() else Path(path).parent)
    except VocabularyError as error:
        raise PretrainError(f"--init-from {path}: {error}") from None


@dataclass(frozen=True)
class DataVocab:
    """The vocabulary the training data must be tokenized with: ``tokens`` in id order, ``file`` (what
    ``prepare --vocab`` takes: a vocab.txt, or the model directory of a tokenizer.json), ``sha256`` (of
    the vocab.txt that ``prepare`` writes into the shards) and ``name`` (for messages)."""

    tokens: list[str]
    file: str
    sha256: str
    name: str


def data_vocab(cfg) -> DataVocab | None:
    """The init model's vocabulary (continued pretraining always tokenizes with it), else
    ``--data.vocab``; None when neither is given (shards bring theirs, raw text builds one).

    Raises ``PretrainError`` when ``--data.vocab`` differs from the init model's, and when the init
    model has no vocabulary and ``--data.vocab`` does not say which one its embeddings index.
    """
    from lub_fast.data.tokenizer import (
        file_sha256,
        first_difference,
        read_vocab,
        vocab_bytes,
    )

    given = None
    if cfg.data.vocab:
        try:
            given = DataVocab(read_vocab(cfg.data.vocab), cfg.data.vocab, file_sha256(cfg.data.vocab), f"--data.vocab {cfg.data.vocab}")
        except (OSError, ValueError) as error:
            raise PretrainError(f"--data.vocab {cfg.data.vocab}: {error}") from None
    if not cfg.init_from:
        return given
    path = cfg.init_from.partition(",")[0]
    init = _init_vocab(path)
    if init is None:
        if given is None:
            raise PretrainError(
                f"--init-from {path} has no vocab.txt or tokenizer.json beside it, so the token ids its embeddings "
                "index are unknown: pass the model's vocabulary with --data.vocab=VOCAB.txt"
            )
        return given
    tokens, source = init
    if source.endswith("vocab.txt"):
        vocab = DataVocab(tokens, source, file_sha256(source), f"the init model's {source}")
    else:  # prepare reads the directory's tokenizer.json and writes these bytes as the shards' vocab.txt
        sha = hashlib.sha256(vocab_bytes(tokens)).hexdigest()
        vocab = DataVocab(tokens, str(Path(source).parent), sha, f"the init model's {source} (WordPiece)")
    if given is not None and given.tokens != tokens:
        raise PretrainError(
            f"--data.vocab {given.file} (sha256 {given.sha256[:12]}, {len(given.tokens)} tokens) is not {vocab.name} "
            f"(sha256 {vocab.sha256[:12]}, {len(tokens)} tokens; {first_difference(given.tokens, tokens, '--data.vocab', 'the model')}): "
            "continued pretraining tokenizes with the init model's vocabulary; drop --data.vocab"
        )
    return vocab


def check_data_vocab(shard_dirs, vocab: DataVocab | None) -> None:
    """Every shard directory (training and held-out) was made with one vocabulary, and with ``vocab``
    (``data_vocab``'s) when there is one: the same tokens in the same order."""
    from lub_fast.data.tokenizer import first_difference, read_vocab

    try:
        opened = {d: open_shards(d, check_tokens=False) for d in shard_dirs}
    except ShardError as error:
        raise PretrainError(str(error)) from None
    if vocab is not None:
        for d, shards in opened.items():
            if shards.vocab_sha256 == vocab.sha256:
                continue
            tokens = read_vocab(shards.vocab_path)
            if tokens != vocab.tokens:
                raise PretrainError(
                    f"{d} was prepared with another vocabulary ({shards.vocab_path}, sha256 {shards.vocab_sha256[:12]}, "
                    f"{len(tokens)} tokens) than {vocab.name} (sha256 {vocab.sha256[:12]}, {len(vocab.tokens)} tokens; "
                    f"{first_difference(tokens, vocab.tokens, 'the data', 'the model')}): its ids would index the "
                    f"wrong embeddings; re-run python -m lub_fast.prepare with --vocab {vocab.file}, or pass the raw text"
                )
    first = shard_dirs[0]
    for d, shards in opened.items():
        if shards.vocab_sha256 != opened[first].vocab_sha256:
            raise PretrainError(f"{d} was prepared with another vocabulary than {first}: prepare both with one vocab.txt")


def eval_dataset(eval_dirs, common: dict, verify_checksums: bool):
    """The held-out ``PretrainDataset`` (``common``: its keyword arguments). Next-sentence
    prediction takes the second segment of half the examples from another document, so held-out
    data of one document is an error here, before training (its NSP accuracy would measure
    nothing), with what to do."""
    from lub_fast.data.dataset import PretrainDataset

    if common["pair"] == "nsp":
        documents = sum(open_shards(d, check_tokens=False).num_documents for d in eval_dirs)
        if documents < 2:
            raise PretrainError(
                f"--data.eval_data {', '.join(eval_dirs)} holds {documents} document: next-sentence prediction "
                "takes the second segment from another document, so its evaluation needs at least 2; give more "
                "held-out documents (more raw text, a lower --data.holdout_every, or --data.eval_data), or --data.pair=none"
            )
    try:
        return PretrainDataset(eval_dirs, rank=0, world_size=1, shuffle=False, verify_checksums=verify_checksums, **common)
    except ValueError as error:  # ShardError included
        raise PretrainError(f"--data.eval_data {', '.join(eval_dirs)}: {error}") from None
