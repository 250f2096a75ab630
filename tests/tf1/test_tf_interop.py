"""Against real TensorFlow: what TensorFlow writes (``tf.raw_ops.SaveV2``/``MergeV2Checkpoints``,
``tf.compat.v1.train.Saver`` as Google's BERT/ALBERT/ELECTRA code saves, ``tf.train.Checkpoint``)
loads in lub_fast with transformers' outputs, and TensorFlow reads what lub_fast writes.

TensorFlow runs in its own Python, ``LUB_FAST_TF_PYTHON`` (``.ci/run`` makes ``.venv-tf`` with
``pip install tensorflow-cpu numpy`` and sets it), through ``tf_side.py``; without the variable these
tests skip, with it they fail when TensorFlow does not run.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForPreTraining,
    BertConfig,
    BertForPreTraining,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForPreTraining,
)

import lub_fast
from lub_fast.convert import main as convert_main
from lub_fast.models.load import from_pretrained_electra_pair
from lub_fast.tf1.bundle import BFLOAT16, BundleReader, TF1CheckpointError, write_bundle
from lub_fast.tf1.load import load_tf1_checkpoint
from lub_fast.tf1.save import save_tf1_checkpoint

TF_PYTHON = os.environ.get("LUB_FAST_TF_PYTHON")
TF_SIDE = Path(__file__).with_name("tf_side.py")
pytestmark = pytest.mark.skipif(
    not TF_PYTHON, reason="LUB_FAST_TF_PYTHON (a Python with tensorflow-cpu, .ci/run's .venv-tf) not set")

V = 97
SMALL = dict(vocab_size=V, type_vocab_size=2, max_position_embeddings=24)


def _tf(tmp_path, jobs):
    """Run ``jobs`` (see ``tf_side.py``) in one TensorFlow process; their results."""
    n = len(list(tmp_path.glob("tf_jobs_*.json")))
    jobs_file, results_file = tmp_path / f"tf_jobs_{n}.json", tmp_path / f"tf_results_{n}.json"
    jobs_file.write_text(json.dumps(jobs))
    proc = subprocess.run([TF_PYTHON, str(TF_SIDE), str(jobs_file), str(results_file)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})  # fmt: skip
    assert proc.returncode == 0, f"{TF_PYTHON} {TF_SIDE.name} exited {proc.returncode}: {proc.stderr[-3000:]}"
    return json.loads(results_file.read_text())


def _pack(path, arrays):
    """Job fields carrying ``arrays`` (ours: bfloat16 as ``BFLOAT16``, strings as object arrays)."""
    numeric, strings, bfloat16 = {}, {}, []
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype == object:
            strings[name] = [x.hex() for x in array.reshape(-1)]
        elif array.dtype == BFLOAT16:
            numeric[name] = array.view(np.uint16)
            bfloat16.append(name)
        else:
            numeric[name] = array
    np.savez(path, **numeric)
    return {"arrays": str(path), "strings": strings, "bfloat16": bfloat16}


def _unpack(result, path):
    """What a ``read`` job read, in our representation."""
    arrays = dict(np.load(path))
    for name, dtype in result["dtypes"].items():
        if dtype == "bfloat16":
            arrays[name] = arrays[name].view(BFLOAT16)
    for name, items in result["strings"].items():
        arrays[name] = np.array([bytes.fromhex(x) for x in items], dtype=object)
    return arrays


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == object:
        return a.shape == b.shape and list(a.reshape(-1)) == list(b.reshape(-1))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _bfloat16(rng, shape):
    """Random bfloat16 values: the upper halves of float32 ones."""
    return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(BFLOAT16)


def test_tf_interop_bundle_bytes_identical(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "bert/embeddings/word_embeddings": rng.standard_normal((97, 16)).astype(np.float32),
        "big": rng.standard_normal((1100, 1000)).astype(np.float32),
        "bf16": _bfloat16(rng, (3, 4)),
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "f64": rng.standard_normal(4),
        "i32": rng.integers(-9, 9, (6,), dtype=np.int32),
        "global_step": np.array(123456789012, dtype=np.int64),
        "flags": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(-1.5, np.float32),
        "strings": np.array([b"abc", b"", b"x" * 200], dtype=object),
    }
    write_bundle(tmp_path / "ours" / "model.ckpt", arrays)
    _, read = _tf(tmp_path, [
        {"op": "save_v2", "prefix": str(tmp_path / "tf" / "model.ckpt"), **_pack(tmp_path / "in.npz", arrays)},
        {"op": "read", "path": str(tmp_path / "ours" / "model.ckpt"), "out": str(tmp_path / "read.npz")},
    ])  # fmt: skip
    for suffix in (".index", ".data-00000-of-00001"):
        theirs = (tmp_path / "tf" / f"model.ckpt{suffix}").read_bytes()
        ours = (tmp_path / "ours" / f"model.ckpt{suffix}").read_bytes()
        assert theirs == ours, f"{suffix}: TensorFlow wrote {len(theirs)} bytes, lub_fast {len(ours)}"
    reader = BundleReader(tmp_path / "tf" / "model.ckpt")
    tf_read = _unpack(read, tmp_path / "read.npz")
    assert sorted(reader.entries) == sorted(tf_read) == sorted(arrays)
    for name, array in arrays.items():
        assert _same(array, reader.read(name)), f"lub_fast reading TensorFlow's {name}"
        assert _same(array, tf_read[name]), f"TensorFlow reading lub_fast's {name}"


def test_tf_interop_bfloat16_and_shards(tmp_path):
    rng = np.random.default_rng(1)
    parts = [{"a/bf16": _bfloat16(rng, (4, 3))},
             {"b/kernel": rng.standard_normal((5, 2)).astype(np.float32),
              "c/bias": rng.standard_normal(2).astype(np.float32)}]  # fmt: skip
    ours = {name: a for part in parts for name, a in part.items()}
    write_bundle(tmp_path / "ours" / "model.ckpt", ours, num_shards=3)
    prefixes = [str(tmp_path / f"part{i}") for i in range(2)]
    merged = str(tmp_path / "merged" / "model.ckpt")
    jobs = [{"op": "save_v2", "prefix": p, **_pack(tmp_path / f"part{i}.npz", part)}
            for i, (p, part) in enumerate(zip(prefixes, parts))]
    jobs += [{"op": "merge", "prefixes": prefixes, "destination": merged},
             {"op": "read", "path": str(tmp_path / "ours" / "model.ckpt"), "out": str(tmp_path / "read.npz")}]
    read = _tf(tmp_path, jobs)[-1]

    reader = BundleReader(merged)
    assert reader.num_shards == 2 and reader.entries["a/bf16"].dtype == "bfloat16", reader.num_shards
    tf_read = _unpack(read, tmp_path / "read.npz")
    assert read["dtypes"]["a/bf16"] == "bfloat16", read["dtypes"]
    for name, array in ours.items():
        assert _same(array, reader.read(name)), f"lub_fast reading TensorFlow's {name}"
        assert _same(array, tf_read[name]), f"TensorFlow reading lub_fast's {name}"


def _seeded(model_cls, config, seed):
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _models(family, seed=0):
    """(config, HF model, None or the ELECTRA generator's (config, model))."""
    if family == "bert":
        config = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=36, hidden_act="gelu_new", **SMALL)
        return config, _seeded(BertForPreTraining, config, seed), None
    if family == "albert":
        config = AlbertConfig(embedding_size=8, hidden_size=16, num_hidden_layers=3,
                              num_attention_heads=2, intermediate_size=36, **SMALL)
        return config, _seeded(AlbertForPreTraining, config, seed), None
    config = ElectraConfig(embedding_size=8, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, **SMALL)
    gen_config = ElectraConfig(embedding_size=8, hidden_size=12, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=24, **SMALL)
    disc = _seeded(ElectraForPreTraining, config, seed)
    gen = _seeded(ElectraForMaskedLM, gen_config, seed + 1)
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    return config, disc, (gen_config, gen)


def _inputs():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return ids, mask, types * mask


# transformers' output names of each model; lub_fast's must be the same.
_FIELDS = {BertForPreTraining: ("prediction_logits", "seq_relationship_logits"),
           AlbertForPreTraining: ("prediction_logits", "sop_logits"),
           ElectraForPreTraining: ("logits",), ElectraForMaskedLM: ("logits",)}  # fmt: skip


def _assert_outputs_match(hf, ours, what):
    """transformers' and lub_fast's outputs, by transformers' names, within 1e-5 at real tokens."""
    ids, mask, types = _inputs()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        mine = ours.eval()(ids, mask, types)
    for field in _FIELDS[type(hf)]:
        a, b = getattr(theirs, field), getattr(mine, field)
        assert b is not None, f"{what}: lub_fast returns no {field}"
        if a.dim() >= 2 and a.shape[:2] == mask.shape:
            a, b = a[mask.bool()], b[mask.bool()]
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5, f"{what}: {field} differs by {diff}"


def _google_arrays(tmp_path, family, seed=0):
    """The HF models of ``family`` and their Google-named arrays, via lub_fast's writer (whose
    files TensorFlow must read); the configs it wrote."""
    config, model, generator = _models(family, seed)
    gen_arg = None if generator is None else (generator[0].to_dict(), generator[1].state_dict())
    directory = tmp_path / f"ours{seed}"
    written = save_tf1_checkpoint(directory, config.to_dict(), model.state_dict(), family, generator=gen_arg)
    reader = BundleReader(directory / "model.ckpt")
    arrays = {name: reader.read(name) for name in reader.entries}
    return (config, model, generator), directory, arrays, [p for p in written if p.endswith(".json")]


@pytest.mark.parametrize("family", ["bert", "albert", "electra"])
def test_tf_interop_google_layouts(tmp_path, family):
    (config, model, generator), ours, arrays, configs = _google_arrays(tmp_path, family)
    tf_dir = tmp_path / "tf"
    read, saved = _tf(tmp_path, [
        {"op": "read", "path": str(ours), "out": str(tmp_path / "read.npz")},
        {"op": "saver", "prefix": str(tf_dir / "model.ckpt"), "slots": True, "global_step": 1000,
         **_pack(tmp_path / "arrays.npz", arrays)},
    ])  # fmt: skip

    # lub_fast's checkpoint in TensorFlow: found by latest_checkpoint, same variables and arrays.
    assert read["latest"] == str(ours / "model.ckpt"), read["latest"]
    tf_read = _unpack(read, tmp_path / "read.npz")
    assert sorted(tf_read) == sorted(arrays)
    for name, array in arrays.items():
        assert _same(array, tf_read[name]), f"TensorFlow reading lub_fast's {name}"

    # TensorFlow's Saver with Google's names and a training run's optimizer state, in lub_fast.
    assert saved["path"] == str(tf_dir / "model.ckpt-1000"), saved
    assert f'model_checkpoint_path: "{tf_dir / "model.ckpt-1000"}"' in saved["checkpoint_file"], saved
    for path in configs:
        shutil.copy(path, tf_dir)
    hf_config, state_dict, info = load_tf1_checkpoint(tf_dir)
    assert info.prefix == str(tf_dir / "model.ckpt-1000") and info.family == family, info
    slots = {f"{n}/adam_{s}" for n in arrays if "LayerNorm" not in n for s in "mv"} | {"global_step"}
    assert set(info.training_state) == slots, sorted(set(info.training_state) ^ slots)
    fresh = type(model)(type(config)(**hf_config)).eval()
    fresh.load_state_dict(state_dict, strict=True)
    ids, mask, types = _inputs()
    with torch.no_grad():
        for field in _FIELDS[type(model)]:
            want, got = (getattr(m(input_ids=ids, attention_mask=mask, token_type_ids=types), field)
                         for m in (model, fresh))
            assert torch.equal(want, got), f"{field}: max diff {(want - got).abs().max().item()}"

    if generator is None:
        _assert_outputs_match(model, lub_fast.from_pretrained(tf_dir), f"lub_fast {family}")
        return
    pair = from_pretrained_electra_pair(tf_dir)
    assert pair.generator.config.hidden_size == 12 and pair.generator.config.num_hidden_layers == 1
    _assert_outputs_match(model, pair.discriminator, "lub_fast discriminator")
    _assert_outputs_match(generator[1], pair.generator, "lub_fast generator")
    assert convert_main([str(tf_dir), str(tmp_path / "hf")]) == 0
    for sub, original in (("discriminator", model), ("generator", generator[1])):
        exported = type(original).from_pretrained(tmp_path / "hf" / sub).eval()
        _assert_outputs_match(exported, getattr(pair, sub), f"HF export of the {sub}")


def test_tf_interop_copied_run_reads_its_own_checkpoint(tmp_path):
    """Two Saver runs; the copy's ``checkpoint`` file names the other run's absolute prefix (what a
    copied run directory holds): the copy's own weights load."""
    runs = {}
    for seed in (0, 1):
        (_, model, _), _, arrays, configs = _google_arrays(tmp_path, "bert", seed)
        runs[seed] = (tmp_path / f"run{seed}", model, arrays, configs)
    results = _tf(tmp_path, [
        {"op": "saver", "prefix": str(directory / "model.ckpt"), "global_step": 1000,
         **_pack(tmp_path / f"arrays{seed}.npz", arrays)}
        for seed, (directory, _, arrays, _) in runs.items()
    ])  # fmt: skip
    (original, _, _, configs), (copy, copy_model, _, _) = runs[0], runs[1]
    assert f'"{original / "model.ckpt-1000"}"' in results[0]["checkpoint_file"], results[0]
    for directory in (original, copy):
        shutil.copy(configs[0], directory)
    shutil.copy(original / "checkpoint", copy / "checkpoint")
    _, _, info = load_tf1_checkpoint(copy)
    assert info.prefix == str(copy / "model.ckpt-1000"), info.prefix
    _assert_outputs_match(copy_model, lub_fast.from_pretrained(copy), "the copy")


def test_tf_interop_object_based_checkpoint_named_error(tmp_path):
    kernel = np.random.default_rng(3).standard_normal((4, 2)).astype(np.float32)
    (result,) = _tf(tmp_path, [{"op": "object", "prefix": str(tmp_path / "tf2" / "ckpt"),
                                **_pack(tmp_path / "arrays.npz", {"kernel": kernel})}])  # fmt: skip
    reader = BundleReader(result["path"])
    assert _same(kernel, reader.read("kernel/.ATTRIBUTES/VARIABLE_VALUE")), sorted(reader.entries)
    with pytest.raises(TF1CheckpointError, match=r"tf2/ckpt: an object-based TF2 checkpoint .*"
                       r"'kernel/\.ATTRIBUTES/VARIABLE_VALUE'.*tf\.compat\.v1\.train\.Saver"):
        load_tf1_checkpoint(result["path"])
