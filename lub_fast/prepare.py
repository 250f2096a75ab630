"""``python -m lub_fast.prepare``: raw Chinese text -> shards for pretraining with whole-word masking.

Pipeline (see ``lub_fast.data``): read (.txt, .jsonl, .gz of either, directories, globs) -> decode
UTF-8 (invalid bytes replaced and counted per file, or ``--strict``: stop at file:line) -> clean as
BERT's tokenizer -> optional traditional-to-simplified (OpenCC) -> split into sentences -> segment
words (jieba / rjieba, HMM off / none) -> WordPiece (HF tokenizers, bert-base-chinese's
vocab.txt format, or ``--build-vocab N``) -> word-start flags -> shards (``lub_fast.data.shards``).

Streaming and parallel (``lub_fast.data.pipeline``): the input is planned from file sizes into units
of about ``--chunk-size`` KB and shards of at least ``--shard-size`` MiB of input; ``--workers``
processes read their units and write the shards themselves, and the parent only schedules and sums
the counts. Memory is bounded by the chunk size, not the corpus; the output is byte-identical for
any worker count; a re-run with the same settings skips complete shards. ``--part K/N`` writes the
K-th of N parts of the same shards into ``OUTPUT/part-K-of-N`` (one machine each, e.g. a Slurm
array), which ``lub_fast.data.parts.shard_dirs(OUTPUT)`` reads as one corpus.

Input format. ``.txt``: one sentence or paragraph a line, a blank line between documents; a
document longer than the chunk size is split into documents of about that size (and cut where a
unit boundary falls in it, as is one longer than a unit around the boundary), and a line longer
than it is read in pieces cut after sentence ends (memory stays bounded inside a line) and counted
as one line (kept when a sentence of its pieces in the chunk of its first piece is). ``.jsonl``: one
JSON object a line, the document in its ``"text"`` field; a line over 16 MiB is dropped and named.
Every kept line is split into sentences at Chinese sentence punctuation (``lub_fast.data.clean``).
Files are UTF-8, or UTF-16/UTF-32 (decoded) as ``clean.sniff_encoding`` recognises them; binary
files are skipped. In input directories FIFOs, sockets, devices and broken symbolic links are
skipped (named on the command line they are an error).

Accounting. Every line read is kept or dropped for one reason (``LINE_DROPS``), so that
``lines_read == lines_kept + sum(lines_dropped)``; ``summary.json`` in the output holds these
counts, the sentences and documents dropped, what was fixed, and the files (or lines) skipped or
repaired by name (the first few per reason, then a count). The printed summary is made from it.

``--verify DIR``: check a shard directory (sizes, index, ids, sha256 of every file) and exit 0, or
2 with one line naming the shard file.
"""

import argparse
import sys

from lub_fast.config_cli import check_value
from lub_fast.config_cli import output_dir as output_dir_check
from lub_fast.data.parts import parse_part, part_dir
from lub_fast.data.pipeline import prepare_corpus, verify_shard_dirs
from lub_fast.data.segment import SEGMENTERS
from lub_fast.errors import EXIT_CODES_HELP, run_command
from lub_fast.lock import output_lock


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m lub_fast.prepare",
        description="Turn raw Chinese text into shards for whole-word-masking pretraining "
        "(clean, split sentences, segment words, WordPiece, memory-mapped shards).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help=".txt (one sentence or paragraph a line, a blank line between documents), .jsonl "
        "(one document a line in a 'text' field), .gz of either, directories (searched for those) "
        "or quoted globs",
    )
    p.add_argument("--output", help="shard directory to write (created; vocab.txt is copied into it); required")
    p.add_argument(
        "--verify",
        nargs="+",
        metavar="DIR",
        help="only check shard directories: sizes, index, ids and every file's sha256 (exit 0 all good, "
        "2 naming the shard file otherwise)",
    )
    v = p.add_mutually_exclusive_group()
    v.add_argument(
        "--vocab",
        help="vocab.txt in bert-base-chinese's format (e.g. a released model's), or a model directory (its "
        "vocab.txt, else its tokenizer.json's WordPiece vocabulary)",
    )
    v.add_argument(
        "--build-vocab", type=int, metavar="N", help="train a WordPiece vocabulary of about N (> 10) tokens on the corpus"
    )
    p.add_argument(
        "--segmenter",
        choices=SEGMENTERS,
        default="jieba",
        help="word boundaries for whole-word masking: jieba (HMM off); rjieba (same words, ~20x faster); "
        "none (WordPiece words: each Chinese character is a word)",
    )
    p.add_argument("--user-dict", help="jieba-format user dictionary (word [freq] [tag] per line) for jieba/rjieba")
    p.add_argument("--workers", type=int, default=1, help="processes (>= 1); the output is identical for any number")
    p.add_argument(
        "--shard-size",
        type=float,
        default=256.0,
        metavar="MB",
        help="input text per shard, in MiB (> 0; its token ids take about 2/3 of that for Chinese UTF-8 text)",
    )
    p.add_argument(
        "--part",
        metavar="K/N",
        help="write only part K of N (1 <= K <= N) into OUTPUT/part-K-of-N: N such runs, anywhere, make the same "
        "shards as one run (needs --vocab; read them as one corpus by giving OUTPUT)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=1024,
        metavar="KB",
        help="input per unit of parallel work (>= 1; bounds memory per worker; shards end at chunk ends)",
    )
    p.add_argument("--t2s", action="store_true", help="convert traditional to simplified Chinese (needs opencc)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop with file:line at invalid UTF-8, malformed JSON, binary or corrupt files "
        "(default: replace or drop, and count in the summary)",
    )
    p.add_argument("--min-chars", type=int, default=2, help="drop sentences shorter than this (>= 1, after cleaning)")
    p.add_argument(
        "--max-sentence-chars",
        type=int,
        default=256,
        help="split longer sentences at clause punctuation, then every this many characters (>= --min-chars)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete shards of other settings in --output first")
    return p



def main(argv=None):
    """CLI entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verify:
        if args.inputs or args.output:
            parser.error("--verify DIR checks shard directories: give no INPUT and no --output")
        return run_command("prepare", lambda: verify_shard_dirs(args.verify))
    if not args.inputs or not args.output:
        parser.error("INPUT and --output are required (or --verify DIR)")

    def body():
        part = parse_part(args.part) if args.part is not None else None
        output = part_dir(args.output, *part) if part is not None else args.output
        check_value("output", output, check=output_dir_check)  # before the lock creates the directory
        with output_lock(output, "prepare"):
            summary = prepare_corpus(
                args.inputs,
                output,
                vocab=args.vocab,
                build_vocab=args.build_vocab,
                segmenter=args.segmenter,
                user_dict=args.user_dict,
                workers=args.workers,
                shard_size_mb=args.shard_size,
                chunk_kb=args.chunk_size,
                t2s=args.t2s,
                strict=args.strict,
                min_chars=args.min_chars,
                max_sentence_chars=args.max_sentence_chars,
                overwrite=args.overwrite,
                progress=True,
                part=part,
            )
        print(summary.format())

    return run_command("prepare", body)


if __name__ == "__main__":
    sys.exit(main())
