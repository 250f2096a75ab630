"""One corpus prepared on many machines: ``prepare --part K/N`` and reading the parts as one corpus.

``prepare`` plans its shards from the input files' sizes alone (``lub_fast.data.pipeline``), so N
runs given the same inputs and settings and ``--part 1/N`` ... ``--part N/N`` each write one
contiguous run of the shards a one-machine run writes, into ``OUTPUT/part-K-of-N/``: a normal shard
directory whose shards are numbered from 0. The parts' shard files (ids, word starts, sentence and
document index) are byte-identical to the one-machine run's, and so are their headers but for the
shard's number. ``shard_dirs(OUTPUT)`` lists the part directories in order, after checking that all
N are there and finished and that they share one vocabulary and one set of settings; a dataset
opened on that list holds the same documents in the same order as one made on one machine.
"""

import json
import os
import re
from pathlib import Path

from lub_fast.data.inputs import PrepareError
from lub_fast.data.shards import META_FILE, ShardError

_PART_DIR = re.compile(r"part-(\d+)-of-(\d+)")


def part_dir(output, k, n):
    """The directory of part ``k`` of ``n`` under ``output``."""
    return os.path.join(os.fspath(output), f"part-{k}-of-{n}")


def parse_part(text):
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``; raises ``PrepareError`` naming ``--part``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise PrepareError(
            f"--part {text!r}: give K/N with 1 <= K <= N, e.g. --part 3/8 "
            "(in a Slurm array --array=1-8: --part $SLURM_ARRAY_TASK_ID/8)"
        )
    return int(match[1]), int(match[2])


def _parts(path):
    """{N: {K: directory}} of the part-K-of-N directories directly under ``path``."""
    found = {}
    if path.is_dir():
        for child in path.iterdir():
            match = _PART_DIR.fullmatch(child.name)
            if match and child.is_dir():
                found.setdefault(int(match[2]), {})[int(match[1])] = child
    return found


def is_shard_source(path):
    """True for a shard directory (it holds meta.json) or a directory of ``--part`` outputs."""
    path = Path(path)
    return (path / META_FILE).is_file() or bool(_parts(path))


def shard_dirs(path) -> list[Path]:
    """The shard directories of ``path``: ``[path]`` for a shard directory, else its part
    directories ``part-1-of-N`` ... ``part-N-of-N`` in order. Raises ``ShardError`` in one line
    naming the missing or unfinished part (and the run that makes it), parts of two different
    splits, or parts of other vocabularies, inputs or settings."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return [path]
    found = _parts(path)
    if not found:
        raise ShardError(
            f"{path}: neither a shard directory (no {META_FILE}) nor a directory of part-K-of-N shard directories; "
            "make one with python -m lub_fast.prepare"
        )
    if len(found) > 1:
        splits = ", ".join(f"{len(ks)} part(s) of {n}" for n, ks in sorted(found.items()))
        raise ShardError(f"{path}: holds parts of different splits ({splits}); keep the parts of one --part K/N split")
    ((n, parts),) = found.items()
    dirs, first = [], None
    for k in range(1, n + 1):
        directory = parts.get(k)
        if directory is None or not (directory / META_FILE).is_file():
            state = "is missing" if directory is None else f"is not finished (no {META_FILE})"
            raise ShardError(
                f"{path / f'part-{k}-of-{n}'} {state}: run python -m lub_fast.prepare with the other parts' "
                f"inputs and options and --part {k}/{n} (a rerun resumes an unfinished part)"
            )
        with open(directory / META_FILE, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("part") != [k, n]:
            raise ShardError(f"{directory}: its {META_FILE} is of part {meta.get('part')}, not {k}/{n}: it was renamed")
        if first is None:
            first = (directory, meta)
        elif meta.get("vocab_sha256") != first[1].get("vocab_sha256"):
            raise ShardError(f"{directory}: another vocabulary than {first[0]}'s: prepare every part with one --vocab")
        elif meta.get("settings_sha256") != first[1].get("settings_sha256"):
            raise ShardError(
                f"{directory}: other inputs or settings than {first[0]}: run every part with the same arguments "
                "but --part"
            )
        dirs.append(directory)
    return dirs


def expand(paths) -> list[str]:
    """``paths`` with each directory of ``--part`` outputs replaced by its part directories
    (``shard_dirs``); anything else (a shard directory, a path that is not there) as given, so that
    the caller's own error names it."""
    return [str(d) for p in paths for d in (shard_dirs(p) if is_shard_source(p) else [p])]
