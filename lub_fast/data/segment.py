"""Chinese word segmentation for whole-word masking: jieba, rjieba, or none.

- ``jieba`` (Sun Junyi, https://github.com/fxsjy/jieba): the reference segmenter, used with its
  HMM for unknown words turned off, since rjieba reproduces jieba exactly only then.
- ``rjieba`` (the Rust port jieba-rs behind a Python module): the same words as jieba with HMM off
  (``rjieba.cut(text, hmm=False)``), about 20x faster.
- ``none``: no segmentation; words are then WordPiece's own (each Chinese character is a word,
  other text follows the ``##`` continuations).

A user dictionary uses jieba's format (one ``word [freq] [tag]`` a line, UTF-8) and is loaded into
either backend through ``add_word``, as ``jieba.Tokenizer.load_userdict`` does.
"""

import hashlib
import logging
import re

import numpy as np

SEGMENTERS = ("jieba", "rjieba", "none")

# jieba.Tokenizer.load_userdict's line pattern: word, optional frequency, optional POS tag.
_USER_DICT_LINE = re.compile(r"^(.+?)( [0-9]+)?( [a-z]+)?$", re.U)


def read_user_dict(path):
    """The entries of a jieba-format user dictionary as ``(word, freq or None, tag or None)``."""
    entries = []
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            word, freq, tag = _USER_DICT_LINE.match(line).groups()
            entries.append((word, int(freq) if freq is not None else None, tag.strip() if tag else None))
    return entries


class Segmenter:
    """Word segmentation of one backend; build one per process (it loads the dictionary once).

    ``boundaries(text)`` is the segmentation the data pipeline uses: a bool array of
    ``len(text) + 1`` entries, True where a word starts (index ``len(text)`` is True too), or
    None for ``none``.
    """

    def __init__(self, name="jieba", user_dict=None):
        if name not in SEGMENTERS:
            raise ValueError(f"segmenter must be one of {SEGMENTERS}, got {name!r}")
        if name == "none" and user_dict is not None:
            raise ValueError("a user dictionary needs a segmenter (jieba or rjieba), not 'none'")
        self.name = name
        self.user_dict = user_dict
        entries = read_user_dict(user_dict) if user_dict is not None else []
        if name == "jieba":
            import jieba

            jieba.setLogLevel(logging.WARNING)
            self._backend = jieba.Tokenizer()
            self._backend.initialize()
            for word, freq, tag in entries:
                self._backend.add_word(word, freq, tag)
        elif name == "rjieba":
            import rjieba

            self._backend = rjieba.Jieba()
            for word, freq, tag in entries:
                self._backend.add_word(word, freq, tag)

    def cut(self, text):
        """The words of ``text`` (HMM off); they concatenate back to ``text``."""
        if self.name == "jieba":
            return list(self._backend.cut(text, HMM=False))
        if self.name == "rjieba":
            return self._backend.cut(text, hmm=False)
        return [text] if text else []

    def boundaries(self, text):
        if self.name == "none":
            return None
        lengths = np.fromiter(map(len, self.cut(text)), dtype=np.int64)
        ends = np.cumsum(lengths)
        if ends.size and ends[-1] != len(text):
            raise RuntimeError(f"{self.name} returned words covering {ends[-1]} of {len(text)} characters")
        starts = np.zeros(len(text) + 1, dtype=bool)
        starts[0] = True
        starts[ends] = True
        return starts


def segmenter_settings(name, user_dict=None):
    """What determines a segmentation, for shard metadata (no dictionary is loaded)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"name": name, "hmm": False}
    if name != "none":
        try:
            out["version"] = version(name)
        except PackageNotFoundError:
            out["version"] = None
    if user_dict is not None:
        with open(user_dict, "rb") as f:
            out["user_dict_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return out
