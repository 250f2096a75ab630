"""What ``prepare`` kept, dropped and fixed: the counter keys, their labels, ``summary.json``.

Every line read is kept or dropped for one reason (``LINE_DROPS``), so that
``lines_read == lines_kept + sum(lines_dropped)``; ``summary.json`` in the output holds these counts,
the sentences and documents dropped, what was fixed, and the files (or lines) skipped or repaired by
name (the first few per reason, then a count). ``PrepareSummary.format()`` prints it.
"""

import dataclasses
from collections import Counter

from lub_fast.data.inputs import LINE_LIMIT, NAMED_FIRST

# Counter keys, in the order the summary prints them, with their labels. Every line read is kept
# or dropped for one of LINE_DROPS: lines_read == lines_kept + sum(LINE_DROPS).
LINE_DROPS = {
    "blank": "blank",
    "empty_after_cleaning": "empty after cleaning",
    "short_lines": "every sentence shorter than --min-chars",
    "no_token_lines": "no sentence with tokens",
    "malformed_json": "malformed JSON",
    "no_text_field": "JSON without a string 'text'",
    "long_json_lines": f"JSON over {LINE_LIMIT >> 20} MiB",
}
SENTENCE_DROPS = {"too_short": "shorter than --min-chars", "no_tokens": "without tokens"}
# Files (or lines) skipped or repaired, named in the summary: the first few, then a count.
NAMED = {
    "special_files": "special files skipped (FIFO, socket, device)",
    "broken_links": "dangling or looping symbolic links skipped",
    "binary_files": "binary files skipped",
    "corrupt_files": "corrupt compressed files (rest of the file skipped)",
    "long_json_lines": f"JSON lines over {LINE_LIMIT >> 20} MiB dropped",
    "decoded_files": "UTF-16/UTF-32 files decoded",
}
FIXED = {
    "invalid_utf8": "lines with invalid UTF-8 replaced",
    "control_chars": "lines with control/zero-width characters removed",
    "long_lines": "sentences split at clause punctuation",
    "hard_cuts": "hard cuts of over-long clauses",
    "documents_split": "documents split at the chunk size",
    "t2s": "lines converted to simplified",
}


@dataclasses.dataclass(frozen=True)
class PrepareSummary:
    """What ``prepare_corpus`` did: output, totals, and every count of kept/dropped/fixed input.

    ``report`` is what ``summary.json`` in the output holds (a function of the inputs and settings);
    ``format()`` prints it.
    """

    output_dir: str
    files: int
    input_bytes: int
    shards: int
    shards_skipped: int
    documents: int
    sentences: int
    tokens: int
    counts: dict
    invalid_utf8_by_file: dict
    seconds: float
    report: dict

    def format(self):
        r = self.report
        lines = [
            f"prepared {r['files']} files ({r['input_bytes'] / 1e6:.1f} MB) into {self.output_dir}: "
            f"{r['shards']} shards ({self.shards_skipped} already complete, skipped) in {self.seconds:.1f} s",
            f"kept: {r['documents']:,} documents, {r['sentences']:,} sentences, {r['tokens']:,} tokens "
            f"from {r['lines_kept']:,} of {r['lines_read']:,} lines",
            "lines dropped: " + _listing(r["lines_dropped"], LINE_DROPS),
            "sentences dropped: " + _listing(r["sentences_dropped"], SENTENCE_DROPS)
            + f"; documents with nothing left {r['empty_documents']:,}",
            "fixed: " + _listing(r["fixed"], FIXED),
        ]
        for key, label in NAMED.items():
            named = r["named"][key]
            if named["count"]:
                lines.append(f"{label} {named['count']:,}: " + _first_few(named))
        invalid = r["named"]["invalid_utf8_files"]
        lines.extend(f"  invalid UTF-8 replaced in {entry}" for entry in invalid["first"])
        if invalid["count"] > len(invalid["first"]):
            lines.append(f"  ... and in {invalid['count'] - len(invalid['first']):,} more files")
        tokens = max(r["tokens"], 1)
        lines.append(
            f"words: {r['word_mismatches']:,} segmentation/token mismatches "
            f"({100 * r['word_mismatches'] / tokens:.2f}% of tokens, tokens win), "
            f"[UNK] {r['unk_tokens']:,} ({100 * r['unk_tokens'] / tokens:.2f}%)"
        )
        if not r["documents"]:
            lines.append("warning: no documents were written")
        return "\n".join(lines)


def _listing(counts, labels):
    return ", ".join(f"{label} {counts[k]:,}" for k, label in labels.items() if counts.get(k)) or "nothing"


def _first_few(named):
    more = named["count"] - len(named["first"])
    return "; ".join(named["first"]) + (f"; ... and {more:,} more" if more > 0 else "")


def _named(count, entries):
    return {"count": count, "first": list(entries[:NAMED_FIRST])}


def report(files, input_bytes, headers, counts, named, invalid_utf8_by_file):
    """What summary.json holds: totals, every line kept or dropped by reason, named files."""
    c = Counter(counts)
    invalid = [f"{n:,} lines of {path}" for path, n in invalid_utf8_by_file.items()]
    return {
        "files": files,
        "input_bytes": input_bytes,
        "shards": len(headers),
        "documents": sum(h["num_documents"] for h in headers),
        "sentences": sum(h["num_sentences"] for h in headers),
        "tokens": sum(h["num_tokens"] for h in headers),
        "lines_read": c["lines_read"],
        "lines_kept": c["lines_kept"],
        "lines_dropped": {k: c[k] for k in LINE_DROPS},
        "sentences_dropped": {k: c[k] for k in SENTENCE_DROPS},
        "empty_documents": c["empty_documents"],
        "fixed": {k: c[k] for k in FIXED},
        "named": dict(
            {k: _named(c[k], named.get(k, [])) for k in NAMED},
            invalid_utf8_files=_named(len(invalid), invalid),
        ),
        "word_mismatches": c["word_mismatches"],
        "unk_tokens": c["unk_tokens"],
    }

