"""``python -m lub_fast.finetune`` end to end on tiny random models: classification, regression,
CMRC 2018 and NER (CoNLL and CLUENER) on slices of ../shared/data when present (synthetic files of
the same formats otherwise), HF export parity with ``transformers``, learning, exact resume after
SIGTERM, bad input, and layer-wise learning-rate decay reaching the optimizer."""

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from lub_fast.config_cli import load_config
from lub_fast.errors import EXIT_PREEMPTED, EXIT_USAGE
from lub_fast.finetune import FinetuneConfig, main, resolve
from lub_fast.logging_utils import read_metrics
from lub_fast.models import (
    EncoderConfig,
    EncoderModel,
    SequenceClassification,
    from_pretrained,
)
from lub_fast.tasks.base import load_tokenizer, special_id
from lub_fast.tasks.cmrc2018 import REPAIR_NO_VERBATIM, REPAIR_NOT_VERBATIM
from lub_fast.tasks.metrics import cmrc2018_score
from lub_fast.tasks.run import FinetuneData

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OLD_CONFIG = Path(__file__).parent / "tasks" / "fixtures" / "finetune_093b1bc_config.json"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FAST = ["--train.device=cpu", "--train.log_every=1", "--finetune.eval_batch_size=32"]
# a base checkpoint gets a new task head: hf.py says so, as it should
pytestmark = pytest.mark.filterwarnings("ignore:lub_fast. .*(has no weights for|dropped):UserWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lines(path, start, stop):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f][start:stop]


def _write(path, lines):
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def tiny_model(directory, data_files, family="bert", layers=2, dropout=0.1, head=None):
    """A random 2-layer encoder (with a ``SequenceClassification`` head when ``head`` gives its
    label names) saved with lub_fast's ``save_pretrained`` and a ``vocab.txt`` of the data's
    characters (each also as a ``##`` continuation)."""
    chars = set()
    for path in data_files:
        chars |= {c.lower() for c in Path(path).read_text(encoding="utf-8") if not c.isspace()}
    chars = sorted(chars)
    vocab = SPECIALS + chars + ["##" + c for c in chars]
    config = EncoderConfig(
        family=family, vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    torch.manual_seed(0)
    if head is None:
        EncoderModel(config).save_pretrained(directory)
    else:
        model = SequenceClassification(config, num_labels=len(head), problem_type="single_label_classification")
        model.save_pretrained(directory, labels=head)
    _write(Path(directory) / "vocab.txt", vocab)
    return str(directory)


def _run(*args):
    return main([str(a) for a in args] + FAST)


def _files(train, dev, test=None):
    """The ``--data.*`` options naming a run's files."""
    return [f"--data.train={train}", f"--data.dev={dev}"] + ([f"--data.test={test}"] if test else [])


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _hf_parity(best_dir, texts, kind):
    """transformers loads the export and gives our logits (1e-4) on our tokenizer's ids."""
    import transformers

    auto = {
        "sequence": transformers.AutoModelForSequenceClassification,
        "token": transformers.AutoModelForTokenClassification,
        "span": transformers.AutoModelForQuestionAnswering,
    }[kind]
    hf_model = auto.from_pretrained(best_dir).eval()
    ours = from_pretrained(best_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(best_dir)
    batch = hf_tokenizer(*zip(*texts), padding=True, return_tensors="pt")
    tokenizer = load_tokenizer(best_dir)
    cls, sep = special_id(tokenizer, "[CLS]"), special_id(tokenizer, "[SEP]")
    for row, mask, (a, b) in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), texts):
        ids_a, ids_b = (tokenizer.encode(t, add_special_tokens=False).ids for t in (a, b))
        assert row[: sum(mask)] == [cls] + ids_a + [sep] + ids_b + [sep], (a, b)
    if kind != "span":
        saved = json.loads((Path(best_dir) / "config.json").read_text())["id2label"]
        assert hf_model.config.id2label == {int(k): v for k, v in saved.items()}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        theirs, mine = hf_model(**inputs), ours(**inputs)
    real = batch["attention_mask"].bool()
    if kind == "sequence":
        pairs = [(mine.logits, theirs.logits)]
    elif kind == "token":
        pairs = [(mine.logits[real], theirs.logits[real])]
    else:
        pairs = [(mine.start_logits[real], theirs.start_logits[real]), (mine.end_logits[real], theirs.end_logits[real])]
    for a, b in pairs:
        err = (a - b).abs().max().item()
        assert err < 1e-4, f"{kind}: max |ours - transformers| = {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Data: slices of ../shared/data, or synthetic files of the same format

# 300 CJK characters; '好' and '坏' are kept for the keyword task
_SYN_CHARS = "".join(c for c in map(chr, range(0x4E00, 0x4E00 + 2100, 7)) if c not in "好坏")


def _syn_sentence(rng, n):
    return "".join(rng.choice(_SYN_CHARS) for _ in range(n))


def _pair_tsv(tmp_path, with_real):
    if with_real:
        train = _write(tmp_path / "train.txt", _lines(DATA / "afqmc/train.txt", 0, 200))
        dev_lines = _lines(DATA / "afqmc/dev.txt", 0, 100)
    else:
        rng = random.Random(0)
        rows = [f"{_syn_sentence(rng, 12)}\t{_syn_sentence(rng, 10)}\t{rng.randint(0, 1)}" for _ in range(300)]
        train, dev_lines = _write(tmp_path / "train.txt", rows[:200]), rows[200:]
    dev = _write(tmp_path / "dev.txt", dev_lines[:60])
    test = _write(tmp_path / "test.txt", ["\t".join(line.split("\t")[:2]) for line in dev_lines[60:]])
    return train, dev, test


@pytest.mark.parametrize("real", [True, False], ids=["afqmc", "synthetic"])
def test_finetune_classification_outputs_and_hf_export(tmp_path, real):
    if real and not (DATA / "afqmc").exists():
        pytest.skip("../shared/data absent")
    train, dev, test = _pair_tsv(tmp_path, real)
    model = tiny_model(tmp_path / "model", [train, dev, test])
    out = tmp_path / "out"
    code = _run("--task", "afqmc", "--model", model, "--output", out, *_files(train, dev, test),
                "--finetune.epochs=2", "--finetune.batch_size=16", "--finetune.max_seq_len=64")  # fmt: skip
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == "afqmc" and report["metric"] == "accuracy", report
    assert set(report["dev"]) == {"accuracy", "macro_f1"} and "test" not in report, report
    assert report["examples"] == {"train": 200, "dev": 60, "test": 40}, report
    assert report["total_steps"] == 2 * 13 and report["best_step"] in (13, 26), report
    dev_rows, test_rows = _read_jsonl(out / "dev_predictions.jsonl"), _read_jsonl(out / "test_predictions.jsonl")
    assert len(dev_rows) == 60 and len(test_rows) == 40, (len(dev_rows), len(test_rows))
    assert all(set(r) == {"id", "label"} and r["label"] in ("0", "1") for r in dev_rows + test_rows), dev_rows[:3]
    assert [r["id"] for r in test_rows] == list(range(40))
    assert _read_jsonl(out / "afqmc_predict.json") == test_rows  # CLUE's submission name and format
    gold = [line.split("\t")[2] for line in _lines(dev, 0, 60)]
    accuracy = sum(r["label"] == g for r, g in zip(dev_rows, gold)) / 60
    assert abs(accuracy - report["dev"]["accuracy"]) < 1e-12, (accuracy, report["dev"])
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [13, 26], evals
    assert max(r["accuracy"] for r in evals) == report["dev"]["accuracy"], (evals, report)
    config = json.loads((out / "best_model" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"} and config["problem_type"] == "single_label_classification"
    # a bare vocab.txt gets the tokenizer_config.json that every save_pretrained export of it gets
    from_pretrained(model).save_pretrained(tmp_path / "saved", tokenizer=Path(model) / "vocab.txt")
    for name in ("vocab.txt", "tokenizer_config.json"):
        assert (out / "best_model" / name).read_bytes() == (tmp_path / "saved" / name).read_bytes(), name
    texts = [tuple(line.split("\t")[:2]) for line in _lines(dev, 0, 6)]
    _hf_parity(out / "best_model", texts, "sequence")


def _transformers_tokenizer(model_dir):
    """``model_dir``'s vocab.txt replaced by what transformers 5 saves (tokenizer.json and
    tokenizer_config.json, no vocab.txt); returns the saved files' bytes."""
    import transformers

    vocab = (Path(model_dir) / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=256)
    tokenizer.save_pretrained(model_dir)
    (Path(model_dir) / "vocab.txt").unlink()
    return {name: (Path(model_dir) / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}


def test_finetune_regression_stsb(tmp_path):
    if (DATA / "sts_b_zh").exists():
        train = _write(tmp_path / "train.tsv", _lines(DATA / "sts_b_zh/STS-B.train.data", 0, 120))
        dev = _write(tmp_path / "dev.tsv", _lines(DATA / "sts_b_zh/STS-B.valid.data", 0, 40))
    else:
        rng = random.Random(1)
        rows = [f"{_syn_sentence(rng, 9)}\t{_syn_sentence(rng, 8)}\t{rng.randint(0, 5)}" for _ in range(160)]
        train, dev = _write(tmp_path / "train.tsv", rows[:120]), _write(tmp_path / "dev.tsv", rows[120:])
    model = tiny_model(tmp_path / "model", [train, dev])
    tokenizer_files = _transformers_tokenizer(model)
    out = tmp_path / "out"
    code = _run("--task", "stsb", "--model", model, "--output", out, *_files(train, dev, dev),
                "--finetune.epochs=1", "--finetune.batch_size=20", "--finetune.max_seq_len=64")  # fmt: skip
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["metric"] == "pearson" and set(report["dev"]) == {"pearson", "spearman", "mse"}, report
    assert report["test"] == report["dev"], report  # the labelled test file is the dev file
    rows = _read_jsonl(out / "dev_predictions.jsonl")
    assert len(rows) == 40 and all(isinstance(r["label"], float) for r in rows), rows[:3]
    config = json.loads((out / "best_model" / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["problem_type"] == "regression", config
    for name, data in tokenizer_files.items():  # the model's own tokenizer files travel as they are
        assert (out / "best_model" / name).read_bytes() == data, name
    texts = [tuple(line.split("\t")[:2]) for line in _lines(dev, 0, 5)]
    _hf_parity(out / "best_model", texts, "sequence")
    _hf_regression_pipeline(out / "best_model", texts)


def _hf_regression_pipeline(best_dir, texts):
    """transformers reads the export as a regression model, as its own save_pretrained writes one
    (num_labels 1, problem_type "regression"), so text-classification gives the raw score, not a sigmoid."""
    import transformers

    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(best_dir).eval()
    assert (hf_model.config.problem_type, hf_model.config.num_labels) == ("regression", 1), hf_model.config
    classify = transformers.pipeline("text-classification", model=str(best_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(best_dir)
    for a, b in texts:
        with torch.no_grad():
            score = hf_model(**tokenizer(a, b, return_tensors="pt")).logits.item()
        (result,) = classify([{"text": a, "text_pair": b}])
        assert result["label"] == "LABEL_0" and abs(result["score"] - score) < 1e-5, (result, score)


def _squad(docs):
    return {"version": "v1.0", "data": docs}


def _cmrc_files(tmp_path):
    if (DATA / "cmrc2018").exists():
        trial = json.loads((DATA / "cmrc2018/cmrc2018_trial.json").read_text(encoding="utf-8"))
        train_docs, dev_docs = trial["data"][:6], trial["data"][6:9]
    else:
        rng = random.Random(2)
        docs = []
        for d in range(9):
            context = _syn_sentence(rng, 150)
            qas = []
            for q in range(4):
                start = rng.randrange(0, 140)
                answer = context[start : start + rng.randint(2, 6)]
                qas.append({"id": f"D{d}_Q{q}", "question": _syn_sentence(rng, 8) + "？",
                            "answers": [{"text": answer, "answer_start": start}]})  # fmt: skip
            docs.append({"paragraphs": [{"id": f"D{d}", "context": context, "qas": qas}], "id": f"D{d}", "title": ""})
        train_docs, dev_docs = docs[:6], docs[6:]
    # as the official dev set: alternative gold answers that are not verbatim spans of the context
    # (first or last), and one question in each file whose every answer is one
    for docs in (train_docs, dev_docs):
        for k, qa in enumerate(docs[0]["paragraphs"][0]["qas"][:3]):
            alternative = {"text": qa["answers"][0]["text"] + "〇", "answer_start": qa["answers"][0]["answer_start"]}
            qa["answers"] = [[alternative] + qa["answers"], qa["answers"] + [alternative], [alternative]][k]
    train, dev = tmp_path / "train.json", tmp_path / "dev.json"
    train.write_text(json.dumps(_squad(train_docs), ensure_ascii=False), encoding="utf-8")
    dev.write_text(json.dumps(_squad(dev_docs), ensure_ascii=False), encoding="utf-8")
    return str(train), str(dev), dev_docs


def test_finetune_cmrc2018_predictions_and_hf_export(tmp_path, capsys):
    train, dev, dev_docs = _cmrc_files(tmp_path)
    model = tiny_model(tmp_path / "model", [train, dev])
    out = tmp_path / "out"
    code = _run("--task", "cmrc2018", "--model", model, "--output", out, *_files(train, dev, dev),
                "--finetune.epochs=1", "--finetune.batch_size=16", "--finetune.max_seq_len=128",
                "--finetune.doc_stride=64", "--finetune.max_query_len=24")  # fmt: skip
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["metric"] == "f1" and {"f1", "em", "average", "total"} <= set(report["dev"]), report
    predictions = json.loads((out / "dev_predictions.json").read_text(encoding="utf-8"))
    contexts = {qa["id"]: p["context"] for doc in dev_docs for p in doc["paragraphs"] for qa in p["qas"]}
    assert set(predictions) == set(contexts) and report["dev"]["total"] == len(contexts), report
    assert all(answer in contexts[qid] for qid, answer in predictions.items()), predictions
    # every question and every gold answer scored, as the official scorer does on the raw file
    official = cmrc2018_score(dev, predictions)
    assert official["skipped"] == 0 and report["dev"] == pytest.approx(official), (report["dev"], official)
    train_docs = json.loads(Path(train).read_text(encoding="utf-8"))["data"]
    n_train = sum(len(p["qas"]) for d in train_docs for p in d["paragraphs"])
    assert report["examples"] == {"train": n_train - 1, "dev": len(contexts), "test": len(contexts)}, report
    assert report["repaired"]["dev"][REPAIR_NOT_VERBATIM] == 3 and report["skipped"]["train"] == {REPAIR_NO_VERBATIM: 1}
    err = capsys.readouterr().err
    assert f"{train}: skipped 1 line(s): {REPAIR_NO_VERBATIM}" in err, err
    assert f"{dev}: kept, repaired: {REPAIR_NOT_VERBATIM}: 3" in err, err
    assert json.loads((out / "test_predictions.json").read_text(encoding="utf-8")) == predictions
    assert json.loads((out / "cmrc2018_predict.json").read_text(encoding="utf-8")) == predictions
    first = dev_docs[0]["paragraphs"][0]
    texts = [(qa["question"], first["context"][:40]) for qa in first["qas"][:3]]
    _hf_parity(out / "best_model", texts, "span")


def _ner_files(tmp_path, flavour):
    if flavour == "conll":
        source = DATA / "peoples_daily_ner/example.dev"
        if source.exists():
            sentences = "\n".join(_lines(source, 0, 9000)).split("\n\n")[:90]
        else:
            rng = random.Random(3)
            sentences = []
            for _ in range(90):
                chars = [rng.choice(_SYN_CHARS) for _ in range(15)]
                tags = ["O"] * 15
                start = rng.randrange(0, 12)
                tags[start : start + 3] = ["B-PER", "I-PER", "I-PER"]
                sentences.append("\n".join(f"{c} {t}" for c, t in zip(chars, tags)))
        train = _write(tmp_path / "train.txt", ["\n\n".join(sentences[:60])])
        dev = _write(tmp_path / "dev.txt", ["\n\n".join(sentences[60:])])
        return train, dev, None, 30
    source = DATA / "cluener2020/train.json"
    if source.exists():
        lines = _lines(source, 0, 110)
    else:
        rng = random.Random(4)
        lines = []
        for _ in range(110):
            text = _syn_sentence(rng, 20)
            start = rng.randrange(0, 16)
            entity = text[start : start + 3]
            label = {"name": {entity: [[start, start + 2]]}}
            lines.append(json.dumps({"text": text, "label": label}, ensure_ascii=False))
    train = _write(tmp_path / "train.json", lines[:70])
    dev = _write(tmp_path / "dev.json", lines[70:100])
    texts = [json.loads(line)["text"] for line in lines[100:]]
    unlabelled = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in enumerate(texts)]
    test = _write(tmp_path / "test.json", unlabelled)
    return train, dev, test, 30


@pytest.mark.parametrize("flavour", ["conll", "cluener"])
def test_finetune_ner_spans_and_hf_export(tmp_path, flavour):
    train, dev, test, n_dev = _ner_files(tmp_path, flavour)
    model = tiny_model(tmp_path / "model", [f for f in (train, dev, test) if f])
    out = tmp_path / "out"
    extra = ["--data.scheme", "bmes", "--data.test", dev] if flavour == "conll" else ["--data.test", test]
    code = _run("--task", "ner", "--model", model, "--output", out, *_files(train, dev), *extra,
                "--finetune.epochs=1", "--finetune.batch_size=10", "--finetune.max_seq_len=64")  # fmt: skip
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["metric"] == "entity_f1", report
    assert set(report["dev"]) == {"entity_f1", "entity_precision", "entity_recall"}, report
    rows = _read_jsonl(out / "dev_predictions.jsonl")
    assert len(rows) == n_dev and all(set(r) == {"id", "text", "label"} for r in rows), rows[:2]
    for r in rows:
        for entities in r["label"].values():
            for entity, spans in entities.items():
                assert all(r["text"][s : e + 1] == entity for s, e in spans), r
    config = json.loads((out / "best_model" / "config.json").read_text())
    tags = set(config["id2label"].values())
    prefixes = ("B-", "M-", "E-", "S-") if flavour == "conll" else ("B-", "I-")
    assert "O" in tags and all(t == "O" or t.startswith(prefixes) for t in tags), tags
    if test:
        test_rows = _read_jsonl(out / "test_predictions.jsonl")
        assert len(test_rows) == 10 and "test" not in report
        submission = _read_jsonl(out / "cluener_predict.json")
        assert submission == [{"id": r["id"], "label": r["label"]} for r in test_rows], submission[:2]
        assert [r["id"] for r in submission] == list(range(10))
    else:  # CoNLL test data: CLUE ranks no such task
        assert not (out / "cluener_predict.json").exists() and len(_read_jsonl(out / "test_predictions.jsonl")) == n_dev
    texts = [(r["text"][:20], r["text"][20:30] or "的") for r in rows[:4]]
    _hf_parity(out / "best_model", texts, "token")


def _keyword_task(tmp_path, n_train, n_dev, seed=0):
    """Generic json classification: the label says whether the sentence holds '好' or '坏'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_train + n_dev):
        label = rng.choice(["pos", "neg"])
        chars = list(_syn_sentence(rng, 10))
        chars.insert(rng.randrange(0, 11), "好" if label == "pos" else "坏")
        rows.append(json.dumps({"uid": i, "body": "".join(chars), "tag": label}, ensure_ascii=False))
    return _write(tmp_path / "train.json", rows[:n_train]), _write(tmp_path / "dev.json", rows[n_train:])


def test_finetune_learns_a_keyword_task(tmp_path):
    train, dev = _keyword_task(tmp_path, 192, 48)
    model = tiny_model(tmp_path / "model", [train, dev])
    out = tmp_path / "out"
    code = _run("--task", "classification", "--data.text_fields", "body", "--data.label_field", "tag", "--model", model,
                "--data.train", train, "--data.dev", dev, "--output", out,
                "--finetune.epochs=6", "--finetune.batch_size=16",
                "--finetune.max_seq_len=32", "--train.lr=2e-3", "--finetune.warmup_ratio=0.05")  # fmt: skip
    assert code == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.5 * first, (first, last)
    report = json.loads((out / "metrics.json").read_text())
    assert report["dev"]["accuracy"] >= 0.9, report
    labels = {r["label"] for r in _read_jsonl(out / "dev_predictions.jsonl")}
    assert labels <= {"pos", "neg"}, labels
    saved = load_config(FinetuneConfig, out / "config.json")
    assert saved.data.text_fields == ("body",) and saved.train.total_steps == 6 * 12, saved
    assert resolve(["--config", str(out / "config.json")]) == (saved, None)


def test_finetune_resume_after_sigterm_is_exact(tmp_path):
    train, dev = _keyword_task(tmp_path, 48, 16, seed=5)
    model = tiny_model(tmp_path / "model", [train, dev])
    args = ["--task", "classification", "--data.text_fields", "body", "--data.label_field", "tag", "--model", model,
            "--data.train", train, "--data.dev", dev, "--finetune.epochs=2", "--finetune.batch_size=8",
            "--train.grad_accum_steps=2", "--finetune.max_seq_len=32", "--train.lr=1e-3"]  # fmt: skip
    assert _run(*args, "--output", tmp_path / "whole") == 0
    steps = []

    def stop_after_step_7(optimizer, *_):  # after the first epoch's evaluation (step 6)
        steps.append(1)
        if len(steps) == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    handle = register_optimizer_step_post_hook(stop_after_step_7)
    try:
        assert _run(*args, "--output", tmp_path / "parts") == EXIT_PREEMPTED
    finally:
        handle.remove()
    assert not (tmp_path / "parts" / "metrics.json").exists()
    assert _run(*args, "--output", tmp_path / "parts", "--resume") == 0
    for name in ("best_model/model.safetensors", "checkpoints/step_00000012/model.safetensors"):
        whole, parts = load_file(tmp_path / "whole" / name), load_file(tmp_path / "parts" / name)
        assert whole.keys() == parts.keys()
        for key, value in whole.items():
            assert torch.equal(value, parts[key]), f"{name}: {key} differs after resume"
    report = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert json.loads((tmp_path / "parts" / "metrics.json").read_text()) == report


def test_finetune_early_stopping_keeps_the_best(tmp_path):
    train, dev = _keyword_task(tmp_path, 32, 16, seed=6)
    model = tiny_model(tmp_path / "model", [train, dev])
    out = tmp_path / "out"
    code = _run("--task", "classification", "--data.text_fields", "body", "--data.label_field", "tag", "--model", model,
                "--data.train", train, "--data.dev", dev, "--output", out,
                "--finetune.epochs=30", "--finetune.batch_size=16",
                "--finetune.max_seq_len=32", "--train.lr=0", "--finetune.patience=2",
                "--finetune.eval_every=1")  # fmt: skip
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    # lr 0: the dev metric never improves on the first evaluation, so training stops at step 3
    assert report["stopped_early"] and report["best_step"] == 1, report
    assert [r["step"] for r in evals] == [1, 2, 3], evals  # the evaluation that stops is logged


def test_finetune_bad_input_names_file_and_line(tmp_path, capsys):
    train, dev, _ = _pair_tsv(tmp_path, with_real=False)
    lines = _lines(train, 0, 40)
    lines[4] = "only one field"
    bad = _write(tmp_path / "bad.txt", lines)
    model = tiny_model(tmp_path / "model", [train, dev])
    common = ["--task", "afqmc", "--model", model, "--data.dev", dev, "--finetune.epochs=1", "--finetune.batch_size=13"]
    assert _run(*common, "--data.train", bad, "--output", tmp_path / "a") == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lub_fast.finetune: error: {bad}:5: expected 3 tab-separated fields"), err[-1]
    unknown = _write(tmp_path / "unknown.txt", _lines(dev, 0, 10) + ["一\t二\t7"])
    assert _run(*common[:4], "--data.train", train, "--data.dev", unknown, "--output", tmp_path / "b") == EXIT_USAGE
    assert f"{unknown}:11: label outside the label set" in capsys.readouterr().err
    assert _run(*common, "--data.train", bad, "--output", tmp_path / "c", "--data.skip_bad=true") == 0
    assert f"{bad}: skipped 1 line(s): expected 3 tab-separated fields" in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["examples"]["train"] == 39
    assert _run(*common, "--data.train", train, "--output", tmp_path / "d", "--train.total_steps=5") == EXIT_USAGE
    assert "derived" in capsys.readouterr().err
    assert _run(*common, "--data.train", train, "--output", tmp_path / "d", "--data.scheme", "bio") == EXIT_USAGE
    assert "error: --data.scheme is for the 'ner' task" in capsys.readouterr().err


def test_finetune_one_spelling_per_option(tmp_path, capsys):
    base = ["--task", "afqmc", "--model", "m", "--output", str(tmp_path / "o")]
    config, resume = resolve([*base, "--data.train", "a.txt", "--data.dev=b.txt", "--train.lr=1e-4", "--resume"])
    assert (config.data.train, config.data.dev, config.train.lr, resume) == ("a.txt", "b.txt", 1e-4, "latest")
    for old, new in (("--train", "data.train"), ("--dev", "data.dev"), ("--skip-bad", "data.skip_bad")):
        assert main([*base, old, "x.txt"] if old != "--skip-bad" else [*base, old]) == EXIT_USAGE
        assert f"lub_fast.finetune: error: {old} is now --{new}=VALUE" in capsys.readouterr().err
    assert main([*base, "--data.train=a.txt"]) == EXIT_USAGE
    assert "error: missing --data.dev" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_finetune_old_run_config_runs_and_is_rewritten_in_the_new_layout(tmp_path, monkeypatch, capsys):
    """``--config parts/config.json --resume`` in a run directory of before the files moved to data
    (tasks/fixtures/README.md; its files are relative to where it ran): the run reads the old keys,
    trains, and its config.json is today's layout afterwards."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(8)
    rows = [f"{rng.randint(0, 1)}\t{_syn_sentence(rng, 12)}" for _ in range(64)]
    _write("train.tsv", ["label\ttext_a", *rows[:48]])
    _write("dev.tsv", ["label\ttext_a", *rows[48:]])
    tiny_model("model", ["train.tsv", "dev.tsv"])
    os.mkdir("parts")
    shutil.copy(OLD_CONFIG, "parts/config.json")
    assert main(["--config", "parts/config.json", "--resume"]) == 0
    assert "parts/config.json: read the old top-level train_file as data.train" in capsys.readouterr().err
    rewritten = load_config(FinetuneConfig, "parts/config.json")
    data = FinetuneData(train="train.tsv", dev="dev.tsv", text_fields=("text_a",), label_field="label")
    assert rewritten.data == data and rewritten.train.total_steps == 12, rewritten
    assert json.loads(Path("parts/metrics.json").read_text())["examples"] == {"train": 48, "dev": 16}


def test_finetune_layer_decay_reaches_the_optimizer(tmp_path):
    train, dev = _keyword_task(tmp_path, 16, 8, seed=7)
    model = tiny_model(tmp_path / "model", [train, dev])
    seen = []

    def record(optimizer, *_):
        seen.append(sorted({round(g["lr"], 12) for g in optimizer.param_groups}))

    handle = register_optimizer_step_post_hook(record)
    try:
        code = _run("--task", "classification", "--data.text_fields", "body", "--data.label_field", "tag",
                    "--model", model,
                    "--data.train", train, "--data.dev", dev, "--output", tmp_path / "out", "--finetune.epochs=1",
                    "--finetune.batch_size=8", "--finetune.warmup_ratio=0", "--train.schedule=constant",
                    "--train.lr=1e-3", "--finetune.layer_decay=0.5")  # fmt: skip
    finally:
        handle.remove()
    assert code == 0
    assert seen[0] == [round(1e-3 * 0.5**k, 12) for k in (3, 2, 1, 0)], seen[0]


def test_finetune_matches_a_plain_transformers_loop(tmp_path):
    """Same start (a task checkpoint), data order, AdamW and schedule, no dropout: our loop and a
    plain PyTorch loop over the transformers model end with the same dev logits."""
    import numpy as np
    import transformers

    train, dev = _keyword_task(tmp_path, 96, 32, seed=8)
    start = tiny_model(tmp_path / "model", [train, dev], dropout=0.0, head=("neg", "pos"))
    lr, batch_size, seed = 3e-3, 8, 3
    code = _run("--task", "classification", "--data.text_fields", "body", "--data.label_field", "tag", "--model", start,
                "--data.train", train, "--data.dev", dev, "--output", tmp_path / "ours", "--finetune.epochs=1",
                f"--finetune.batch_size={batch_size}", "--finetune.warmup_ratio=0", f"--train.lr={lr}",
                f"--train.seed={seed}")  # fmt: skip
    assert code == 0

    rows = [json.loads(line) for line in _lines(train, 0, 96)]
    label_id = {"neg": 0, "pos": 1}
    tokenizer = transformers.AutoTokenizer.from_pretrained(start)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(start).train()
    no_decay = [p for n, p in hf.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in hf.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, eps=1e-6)
    steps = len(rows) // batch_size
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 0, steps)
    order = np.random.default_rng([seed, 0]).permutation(len(rows))  # finetune's epoch-0 order
    for k in range(steps):
        batch_rows = [rows[i] for i in order[k * batch_size : (k + 1) * batch_size]]
        batch = tokenizer([r["body"] for r in batch_rows], padding=True, return_tensors="pt")
        labels = torch.tensor([label_id[r["tag"]] for r in batch_rows])
        hf(**batch, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()

    dev_rows = [json.loads(line) for line in _lines(dev, 0, 32)]
    batch = tokenizer([r["body"] for r in dev_rows], padding=True, return_tensors="pt")
    ours = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours" / "best_model").eval()
    with torch.no_grad():
        expected, got = hf.eval()(**batch).logits, ours(**batch).logits
    moved = (got - from_pretrained(start).eval()(**batch).logits).abs().max().item()
    err = (got - expected).abs().max().item()
    assert moved > 1e-2 and err < 1e-5, f"dev logits: ours vs the HF loop {err:.2e}, training moved them {moved:.2e}"
    report = json.loads((tmp_path / "ours" / "metrics.json").read_text())
    accuracy = (expected.argmax(-1) == torch.tensor([label_id[r["tag"]] for r in dev_rows])).float().mean().item()
    assert report["dev"]["accuracy"] == pytest.approx(accuracy), (report["dev"], accuracy)
