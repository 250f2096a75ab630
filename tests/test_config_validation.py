"""Bad values stop before any work: every numeric field of every command's config declares its
range, the range is enforced (in code, on the command line and in a saved config.json), and each
command exits 2 with one line naming the field, the value and the range, before it creates its
output directory."""

import dataclasses
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from lub_fast import distill, finetune, prepare, pretrain, recipes
from lub_fast.data.inputs import PrepareError
from lub_fast.data.pipeline import PrepareConfig
from lub_fast.config_cli import ConfigError, describe, range_text, to_dict
from lub_fast.data.collator import MaskingConfig
from lub_fast.errors import UsageError
from lub_fast.models.config import EncoderConfig

ROOT = Path(__file__).resolve().parents[1]
_BOUNDS = ("ge", "gt", "le", "lt")


def _configs():
    """One valid instance of every config dataclass of every command, nested sections included."""
    roots = [
        recipes.PretrainConfig(),
        distill.DistillConfig(),
        finetune.FinetuneConfig(),
        PrepareConfig(),
        MaskingConfig(vocab_size=100, cls_token_id=2, sep_token_id=3, pad_token_id=0, mask_token_id=4, unk_token_id=1),
        EncoderConfig(),
    ]
    found = {}
    while roots:
        config = roots.pop()
        found.setdefault(type(config), config)
        roots.extend(getattr(config, f.name) for f in dataclasses.fields(config)
                     if dataclasses.is_dataclass(getattr(config, f.name)))
    return found


CONFIGS = _configs()


def _numeric(annotation) -> bool:
    if annotation in (int, float):
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType, tuple):
        return any(_numeric(a) for a in args if a is not type(None) and a is not Ellipsis)
    return False


def _item_type(annotation):
    """int or float: the number type inside ``int | None``, ``tuple[float, float]`` and the like."""
    if annotation in (int, float):
        return annotation
    return next(_item_type(a) for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis and _numeric(a))


NUMERIC_FIELDS = [
    (cls, f, typing.get_type_hints(cls)[f.name])
    for cls in CONFIGS
    for f in dataclasses.fields(cls)
    if _numeric(typing.get_type_hints(cls)[f.name])
]


def test_config_validation_every_numeric_field_declares_a_range():
    assert len(CONFIGS) >= 17, sorted(c.__name__ for c in CONFIGS)
    missing = [f"{cls.__name__}.{f.name}" for cls, f, _ in NUMERIC_FIELDS if not any(b in f.metadata for b in _BOUNDS)]
    assert not missing, f"numeric config fields without a declared range (option(..., ge=/gt=/le=/lt=)): {missing}"


def _outside(f, annotation):
    """A value just outside ``f``'s declared range, of the field's type."""
    number = _item_type(annotation)
    step = 1 if number is int else 0.5
    meta = f.metadata
    if "ge" in meta:
        bad = meta["ge"] - step
    elif "gt" in meta:
        bad = meta["gt"]
    elif "le" in meta:
        bad = meta["le"] + step
    else:
        bad = meta["lt"]
    bad = number(bad)
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return (bad,) if args[-1] is Ellipsis else (bad,) * len(args)
    return bad


@pytest.mark.parametrize("cls, f, annotation", NUMERIC_FIELDS, ids=[f"{c.__module__}.{c.__name__}.{f.name}" for c, f, _ in NUMERIC_FIELDS])
def test_config_validation_every_declared_range_is_enforced(cls, f, annotation):
    bad = _outside(f, annotation)
    with pytest.raises((ConfigError, PrepareError)) as info:
        dataclasses.replace(CONFIGS[cls], **{f.name: bad})
    item = bad[0] if isinstance(bad, tuple) else bad
    message = str(info.value)
    name = f.metadata.get("flag", f"{cls.__name__}.{f.name}")
    expected = f"{item!r} is not allowed (must be {range_text(f.metadata)})"
    assert name in message and expected in message, (message, name, expected)


def test_config_validation_error_contract_and_help():
    assert issubclass(ConfigError, UsageError) and issubclass(ConfigError, ValueError)
    lines = describe(recipes.PretrainConfig())
    for shown in ("--data.batch_size=INT (default: 32) >= 1  ", "--masking.rate=FLOAT (default: 0.15) in (0, 1]  ",
                  "--train.betas=FLOAT,FLOAT (default: 0.9,0.999) in [0, 1)  "):
        assert any(line.startswith(shown) for line in lines), (shown, [x for x in lines if x.startswith(shown[:12])])


# ------------------------------------------------------------------------------ the commands


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "corpus.txt").write_text("今天天气很好。\n我们去公园散步。\n\n明天会下雨吗？\n", encoding="utf-8")
    (d / "a_file").write_text("not a directory\n", encoding="utf-8")
    (d / "image.bin").write_bytes(bytes(range(256)) * 4)
    tokenizer = {"version": "1.0", "model": {"type": "WordPiece", "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}}}
    (d / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2), encoding="utf-8")  # lacks WordPiece fields
    (d / "vocab.json").write_text(json.dumps(tokenizer["model"]["vocab"]), encoding="utf-8")
    (d / "words.txt").write_text("今\n天\n气\n", encoding="utf-8")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"今天气很好"]) + "\n", encoding="utf-8")
    bad = to_dict(recipes.PretrainConfig())
    bad["data"]["batch_size"] = 0
    (d / "config.json").write_text(json.dumps(bad), encoding="utf-8")
    return d


def _vocab_cases(flag):
    return [
        (f"{flag} binary", [f"--{flag}", "{d}/image.bin"], [f"--{flag}:", "image.bin", "not UTF-8", "[MASK]"]),
        (f"{flag} json", [f"--{flag}", "{d}/vocab.json"], [f"--{flag}:", "vocab.json", "JSON file", "one token a line"]),
        (f"{flag} broken tokenizer.json", [f"--{flag}", "{d}/tokenizer.json"], [f"--{flag}:", "tokenizer.json", "not a readable tokenizers file"]),
        (f"{flag} no specials", [f"--{flag}", "{d}/words.txt"], [f"--{flag}:", "words.txt", "lacks the special tokens [PAD]"]),
    ]


PRETRAIN = [
    ("batch_size 0", ["--data.batch_size", "0"], ["--data.batch_size: 0 ", "(must be >= 1)"]),
    ("generator_divisor 0", ["--recipe", "electra", "--electra.generator_divisor", "0"],
     ["--electra.generator_divisor: 0 ", "(must be >= 1)"]),
    ("generator_divisor too big", ["--recipe", "electra", "--model.size=tiny", "--electra.generator_divisor=256"],
     ["--electra.generator_divisor: 256 ", "<= hidden_size = 128"]),
    ("steps 0", ["--train.total_steps", "0"], ["--train.total_steps: 0 ", "(must be >= 1)"]),
    ("steps -5", ["--train.total_steps", "-5"], ["--train.total_steps: -5 ", "(must be >= 1)"]),
    ("rate 0", ["--masking.rate", "0"], ["--masking.rate: 0.0 ", "(must be in (0, 1])"]),
    ("rate 1.5", ["--masking.rate=1.5"], ["--masking.rate: 1.5 ", "(must be in (0, 1])"]),
    ("max_predictions 0", ["--masking.max_predictions", "0"], ["--masking.max_predictions: 0 ", "(must be >= 1)"]),
    ("max_predictions above max_seq_len", ["--data.max_seq_len=64", "--masking.max_predictions=80"],
     ["--masking.max_predictions: 80 ", "<= data.max_seq_len = 64"]),
    ("short_seq_prob 2", ["--data.short_seq_prob", "2"], ["--data.short_seq_prob: 2.0 ", "(must be in [0, 1])"]),
    ("betas", ["--train.betas=1.5,0.9"], ["--train.betas: 1.5 ", "(must be in [0, 1))"]),
    ("warmup above steps", ["--train.total_steps", "10", "--train.warmup_steps", "20"], ["--train.warmup_steps: 20 ", "<= total_steps = 10"]),
    ("num_workers -1", ["--data.num_workers", "-1"], ["--data.num_workers: -1 ", "(must be >= 0)"]),
    ("lr nan", ["--train.lr=nan"], ["--train.lr: nan ", "(must be finite and >= 0)"]),
    ("heads", ["--model.size=tiny", "--model.num_attention_heads=3"],
     ["--model.hidden_size: 128 ", "multiple of num_attention_heads = 3"]),
    ("positions", ["--model.size=tiny", "--model.max_position_embeddings=64"], ["--data.max_seq_len: 128 ", "64 positions"]),
    ("holdout_every 1", ["--data.holdout_every=1"], ["--data.holdout_every: 1 ", "0 or >= 2"]),
    ("output is a file", ["--output", "{d}/a_file"], ["--output:", "a_file is an existing file"]),
    ("saved config", ["--config", "{d}/config.json"], ["config.json: --data.batch_size: 0 ", "(must be >= 1)"]),
    *_vocab_cases("data.vocab"),
]
DISTILL = [
    ("batch_size 0", ["--data.batch_size=0"], ["--data.batch_size: 0 ", "(must be >= 1)"]),
    ("steps 0", ["--train.total_steps", "0"], ["--train.total_steps: 0 ", "(must be >= 1)"]),
    ("warmup above steps", ["--train.total_steps", "50"], ["--train.warmup_steps: 100 ", "<= total_steps = 50"]),
    ("top_k 0", ["--cache.top_k=0"], ["--cache.top_k: 0 ", "(must be >= 1)"]),
    ("temperature 0", ["--loss.temperature=0"], ["--loss.temperature: 0.0 ", "(must be > 0)"]),
    ("no loss", ["--loss.alpha_ce=0", "--loss.alpha_mlm=0", "--loss.alpha_cos=0"], ["--loss.alpha_ce: 0.0 ", "the loss would be 0"]),
    ("student dropout", ["--student.hidden_dropout_prob=1"], ["--student.hidden_dropout_prob: 1.0 ", "(must be in [0, 1))"]),
    ("cache-teacher is a file", ["--cache-teacher", "{d}/a_file"], ["--cache-teacher:", "a_file is an existing file"]),
]
FINETUNE = [
    ("epochs 0", ["--finetune.epochs=0"], ["--finetune.epochs: 0 ", "(must be >= 1)"]),
    ("layer_decay 0", ["--finetune.layer_decay=0"], ["--finetune.layer_decay: 0.0 ", "(must be in (0, 1])"]),
    ("warmup_ratio 1.5", ["--finetune.warmup_ratio=1.5"], ["--finetune.warmup_ratio: 1.5 ", "(must be in [0, 1])"]),
    ("lr -1", ["--train.lr=-1"], ["--train.lr: -1.0 ", "(must be >= 0)"]),
    ("output is a file", ["--output", "{d}/a_file"], ["--output:", "a_file is an existing file"]),
]
PREPARE = [
    ("workers 0", ["--workers", "0"], ["--workers: 0 ", "(must be >= 1)"]),
    ("workers -3", ["--workers", "-3"], ["--workers: -3 ", "(must be >= 1)"]),
    ("shard-size 0", ["--shard-size", "0"], ["--shard-size: 0.0 ", "(must be > 0)"]),
    ("chunk-size 0", ["--chunk-size", "0"], ["--chunk-size: 0 ", "(must be >= 1)"]),
    ("min-chars 0", ["--min-chars", "0"], ["--min-chars: 0 ", "(must be >= 1)"]),
    ("max-sentence-chars below min-chars", ["--min-chars", "8", "--max-sentence-chars", "4"],
     ["--max-sentence-chars: 4 ", ">= --min-chars = 8"]),
    ("build-vocab 5", ["--build-vocab", "5"], ["--build-vocab: 5 ", "(must be > 10)"]),
    ("output is a file", ["--output", "{d}/a_file"], ["--output:", "a_file is an existing file"]),
    *_vocab_cases("vocab"),
]


def _argv(command, args, d, out):
    args = [a.format(d=d) for a in args]
    if command == "prepare":
        vocab = [] if "--vocab" in args or "--build-vocab" in args else ["--vocab", f"{d}/vocab.txt"]
        return [f"{d}/corpus.txt", "--output", str(out), *vocab, *args]
    if command == "finetune":
        model = d / "no_model"
        return ["--task", "tnews", "--model", str(model), "--data.train", f"{d}/corpus.txt", "--data.dev", f"{d}/corpus.txt",
                "--output", str(out), *args]
    # pretrain and distill: raw text / shard paths that the run would start preparing into --output
    data = ["--data", f"{d}/corpus.txt", "--output", str(out)]
    if command == "distill":
        data += ["--teacher", str(d / "no_teacher")]
    return [*data, *args]


CASES = [(c, *case) for c, cases in (("pretrain", PRETRAIN), ("distill", DISTILL), ("finetune", FINETUNE), ("prepare", PREPARE))
         for case in cases]
MAINS = {"pretrain": pretrain.main, "distill": distill.main, "finetune": finetune.main, "prepare": prepare.main}


@pytest.mark.parametrize("command, name, args, words", CASES, ids=[f"{c}: {n}" for c, n, _, _ in CASES])
def test_config_validation_command_stops_with_one_line(command, name, args, words, files, tmp_path, capsys):
    out = tmp_path / "out"
    before = sorted(os.listdir(files))
    code = MAINS[command](_argv(command, args, files, out))
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err[-2000:])
    assert len(err.splitlines()) == 1 and "error: " in err, err[-2000:]
    assert all(w in err for w in words), (words, err)
    assert not out.exists(), sorted(os.listdir(out))
    assert sorted(os.listdir(files)) == before and (files / "a_file").read_text() == "not a directory\n"


@pytest.mark.parametrize("module, args, words", [
    ("pretrain", ["--data.batch_size", "0"], "--data.batch_size: 0 is not allowed (must be >= 1)"),
    ("prepare", ["--workers", "0"], "--workers: 0 is not allowed (must be >= 1)"),
])
def test_config_validation_python_m_exits_2(module, args, words, files, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", f"lub_fast.{module}", *_argv(module, args, files, out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip() == f"lub_fast.{module}: error: {words}", proc.stderr[-2000:]
    assert not out.exists()
