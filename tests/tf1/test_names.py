"""Google TF1 names <-> HF names: tiny random HF models through save_tf1 -> load_tf1."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForPreTraining,
    AutoConfig,
    BertConfig,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForPreTraining,
)

from lub_fast.tf1.bundle import BundleReader, TF1CheckpointError, write_bundle
from lub_fast.tf1.load import load_tf1_checkpoint, resolve_prefix
from lub_fast.tf1.names import name_map
from lub_fast.tf1.save import save_tf1_checkpoint

V, T, P = 97, 2, 24
SMALL = dict(vocab_size=V, type_vocab_size=T, max_position_embeddings=P)


def _seeded(model_cls, config, seed=0):
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # HF zero-initialises biases: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _tiny_bert(**overrides):
    config = BertConfig(**{**dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=36, **SMALL), **overrides})
    return config, _seeded(BertForPreTraining, config)


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def _reload(model_cls, hf_config, state_dict):
    """A fresh HF model from the loaded config, loaded strictly; names listed on mismatch."""
    fresh = model_cls(AutoConfig.for_model(**hf_config)).eval()
    expected = set(fresh.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    fresh.load_state_dict(state_dict, strict=True)
    return fresh


def _assert_same_outputs(a, b, fields):
    with torch.no_grad():
        out_a, out_b = a(**_inputs()), b(**_inputs())
    for field in fields:
        x, y = getattr(out_a, field), getattr(out_b, field)
        assert torch.equal(x, y), f"{field}: max diff {(x - y).abs().max().item()}"


def _bert_layer_names(prefix):
    names = [f"{prefix}/attention/self/{p}/{k}" for p in ("query", "key", "value")
             for k in ("kernel", "bias")]
    names += [f"{prefix}/{p}/{k}" for p in ("attention/output/dense", "intermediate/dense",
                                              "output/dense") for k in ("kernel", "bias")]
    names += [f"{prefix}/{p}/{k}" for p in ("attention/output/LayerNorm", "output/LayerNorm")
              for k in ("gamma", "beta")]
    return names


def _embedding_names(scope):
    return [f"{scope}/embeddings/{n}" for n in ("word_embeddings", "token_type_embeddings",
                                                 "position_embeddings", "LayerNorm/gamma",
                                                 "LayerNorm/beta")]


@pytest.mark.parametrize("family,generator", [("bert", False), ("albert", False),
                                              ("electra", False), ("electra", True)])
def test_names_rules_transpose_exactly_kernels(family, generator):
    # Google's code stores every dense kernel as [in, out] under ".../kernel" and nothing else
    # needs a transpose (output_weights is created [out, in]).
    rules = name_map(family, generator=generator).rules
    wrong = [r for r in rules if r.transpose != r.tf.endswith("/kernel")]
    assert not wrong, wrong
    assert len({r.tf for r in rules}) == len({r.hf for r in rules}) == len(rules)


def test_names_bert_roundtrip_identical(tmp_path):
    config = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=36, **SMALL)
    model = _seeded(BertForPreTraining, config)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    written = save_tf1_checkpoint(tmp_path / "tf", config.to_dict(), model.state_dict(), "bert",
                                  vocab_file=tmp_path / "vocab.txt")
    assert sorted(os.path.basename(p) for p in written) == sorted(
        ["model.ckpt.index", "model.ckpt.data-00000-of-00001", "bert_config.json", "checkpoint",
         "vocab.txt"])
    reader = BundleReader(tmp_path / "tf" / "model.ckpt")
    expected = _embedding_names("bert") + [
        n for i in range(2) for n in _bert_layer_names(f"bert/encoder/layer_{i}")] + [
        "bert/pooler/dense/kernel", "bert/pooler/dense/bias",
        "cls/predictions/transform/dense/kernel", "cls/predictions/transform/dense/bias",
        "cls/predictions/transform/LayerNorm/gamma", "cls/predictions/transform/LayerNorm/beta",
        "cls/predictions/output_bias", "cls/seq_relationship/output_weights",
        "cls/seq_relationship/output_bias"]
    assert sorted(reader.entries) == sorted(expected)
    # TF kernels are [in, out]; output_weights is [2, hidden] as in run_pretraining.py.
    assert reader.entries["bert/encoder/layer_1/intermediate/dense/kernel"].shape == (16, 36)
    assert reader.entries["cls/seq_relationship/output_weights"].shape == (2, 16)
    assert np.array_equal(reader.read("bert/encoder/layer_0/output/dense/kernel"),
                          model.bert.encoder.layer[0].output.dense.weight.detach().numpy().T)
    tf_config = json.loads((tmp_path / "tf" / "bert_config.json").read_text())
    assert tf_config["hidden_act"] == "gelu" and tf_config["vocab_size"] == V

    hf_config, state_dict, info = load_tf1_checkpoint(tmp_path / "tf")
    assert info.family == "bert" and info.vocab_file.endswith("vocab.txt")
    assert hf_config["architectures"] == ["BertForPreTraining"]
    assert state_dict["cls.predictions.decoder.weight"] is \
        state_dict["bert.embeddings.word_embeddings.weight"]
    fresh = _reload(BertForPreTraining, hf_config, state_dict)
    _assert_same_outputs(model, fresh, ["prediction_logits", "seq_relationship_logits"])


@pytest.mark.parametrize("groups,inner", [(1, 1), (2, 2)])
def test_names_albert_roundtrip_identical(tmp_path, groups, inner):
    config = AlbertConfig(embedding_size=8, hidden_size=16, num_hidden_layers=4,
                          num_hidden_groups=groups, inner_group_num=inner, num_attention_heads=2,
                          intermediate_size=36, **SMALL)
    model = _seeded(AlbertForPreTraining, config)
    save_tf1_checkpoint(tmp_path, config.to_dict(), model.state_dict(), "albert")
    reader = BundleReader(tmp_path / "model.ckpt")
    layer = []
    for g in range(groups):
        for i in range(inner):
            p = f"bert/encoder/transformer/group_{g}/inner_group_{i}"
            layer += [f"{p}/attention_1/self/{q}/{k}" for q in ("query", "key", "value")
                      for k in ("kernel", "bias")]
            layer += [f"{p}/{d}/{k}" for d in ("attention_1/output/dense",
                                                "ffn_1/intermediate/dense",
                                                "ffn_1/intermediate/output/dense")
                      for k in ("kernel", "bias")]
            layer += [f"{p}/{n}/{k}" for n in ("LayerNorm", "LayerNorm_1")
                      for k in ("gamma", "beta")]
    expected = _embedding_names("bert") + layer + [
        "bert/encoder/embedding_hidden_mapping_in/kernel",
        "bert/encoder/embedding_hidden_mapping_in/bias", "bert/pooler/dense/kernel",
        "bert/pooler/dense/bias", "cls/predictions/transform/dense/kernel",
        "cls/predictions/transform/dense/bias", "cls/predictions/transform/LayerNorm/gamma",
        "cls/predictions/transform/LayerNorm/beta", "cls/predictions/output_bias",
        "cls/seq_relationship/output_weights", "cls/seq_relationship/output_bias"]
    assert sorted(reader.entries) == sorted(expected)
    assert reader.entries["bert/encoder/embedding_hidden_mapping_in/kernel"].shape == (8, 16)
    assert reader.entries["cls/predictions/transform/dense/kernel"].shape == (16, 8)
    tf_config = json.loads((tmp_path / "albert_config.json").read_text())
    assert (tf_config["embedding_size"], tf_config["num_hidden_groups"],
            tf_config["inner_group_num"]) == (8, groups, inner)

    hf_config, state_dict, info = load_tf1_checkpoint(tmp_path)
    assert info.family == "albert" and hf_config["architectures"] == ["AlbertForPreTraining"]
    fresh = _reload(AlbertForPreTraining, hf_config, state_dict)
    _assert_same_outputs(model, fresh, ["prediction_logits", "sop_logits"])


def _electra_pair(seed, gen_hidden=12, untied=False):
    disc_config = ElectraConfig(embedding_size=8, hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=32, **SMALL)
    gen_config = ElectraConfig(embedding_size=gen_hidden if untied else 8, hidden_size=gen_hidden,
                               num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=2 * gen_hidden, **SMALL)
    disc = _seeded(ElectraForPreTraining, disc_config, seed)
    gen = _seeded(ElectraForMaskedLM, gen_config, seed + 1)
    if not untied:  # google-research/electra shares the embeddings
        with torch.no_grad():
            for name, p in gen.electra.embeddings.named_parameters():
                p.copy_(dict(disc.electra.embeddings.named_parameters())[name])
    return disc_config, disc, gen_config, gen


def test_names_electra_roundtrip_identical(tmp_path):
    disc_config, disc, gen_config, gen = _electra_pair(0)
    written = save_tf1_checkpoint(tmp_path, disc_config.to_dict(), disc.state_dict(), "electra",
                                  generator=(gen_config.to_dict(), gen.state_dict()))
    assert {"discriminator_config.json", "generator_config.json"} <= {
        os.path.basename(p) for p in written}
    reader = BundleReader(tmp_path / "model.ckpt")
    expected = _embedding_names("electra") + [
        n for i in range(2) for n in _bert_layer_names(f"electra/encoder/layer_{i}")] + [
        "electra/embeddings_project/kernel", "electra/embeddings_project/bias",
        "discriminator_predictions/dense/kernel", "discriminator_predictions/dense/bias",
        "discriminator_predictions/dense_1/kernel", "discriminator_predictions/dense_1/bias",
        "generator/embeddings_project/kernel", "generator/embeddings_project/bias",
        *_bert_layer_names("generator/encoder/layer_0"),
        "generator_predictions/dense/kernel", "generator_predictions/dense/bias",
        "generator_predictions/LayerNorm/gamma", "generator_predictions/LayerNorm/beta",
        "generator_predictions/output_bias"]
    assert sorted(reader.entries) == sorted(expected)
    assert reader.entries["discriminator_predictions/dense_1/kernel"].shape == (16, 1)
    assert reader.entries["generator_predictions/dense/kernel"].shape == (12, 8)

    hf_config, state_dict, info = load_tf1_checkpoint(tmp_path)
    assert hf_config["architectures"] == ["ElectraForPreTraining"]
    assert len(info.other_network) == 16 + 5 + 2  # generator layer, head, projection
    fresh = _reload(ElectraForPreTraining, hf_config, state_dict)
    _assert_same_outputs(disc, fresh, ["logits"])

    hf_config, state_dict, info = load_tf1_checkpoint(tmp_path, generator=True)
    assert hf_config["architectures"] == ["ElectraForMaskedLM"]
    assert hf_config["hidden_size"] == 12 and hf_config["embedding_size"] == 8
    fresh = _reload(ElectraForMaskedLM, hf_config, state_dict)
    _assert_same_outputs(gen, fresh, ["logits"])


def test_names_electra_untied_generator_embeddings(tmp_path):
    disc_config, disc, gen_config, gen = _electra_pair(3, gen_hidden=12, untied=True)
    save_tf1_checkpoint(tmp_path, disc_config.to_dict(), disc.state_dict(), "electra",
                        generator=(gen_config.to_dict(), gen.state_dict()))
    entries = BundleReader(tmp_path / "model.ckpt").entries
    assert entries["generator/embeddings/word_embeddings"].shape == (V, 12)
    assert "generator/embeddings_project/kernel" not in entries
    hf_config, state_dict, _ = load_tf1_checkpoint(tmp_path, generator=True)
    _assert_same_outputs(gen, _reload(ElectraForMaskedLM, hf_config, state_dict), ["logits"])
    hf_config, state_dict, _ = load_tf1_checkpoint(tmp_path)
    _assert_same_outputs(disc, _reload(ElectraForPreTraining, hf_config, state_dict), ["logits"])


def test_names_electra_without_config_uses_electra_head_rule(tmp_path):
    # Google's ELECTRA releases ship no config: heads = hidden_size // 64 (configure_pretraining).
    disc_config = ElectraConfig(embedding_size=32, hidden_size=128, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64, **SMALL)
    gen_config = ElectraConfig(embedding_size=32, hidden_size=64, num_hidden_layers=1,
                               num_attention_heads=1, intermediate_size=48, **SMALL)
    disc = _seeded(ElectraForPreTraining, disc_config)
    gen = _seeded(ElectraForMaskedLM, gen_config, 1)
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    save_tf1_checkpoint(tmp_path, disc_config.to_dict(), disc.state_dict(), "electra",
                        generator=(gen_config.to_dict(), gen.state_dict()))
    for name in ("discriminator_config.json", "generator_config.json"):
        os.remove(tmp_path / name)
    hf_config, state_dict, info = load_tf1_checkpoint(tmp_path)
    assert info.config_file is None and "hidden_size // 64" in info.notes[0]
    assert (hf_config["num_attention_heads"], hf_config["intermediate_size"]) == (2, 64)
    _assert_same_outputs(disc, _reload(ElectraForPreTraining, hf_config, state_dict), ["logits"])
    hf_config, state_dict, _ = load_tf1_checkpoint(tmp_path, generator=True)
    assert (hf_config["num_attention_heads"], hf_config["hidden_size"]) == (1, 64)
    _assert_same_outputs(gen, _reload(ElectraForMaskedLM, hf_config, state_dict), ["logits"])


@pytest.mark.parametrize("act,tf_act,extra", [("gelu", "gelu", None), ("gelu_new", "gelu", "gelu_new"),
                                              ("relu", "relu", None)])
def test_names_gelu_variant_roundtrip(tmp_path, act, tf_act, extra):
    config, model = _tiny_bert(hidden_act=act)
    save_tf1_checkpoint(tmp_path, config.to_dict(), model.state_dict(), "bert")
    tf_config = json.loads((tmp_path / "bert_config.json").read_text())
    # "gelu" reads as exact GELU (as transformers' converters read it); a tanh GELU is recorded.
    assert tf_config["hidden_act"] == tf_act and tf_config.get("lub_fast_hidden_act") == extra
    hf_config, state_dict, _ = load_tf1_checkpoint(tmp_path)
    assert hf_config["hidden_act"] == act
    _assert_same_outputs(model, _reload(BertForPreTraining, hf_config, state_dict),
                         ["prediction_logits"])


def test_names_google_bert_config_gelu_is_exact_as_in_transformers(tmp_path):
    config, model = _tiny_bert(hidden_act="gelu_new")
    save_tf1_checkpoint(tmp_path, config.to_dict(), model.state_dict(), "bert")
    tf_config = json.loads((tmp_path / "bert_config.json").read_text())
    del tf_config["lub_fast_hidden_act"]  # as in Google's released bert_config.json
    (tmp_path / "bert_config.json").write_text(json.dumps(tf_config))
    assert load_tf1_checkpoint(tmp_path)[0]["hidden_act"] == "gelu"


def test_names_optimizer_slots_ignored(tmp_path):
    config, model = _tiny_bert()
    save_tf1_checkpoint(tmp_path / "clean", config.to_dict(), model.state_dict(), "bert")
    reader = BundleReader(tmp_path / "clean" / "model.ckpt")
    tensors = {name: reader.read(name) for name in reader.entries}
    slots = {f"{name}/{slot}": np.zeros_like(array) for name, array in tensors.items()
             for slot in ("adam_m", "adam_v")}
    slots.update({"global_step": np.array(1000, np.int64),
                  "bert/pooler/dense/kernel/lamb_m": np.zeros((16, 16), np.float32),
                  "bert/pooler/dense/kernel/Adam_1": np.zeros((16, 16), np.float32),
                  "beta1_power": np.float32(0.9)})
    write_bundle(tmp_path / "slots" / "model.ckpt", {**tensors, **slots})
    os.link(tmp_path / "clean" / "bert_config.json", tmp_path / "slots" / "bert_config.json")
    hf_config, state_dict, info = load_tf1_checkpoint(tmp_path / "slots")
    assert sorted(info.training_state) == sorted(slots)
    _, clean, _ = load_tf1_checkpoint(tmp_path / "clean")
    assert state_dict.keys() == clean.keys()
    assert all(torch.equal(state_dict[k], clean[k]) for k in clean)


def test_names_unknown_variable_named_error(tmp_path):
    config, model = _tiny_bert()
    save_tf1_checkpoint(tmp_path, config.to_dict(), model.state_dict(), "bert")
    reader = BundleReader(tmp_path / "model.ckpt")
    tensors = {name: reader.read(name) for name in reader.entries}
    tensors["bert/encoder/layer_0/adapter/kernel"] = np.ones((16, 4), np.float32)
    write_bundle(tmp_path / "model.ckpt", tensors)
    with pytest.raises(TF1CheckpointError,
                       match=r"1 variables .*'bert/encoder/layer_0/adapter/kernel'"):
        load_tf1_checkpoint(tmp_path)
    _, state_dict, info = load_tf1_checkpoint(tmp_path, strict=False)
    assert info.unmapped == ("bert/encoder/layer_0/adapter/kernel",)
    assert sorted(state_dict) == sorted(BertForPreTraining(config).state_dict())


def test_names_config_mismatch_and_missing_named_errors(tmp_path):
    config, model = _tiny_bert()
    save_tf1_checkpoint(tmp_path, config.to_dict(), model.state_dict(), "bert")
    path = tmp_path / "bert_config.json"
    tf_config = json.loads(path.read_text())
    path.write_text(json.dumps({**tf_config, "vocab_size": 21128}))
    with pytest.raises(TF1CheckpointError,
                       match=r"bert_config\.json: vocab_size=21128 .* vocab_size=97"):
        load_tf1_checkpoint(tmp_path)
    os.remove(path)
    with pytest.raises(TF1CheckpointError, match=r"no bert_config\.json found"):
        load_tf1_checkpoint(tmp_path)


def test_names_unrepresentable_parameters_named_error(tmp_path):
    config, model = _tiny_bert()
    state_dict = dict(model.state_dict())
    state_dict["cls.predictions.decoder.weight"] = state_dict["cls.predictions.decoder.weight"] + 1
    with pytest.raises(TF1CheckpointError, match=r"cls\.predictions\.decoder\.weight is not tied"):
        save_tf1_checkpoint(tmp_path, config.to_dict(), state_dict, "bert")
    state_dict = dict(model.state_dict())
    state_dict["bert.encoder.layer.0.adapter.weight"] = torch.ones(2)
    with pytest.raises(TF1CheckpointError, match=r"'bert\.encoder\.layer\.0\.adapter\.weight'"):
        save_tf1_checkpoint(tmp_path, config.to_dict(), state_dict, "bert")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_names_low_precision_and_shards_roundtrip(tmp_path, dtype):
    config = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=36, **SMALL)
    model = _seeded(BertForPreTraining, config).to(dtype)
    save_tf1_checkpoint(tmp_path, config.to_dict(), model.state_dict(), "bert", num_shards=2)
    assert os.path.exists(tmp_path / "model.ckpt.data-00001-of-00002")
    _, state_dict, _ = load_tf1_checkpoint(tmp_path)
    for name, tensor in model.state_dict().items():
        assert state_dict[name].dtype == dtype and torch.equal(state_dict[name], tensor), name


def test_names_bare_model_state_dict(tmp_path):
    config, model = _tiny_bert()
    save_tf1_checkpoint(tmp_path, config.to_dict(), model.bert.state_dict(), "bert")
    hf_config, state_dict, _ = load_tf1_checkpoint(tmp_path)
    assert hf_config["architectures"] == ["BertModel"]
    assert sorted(state_dict) == sorted("bert." + k for k in model.bert.state_dict())


def test_names_legacy_albert_zh_loads_as_bert(tmp_path):
    # brightmart/albert_zh before its Google-format releases: factorized embeddings and one
    # "layer_shared" block, all at hidden size after the projection.
    e, h, layers = 8, 16, 3
    config = BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=36, hidden_act="gelu", **SMALL)
    model = _seeded(BertForPreTraining, config)
    rng = np.random.default_rng(5)
    table = rng.standard_normal((V, e)).astype(np.float32)
    project = rng.standard_normal((e, h)).astype(np.float32)
    mapping = name_map("bert")
    tensors = {}
    for hf_name, tensor in model.state_dict().items():
        target = mapping.to_tf(hf_name)
        if target is None or ".layer.1." in hf_name or ".layer.2." in hf_name:
            continue
        array = tensor.numpy().T if target[1] else tensor.numpy()
        tensors[target[0].replace("layer_0", "layer_shared")] = array
    tensors["bert/embeddings/word_embeddings"] = table
    tensors["bert/embeddings/word_embeddings_2"] = project
    write_bundle(tmp_path / "albert_model.ckpt", tensors)
    (tmp_path / "albert_config_tiny.json").write_text(json.dumps(
        {"vocab_size": V, "embedding_size": e, "hidden_size": h, "num_hidden_layers": layers,
         "num_attention_heads": 2, "intermediate_size": 36, "hidden_act": "gelu",
         "max_position_embeddings": P, "type_vocab_size": T, "hidden_dropout_prob": 0.0,
         "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02}))
    with torch.no_grad():
        merged = (torch.from_numpy(table).double() @ torch.from_numpy(project).double()).float()
        model.bert.embeddings.word_embeddings.weight.copy_(merged)
        for layer in model.bert.encoder.layer[1:]:
            layer.load_state_dict(model.bert.encoder.layer[0].state_dict())
    hf_config, state_dict, info = load_tf1_checkpoint(tmp_path)
    assert info.layout == "albert_zh-legacy" and hf_config["model_type"] == "bert"
    assert hf_config["hidden_act"] == "gelu"
    _assert_same_outputs(model, _reload(BertForPreTraining, hf_config, state_dict),
                         ["prediction_logits", "seq_relationship_logits"])


def test_names_resolve_prefix(tmp_path):
    config, model = _tiny_bert()
    save_tf1_checkpoint(tmp_path, config.to_dict(), model.state_dict(), "bert")
    for suffix in (".index", ".data-00000-of-00001"):
        os.rename(tmp_path / f"model.ckpt{suffix}", tmp_path / f"bert_model.ckpt{suffix}")
    # Released zips name a path on the author's machine.
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/home/author/bert_model.ckpt"\n')
    prefix = str(tmp_path / "bert_model.ckpt")
    assert resolve_prefix(tmp_path) == prefix
    assert resolve_prefix(prefix) == prefix
    assert resolve_prefix(prefix + ".index") == prefix
    assert resolve_prefix(prefix + ".data-00000-of-00001") == prefix
    os.remove(tmp_path / "checkpoint")
    assert resolve_prefix(tmp_path) == prefix
    write_bundle(tmp_path / "other.ckpt", {"x": np.zeros(1, np.float32)})
    with pytest.raises(TF1CheckpointError,
                       match=r"expected one TF checkpoint .*'bert_model\.ckpt\.index'"):
        resolve_prefix(tmp_path)
    with pytest.raises(TF1CheckpointError, match=r"no TF checkpoint"):
        resolve_prefix(tmp_path / "missing.ckpt")


def test_names_copied_directory_reads_its_own_checkpoint(tmp_path):
    # TensorFlow's Saver writes the absolute prefix into `checkpoint`; a copied directory keeps it.
    config, original = _tiny_bert()
    _, copy = _tiny_bert()
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(1.0)
    for name, model in (("run", original), ("copy", copy)):
        save_tf1_checkpoint(tmp_path / name, config.to_dict(), model.state_dict(), "bert")
        for suffix in (".index", ".data-00000-of-00001"):
            os.rename(tmp_path / name / f"model.ckpt{suffix}",
                      tmp_path / name / f"model.ckpt-1000{suffix}")
    other = tmp_path / "run" / "model.ckpt-1000"
    (tmp_path / "copy" / "checkpoint").write_text(
        f'model_checkpoint_path: "{other}"\nall_model_checkpoint_paths: "{other}"\n')
    assert resolve_prefix(tmp_path / "copy") == str(tmp_path / "copy" / "model.ckpt-1000")
    hf_config, state_dict, info = load_tf1_checkpoint(tmp_path / "copy")
    assert info.prefix == str(tmp_path / "copy" / "model.ckpt-1000")
    _assert_same_outputs(copy, _reload(BertForPreTraining, hf_config, state_dict),
                         ["prediction_logits"])

    for suffix in (".index", ".data-00000-of-00001"):
        os.rename(tmp_path / "copy" / f"model.ckpt-1000{suffix}",
                  tmp_path / "copy" / f"model.ckpt-2000{suffix}")
    with pytest.raises(TF1CheckpointError, match=r"checkpoint: model_checkpoint_path names "
                       r"'.*run/model\.ckpt-1000', but .*copy has no model\.ckpt-1000\.index "
                       r"\(it holds \['model\.ckpt-2000\.index'\]\).*copy/model\.ckpt-2000"):
        load_tf1_checkpoint(tmp_path / "copy")
    (tmp_path / "copy" / "checkpoint").write_text('model_checkpoint_path: "../run/model.ckpt-1000"\n')
    with pytest.raises(TF1CheckpointError, match=r"only a checkpoint in this directory is read"):
        resolve_prefix(tmp_path / "copy")


@pytest.mark.parametrize("model_cls,heads,labels", [
    (BertForSequenceClassification, ("output_weights", "output_bias"), 3),
    (BertForQuestionAnswering, ("cls/squad/output_weights", "cls/squad/output_bias"), 2),
])
def test_names_finetuned_heads_roundtrip(tmp_path, model_cls, heads, labels):
    # run_classifier.py and run_squad.py (HFL's CMRC 2018 baselines) checkpoints.
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=36, num_labels=labels, **SMALL)
    model = _seeded(model_cls, config)
    save_tf1_checkpoint(tmp_path, config.to_dict(), model.state_dict(), "bert")
    entries = BundleReader(tmp_path / "model.ckpt").entries
    assert entries[heads[0]].shape == (labels, 16) and entries[heads[1]].shape == (labels,)
    hf_config, state_dict, _ = load_tf1_checkpoint(tmp_path)
    assert hf_config["architectures"] == [model_cls.__name__]
    fields = ["start_logits", "end_logits"] if labels == 2 else ["logits"]
    _assert_same_outputs(model, _reload(model_cls, hf_config, state_dict), fields)
