"""Against real TensorFlow (skipped without it): its checkpoints load in ours, ours in its."""

import os
import shutil

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

from lub_fast.tf1.bundle import BFLOAT16, BundleReader, write_bundle
from lub_fast.tf1.convert import load_tf1_checkpoint, save_tf1_checkpoint

tf = pytest.importorskip("tensorflow")

SMALL = dict(vocab_size=97, type_vocab_size=2, max_position_embeddings=24)


def _arrays(rng):
    return {
        "bert/embeddings/word_embeddings": rng.standard_normal((97, 16)).astype(np.float32),
        "big": rng.standard_normal((1100, 1000)).astype(np.float32),
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "f64": rng.standard_normal(4),
        "i32": rng.integers(-9, 9, (6,), dtype=np.int32),
        "global_step": np.array(123456789012, dtype=np.int64),
        "flags": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float32(-1.5),
        "strings": np.array([b"abc", b"", b"x" * 200], dtype=object),
    }


def _tf_constant(array):
    return tf.constant(list(array) if array.dtype == object else array)


def _tf_save(prefix, arrays):
    names = sorted(arrays)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[_tf_constant(arrays[n]) for n in names])


def _same(ours, theirs):
    theirs = np.asarray(theirs)
    if ours.dtype == object:
        return list(ours.reshape(-1)) == list(theirs.reshape(-1)) and ours.shape == theirs.shape
    return ours.shape == theirs.shape and ours.tobytes() == theirs.astype(ours.dtype).tobytes()


def test_tf_interop_bundle_bytes_identical(tmp_path):
    arrays = _arrays(np.random.default_rng(0))
    _tf_save(tmp_path / "tf" / "model.ckpt", arrays)
    write_bundle(tmp_path / "ours" / "model.ckpt", arrays)
    for suffix in (".index", ".data-00000-of-00001"):
        theirs = (tmp_path / "tf" / f"model.ckpt{suffix}").read_bytes()
        ours = (tmp_path / "ours" / f"model.ckpt{suffix}").read_bytes()
        assert theirs == ours, f"{suffix}: {len(theirs)} vs {len(ours)} bytes"
    reader = BundleReader(tmp_path / "tf" / "model.ckpt")
    tf_reader = tf.train.load_checkpoint(str(tmp_path / "ours" / "model.ckpt"))
    assert sorted(tf_reader.get_variable_to_shape_map()) == sorted(arrays)
    for name, array in arrays.items():
        assert _same(np.asarray(array), reader.read(name)), name
        assert _same(np.asarray(array), tf_reader.get_tensor(name)), name


def test_tf_interop_bfloat16_and_shards(tmp_path):
    rng = np.random.default_rng(1)
    parts = [{"a/bf16": rng.standard_normal((4, 3)).astype(np.float32)},
             {"b/kernel": rng.standard_normal((5, 2)).astype(np.float32),
              "c/bias": rng.standard_normal(2).astype(np.float32)}]
    prefixes = []
    for i, part in enumerate(parts):
        prefixes.append(str(tmp_path / f"part{i}"))
        names = sorted(part)
        tensors = [tf.constant(part[n], dtype=tf.bfloat16 if "bf16" in n else tf.float32)
                   for n in names]
        tf.raw_ops.SaveV2(prefix=prefixes[-1], tensor_names=names,
                          shape_and_slices=[""] * len(names), tensors=tensors)
    merged = str(tmp_path / "merged" / "model.ckpt")
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=prefixes, destination_prefix=merged)
    reader = BundleReader(merged)
    assert reader.num_shards == 2 and reader.entries["a/bf16"].dtype == "bfloat16"
    bf16 = tf.constant(parts[0]["a/bf16"], dtype=tf.bfloat16).numpy().view(np.uint16)
    assert np.array_equal(reader.read("a/bf16").view(np.uint16), bf16)
    assert np.array_equal(reader.read("b/kernel"), parts[1]["b/kernel"])

    ours = {**parts[1], "a/bf16": bf16.view(BFLOAT16)}
    write_bundle(tmp_path / "ours" / "model.ckpt", ours, num_shards=3)
    tf_reader = tf.train.load_checkpoint(str(tmp_path / "ours" / "model.ckpt"))
    assert np.array_equal(np.asarray(tf_reader.get_tensor("a/bf16")).view(np.uint16), bf16)
    assert np.array_equal(tf_reader.get_tensor("c/bias"), parts[1]["c/bias"])


def _seeded(model_cls, config, seed):
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _models(family):
    if family == "bert":
        config = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=36, hidden_act="gelu_new", **SMALL)
        return config, _seeded(BertForPreTraining, config, 0), None
    if family == "albert":
        config = AlbertConfig(embedding_size=8, hidden_size=16, num_hidden_layers=3,
                              num_attention_heads=2, intermediate_size=36, **SMALL)
        return config, _seeded(AlbertForPreTraining, config, 0), None
    config = ElectraConfig(embedding_size=8, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, **SMALL)
    gen_config = ElectraConfig(embedding_size=8, hidden_size=12, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=24, **SMALL)
    disc = _seeded(ElectraForPreTraining, config, 0)
    gen = _seeded(ElectraForMaskedLM, gen_config, 1)
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    return config, disc, (gen_config, gen)


def _outputs(model, field):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        return getattr(model(input_ids=ids, attention_mask=mask), field)


@pytest.mark.parametrize("family", ["bert", "albert", "electra"])
def test_tf_interop_google_layouts(tmp_path, family):
    config, model, generator = _models(family)
    gen_arg = None if generator is None else (generator[0].to_dict(), generator[1].state_dict())
    written = save_tf1_checkpoint(tmp_path / "ours", config.to_dict(), model.state_dict(), family,
                                  generator=gen_arg)
    ours = BundleReader(tmp_path / "ours" / "model.ckpt")

    # Ours in TensorFlow: same variables, identical arrays.
    tf_reader = tf.train.load_checkpoint(str(tmp_path / "ours"))
    assert sorted(tf_reader.get_variable_to_shape_map()) == sorted(ours.entries)
    for name in ours.entries:
        assert _same(ours.read(name), tf_reader.get_tensor(name)), name

    # TensorFlow's Saver, with Google's names and a training run's optimizer state, in ours.
    variables = {}
    for name in ours.entries:
        variables[name] = tf.Variable(tf_reader.get_tensor(name))
        if "LayerNorm" not in name:
            variables[f"{name}/adam_m"] = tf.Variable(tf.zeros_like(variables[name]))
            variables[f"{name}/adam_v"] = tf.Variable(tf.ones_like(variables[name]))
    variables["global_step"] = tf.Variable(np.int64(10000))
    saver = tf.compat.v1.train.Saver(var_list=variables)
    saver.save(None, str(tmp_path / "tf" / "model.ckpt"), write_meta_graph=False)
    for path in written:
        if path.endswith(".json"):
            shutil.copy(path, tmp_path / "tf")
    assert tf.train.latest_checkpoint(str(tmp_path / "tf")) == str(tmp_path / "tf" / "model.ckpt")

    hf_config, state_dict, info = load_tf1_checkpoint(tmp_path / "tf")
    assert "global_step" in info.training_state and info.family == family
    fresh = type(model)(type(config)(**hf_config)).eval()
    fresh.load_state_dict(state_dict, strict=True)
    field = "logits" if family == "electra" else "prediction_logits"
    assert torch.equal(_outputs(model, field), _outputs(fresh, field))
    if generator is not None:
        hf_config, state_dict, _ = load_tf1_checkpoint(tmp_path / "tf", generator=True)
        fresh = ElectraForMaskedLM(ElectraConfig(**hf_config)).eval()
        fresh.load_state_dict(state_dict, strict=True)
        assert torch.equal(_outputs(generator[1], "logits"), _outputs(fresh, "logits"))
    assert os.path.exists(tmp_path / "tf" / "checkpoint")
