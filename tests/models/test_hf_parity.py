"""HF parity of every family and head: import, export, state-dict round trip, bad checkpoints.

Tiny random HF models are built here (nothing downloaded); fp32 CPU; the batch is padded with rows
of lengths 9, 5, 1 and 7. Padded positions are excluded from comparisons (lub_fast returns zeros
there, HF returns states of padded queries).
"""

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import lub_fast
from lub_fast.models import (
    EncoderConfig,
    from_pretrained_electra_pair,
    hf_to_lub,
    lub_to_hf,
    read_labels,
    read_tokenizer_files,
)
from lub_fast.models.hf import ARCHITECTURES

TOL = dict(atol=1e-5, rtol=1e-5)
LENGTHS = (9, 5, 1, 7)
SEQ = 9

_CONFIGS = {
    "bert": transformers.BertConfig,
    "roberta": transformers.RobertaConfig,
    "albert": transformers.AlbertConfig,
    "electra": transformers.ElectraConfig,
}
_AUTO = {
    "base": transformers.AutoModel,
    "masked_lm": transformers.AutoModelForMaskedLM,
    "pretraining": transformers.AutoModelForPreTraining,
    "discriminator": transformers.AutoModelForPreTraining,
    "sequence_classification": transformers.AutoModelForSequenceClassification,
    "token_classification": transformers.AutoModelForTokenClassification,
    "question_answering": transformers.AutoModelForQuestionAnswering,
}
CASES = sorted(ARCHITECTURES)


def hf_config(family, **changes):
    fields = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
    )
    if family == "albert":
        fields.update(embedding_size=16, num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)
    if family == "electra":
        fields.update(embedding_size=16)
    fields.update(changes)
    return _CONFIGS[family](**fields)


def randomize(model, seed=0):
    """Non-trivial weights everywhere (HF initialises biases to 0 and LayerNorms to 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(1.0 + noise if "LayerNorm" in name or "layer_norm" in name else noise)
    return model.eval()


def hf_model(family, task, seed=0, **changes):
    cls = getattr(transformers, ARCHITECTURES[family, task])
    if task in ("pretraining", "question_answering"):
        changes.setdefault("num_labels", 2)  # HF sizes SOP and span outputs by num_labels
    return randomize(cls(hf_config(family, **changes)), seed)


def batch(family, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pad = 1 if family == "roberta" else 0
    mask = (torch.arange(SEQ)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(5, 99, (len(LENGTHS), SEQ), generator=gen).masked_fill(mask == 0, pad)
    types = torch.randint(0, 2, ids.shape, generator=gen) * mask
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def outputs(model, inputs, ours):
    """Name -> tensor of everything a model returns, padded positions dropped."""
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        out = model(**inputs) if not ours else model(*inputs.values())
    result = {}
    for name in ("last_hidden_state", "logits", "prediction_logits", "start_logits", "end_logits"):
        value = getattr(out, name, None)
        if value is not None and value.dim() >= 2 and value.shape[:2] == real.shape:
            result[name] = value[real]
        elif value is not None:
            result[name] = value
    for name in ("pooler_output", "seq_relationship_logits", "sop_logits"):
        if getattr(out, name, None) is not None:
            result[name] = getattr(out, name)
    if ours:
        if model.task == "pretraining":  # lub_fast's PreTraining keeps its MLM logits in `logits` too
            alias = result.pop("logits")
            assert torch.equal(alias, result["prediction_logits"]), "PreTraining: logits is not prediction_logits"
        if model.task not in ("base",):
            result.pop("last_hidden_state", None)
            result.pop("pooler_output", None)
    return result


def assert_same_outputs(hf, ours, inputs):
    expected, got = outputs(hf, inputs, ours=False), outputs(ours, inputs, ours=True)
    assert sorted(expected) == sorted(got), f"output names: HF {sorted(expected)}, lub_fast {sorted(got)}"
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family,task", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_hf_import_export_roundtrip_equal(family, task, tmp_path):
    hf = hf_model(family, task)
    hf.save_pretrained(tmp_path / "hf")
    ours = lub_fast.from_pretrained(tmp_path / "hf").eval()
    assert ours.task == task and ours.config.family == family
    inputs = batch(family)
    assert_same_outputs(hf, ours, inputs)

    ours.save_pretrained(tmp_path / "lub")
    back, info = _AUTO[task].from_pretrained(tmp_path / "lub", output_loading_info=True)
    assert type(back).__name__ == ARCHITECTURES[family, task]
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reports {problems}"
    assert_same_outputs(back.eval(), ours, inputs)

    state = ours.state_dict()
    again = hf_to_lub(lub_to_hf(state, ours.config, task), ours.config, task, task)
    assert sorted(again) == sorted(state)
    assert all(torch.equal(again[k], state[k]) for k in state), "lub -> HF -> lub changed a tensor"
    reloaded = lub_fast.from_pretrained(tmp_path / "lub").state_dict()
    assert all(torch.equal(reloaded[k], state[k]) for k in state), "save -> load changed a tensor"


@pytest.mark.parametrize("family", sorted(_CONFIGS))
def test_hf_mlm_loss_and_gradients_equal(family, tmp_path):
    hf = hf_model(family, "masked_lm")
    hf.save_pretrained(tmp_path)
    ours = lub_fast.from_pretrained(tmp_path).eval()
    inputs = batch(family)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, ::2] = -100
    hf_loss = hf(**inputs, labels=labels).loss
    our_loss = ours(**inputs, labels=labels).loss
    torch.testing.assert_close(our_loss, hf_loss, **TOL)
    hf_loss.backward()
    our_loss.backward()
    base = getattr(hf, family)
    torch.testing.assert_close(
        ours.encoder.embeddings.word.weight.grad, base.embeddings.word_embeddings.weight.grad, **TOL
    )
    hf_layer = (
        base.encoder.albert_layer_groups[0].albert_layers[0].attention
        if family == "albert"
        else base.encoder.layer[0].attention.self
    )
    hf_qkv_grad = torch.cat([hf_layer.query.weight.grad, hf_layer.key.weight.grad, hf_layer.value.weight.grad])
    torch.testing.assert_close(ours.encoder.layers[0].qkv.weight.grad, hf_qkv_grad, **TOL)


def test_hf_masked_positions_match_full_logits(tmp_path):
    hf_model("bert", "masked_lm").save_pretrained(tmp_path)
    ours = lub_fast.from_pretrained(tmp_path).eval()
    inputs = batch("bert")
    real = inputs["attention_mask"].reshape(-1).nonzero().squeeze(1)
    positions = real[::3]
    with torch.no_grad():
        full = ours(**inputs).logits
        picked = ours(**inputs, masked_positions=positions).logits
    assert picked.shape == (positions.numel(), 99)
    torch.testing.assert_close(picked, full.reshape(-1, 99)[positions], **TOL)


def test_hf_checkpoint_without_mlm_head_loads_tied(tmp_path):
    """HFL's chinese-roberta-wwm-ext: model_type bert, BertForMaskedLM, no cls.* weights."""
    hf = hf_model("bert", "base")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning) as record:
        ours = lub_fast.from_pretrained(tmp_path)
    text = " | ".join(str(w.message) for w in record)
    assert "no weights for ['mlm']" in text and "dropped 2 weights" in text and "pooler.dense.weight" in text, text
    assert ours.task == "masked_lm" and ours.config.family == "bert"
    inputs = batch("bert")
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = hf(**inputs).last_hidden_state[real]
        got = ours.eval()(**inputs).last_hidden_state[real]
    torch.testing.assert_close(got, expected, **TOL)
    ours.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "bert" and saved["architectures"] == ["BertForMaskedLM"]


def test_hf_legacy_bin_with_gamma_beta_and_decoder_loads(tmp_path):
    hf = hf_model("bert", "pretraining")
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}  # fmt: skip
    state["cls.predictions.decoder.weight"] = hf.bert.embeddings.word_embeddings.weight.detach().clone()
    state["cls.predictions.decoder.bias"] = hf.cls.predictions.bias.detach().clone()
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf.config.architectures = ["BertForPreTraining"]
    hf.config.save_pretrained(tmp_path)
    ours = lub_fast.from_pretrained(tmp_path).eval()
    assert_same_outputs(hf, ours, batch("bert"))

    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="tied"):
        lub_fast.from_pretrained(tmp_path)


def test_hf_other_task_drops_and_initialises_head(tmp_path):
    hf = hf_model("bert", "pretraining")
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning) as record:
        ours = lub_fast.from_pretrained(tmp_path, task="token_classification", num_labels=5)
    text = " ".join(str(w.message) for w in record)
    assert "cls.predictions.bias" in text and "cls.seq_relationship.weight" in text and "token_classifier" in text
    assert ours.classifier.out_features == 5


def test_hf_wrong_family_error(tmp_path):
    hf_model("roberta", "masked_lm").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "bert"
    config["pad_token_id"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="look like roberta weights"):
        lub_fast.from_pretrained(tmp_path)
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported HF model_type 'gpt2'"):
        lub_fast.from_pretrained(tmp_path)


def test_hf_renamed_missing_and_misshaped_keys_error(tmp_path):
    hf_model("albert", "masked_lm").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    original = load_file(file)
    renamed = dict(original)
    key = "albert.encoder.albert_layer_groups.1.albert_layers.0.ffn.weight"
    renamed[key.replace("ffn.", "fnn.")] = renamed.pop(key)
    save_file(renamed, file)
    with pytest.raises(ValueError, match=r"unexpected weights.*fnn\.weight"):
        lub_fast.from_pretrained(tmp_path)

    save_file({k: v for k, v in original.items() if k != key}, file)
    with pytest.raises(ValueError, match=r"missing weights: encoder\.layers\.2\.ffn_in\.weight"):
        lub_fast.from_pretrained(tmp_path)

    save_file({k: v for k, v in original.items() if k != "predictions.bias"}, file)
    with pytest.raises(ValueError, match=r"missing weights: mlm\.bias"):
        lub_fast.from_pretrained(tmp_path)

    save_file(original, file)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 38
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"wrong shapes: encoder\.layers\.0\.ffn_in\.weight: expected \(38, 32\), got \(37, 32\)"):
        lub_fast.from_pretrained(tmp_path)


def test_hf_truncated_checkpoint_error(tmp_path):
    hf_model("electra", "discriminator").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        lub_fast.from_pretrained(tmp_path)


def test_hf_electra_pair_shares_embeddings(tmp_path):
    disc = hf_model("electra", "discriminator", seed=1)
    gen = hf_model("electra", "masked_lm", seed=2, hidden_size=16, num_attention_heads=2, intermediate_size=20)
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    disc.save_pretrained(tmp_path / "disc")
    gen.save_pretrained(tmp_path / "gen")
    pair = from_pretrained_electra_pair(tmp_path / "disc", tmp_path / "gen")
    assert pair.generator.encoder.embeddings is pair.discriminator.encoder.embeddings
    inputs = batch("electra")
    assert_same_outputs(gen, pair.generator.eval(), inputs)
    assert_same_outputs(disc, pair.discriminator.eval(), inputs)

    pair.save_pretrained(tmp_path / "pair")
    again = from_pretrained_electra_pair(tmp_path / "pair" / "discriminator", tmp_path / "pair" / "generator")
    assert_same_outputs(gen, again.generator.eval(), inputs)

    with torch.no_grad():
        gen.electra.embeddings.LayerNorm.weight.add_(1.0)
    gen.save_pretrained(tmp_path / "gen")
    with pytest.raises(ValueError, match="embeddings differ in \\['norm.weight'\\]"):
        from_pretrained_electra_pair(tmp_path / "disc", tmp_path / "gen")


def test_hf_tokenizer_files_travel(tmp_path):
    hf_model("bert", "masked_lm").save_pretrained(tmp_path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "中", "国", "人"] + [f"x{i}" for i in range(91)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ours = lub_fast.from_pretrained(tmp_path)
    ours.save_pretrained(tmp_path / "out", tokenizer=read_tokenizer_files(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("中国人")["input_ids"] == [2, 5, 6, 7, 3]


def test_hf_config_roundtrip():
    for family in _CONFIGS:
        hf = hf_config(family).to_dict()
        ours = EncoderConfig.from_hf(hf)
        assert EncoderConfig.from_hf(ours.to_hf()) == ours
        back = _CONFIGS[family](**ours.to_hf())
        for field in ("hidden_size", "intermediate_size", "pad_token_id", "hidden_act", "layer_norm_eps"):
            assert getattr(back, field) == hf[field], f"{family}.{field}: {getattr(back, field)} != {hf[field]}"
    assert EncoderConfig.from_hf(hf_config("roberta").to_dict()).position_offset == 2


def test_hf_sharded_safetensors_load(tmp_path):
    hf = hf_model("roberta", "token_classification")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_same_outputs(hf, lub_fast.from_pretrained(tmp_path).eval(), batch("roberta"))


def test_hf_sharded_pytorch_bin_loads(tmp_path):
    """transformers 4's ``save_pretrained(safe_serialization=False)`` above ``max_shard_size``: one
    ``torch.save``d dict per ``pytorch_model-0000i-of-0000N.bin`` and an index with ``metadata`` and
    ``weight_map``, written here as transformers 4 writes them."""
    hf = hf_model("bert", "masked_lm")
    hf.config.architectures = ["BertForMaskedLM"]
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    names = sorted(state)
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        file = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in keys}, tmp_path / file)
        weight_map.update(dict.fromkeys(keys, file))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    assert_same_outputs(hf, lub_fast.from_pretrained(tmp_path).eval(), batch("bert"))

    (tmp_path / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(ValueError, match="names the shard pytorch_model-00002-of-00003.bin, which is missing"):
        lub_fast.from_pretrained(tmp_path)


def _save_bert_tokenizer(tokens, directory, tmp_path):
    """A transformers 5 BertTokenizer of ``tokens`` saved as it saves one: tokenizer.json and
    tokenizer_config.json, no vocab.txt."""
    source = tmp_path / "tokenizer_source"
    source.mkdir(exist_ok=True)
    (source / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    transformers.BertTokenizer.from_pretrained(source).save_pretrained(directory)
    assert not (Path(directory) / "vocab.txt").exists()


SHUFFLED = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"x{i}" for i in range(40)] + ["人", "国", "中"] + [
    f"y{i}" for i in range(51)
]


def test_hf_tokenizer_json_only_gives_vocab_txt(tmp_path):
    """A transformers-5-saved directory (no vocab.txt): ``from_pretrained`` reads tokenizer.json's
    WordPiece, and the re-saved directory's vocab.txt and tokenizer.json give identical ids."""
    hf_model("bert", "masked_lm").save_pretrained(tmp_path / "hf")
    _save_bert_tokenizer(SHUFFLED, tmp_path / "hf", tmp_path)
    ours = lub_fast.from_pretrained(tmp_path / "hf")
    files = read_tokenizer_files(tmp_path / "hf")
    assert files["vocab.txt"].decode().split("\n")[:-1] == SHUFFLED
    ours.save_pretrained(tmp_path / "out", tokenizer=files)
    assert (tmp_path / "out" / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1] == SHUFFLED
    by_json = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    (tmp_path / "out" / "tokenizer.json").unlink()
    by_vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert by_json("中国人")["input_ids"] == by_vocab("中国人")["input_ids"] == [2, 47, 46, 45, 3]


def test_hf_disagreeing_or_non_wordpiece_tokenizer_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models

    from lub_fast.data.tokenizer import VocabularyError
    from lub_fast.errors import UsageError

    hf_model("bert", "masked_lm").save_pretrained(tmp_path / "hf")
    _save_bert_tokenizer(SHUFFLED, tmp_path / "hf", tmp_path)
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(sorted(SHUFFLED)) + "\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"vocab.txt \(99 tokens\) and tokenizer.json \(99 tokens\) are different vocabularies \(id 0 is"):
        lub_fast.from_pretrained(tmp_path / "hf")

    (tmp_path / "hf" / "vocab.txt").unlink()
    Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(SHUFFLED)}, merges=[])).save(str(tmp_path / "hf" / "tokenizer.json"))
    with pytest.raises(UsageError, match=r"tokenizer.json: a BPE tokenizer, not WordPiece"):
        lub_fast.from_pretrained(tmp_path / "hf")


def test_hf_electra_pair_with_two_vocabularies_is_an_error(tmp_path):
    from lub_fast.data.tokenizer import VocabularyError

    disc = hf_model("electra", "discriminator", seed=1)
    gen = hf_model("electra", "masked_lm", seed=2, hidden_size=16, num_attention_heads=2, intermediate_size=20)
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    for model, name, tokens in ((disc, "disc", SHUFFLED), (gen, "gen", SHUFFLED[:5] + SHUFFLED[5:][::-1])):
        model.save_pretrained(tmp_path / name)
        (tmp_path / name / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"have different vocabularies \(id 5 is 'x0' in the discriminator, 'y50' in the generator\)"):
        from_pretrained_electra_pair(tmp_path / "disc", tmp_path / "gen")


def _held_values(model):
    """(where, value) of every attribute value of every submodule, containers opened."""
    stack = [(f"{type(m).__name__}.{name}", value) for m in model.modules() for name, value in vars(m).items()]
    while stack:
        where, value = stack.pop()
        yield where, value
        if isinstance(value, dict):
            stack += [(f"{where}[{k!r}]", v) for k, v in value.items()] + [(f"{where} key", k) for k in value]
        elif isinstance(value, (list, tuple, set)):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(value)]


def test_hf_models_hold_no_io_state(tmp_path):
    """The vocabulary and class names travel as ``save_pretrained``'s arguments and come back from
    ``read_tokenizer_files``/``read_labels``; the loaded model holds neither, so saving it again
    without them writes HF's default names and no tokenizer."""
    names = ("B-PER", "I-PER", "O")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    hf_model("bert", "token_classification").save_pretrained(tmp_path / "hf")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    lub_fast.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "lub", tokenizer=vocab, labels=names)

    config = transformers.AutoConfig.from_pretrained(tmp_path / "lub")
    assert config.id2label == dict(enumerate(names)) and config.label2id == {n: i for i, n in enumerate(names)}, config.id2label
    assert read_labels(tmp_path / "lub") == names
    assert read_tokenizer_files(tmp_path / "lub")["vocab.txt"] == vocab.read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "lub")("w7")["input_ids"] == [2, 12, 3]

    loaded = lub_fast.from_pretrained(tmp_path / "lub")
    held = [where for where, value in _held_values(loaded)
            if isinstance(value, bytes) or (isinstance(value, str) and value in (*names, *tokens[5:]))]  # fmt: skip
    assert not held, f"modules hold IO state: {held}"
    assert not any(hasattr(m, a) for m in loaded.modules() for a in ("tokenizer_files", "id2label", "labels"))
    loaded.save_pretrained(tmp_path / "again")
    again = transformers.AutoConfig.from_pretrained(tmp_path / "again")
    assert again.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, again.id2label
    assert read_tokenizer_files(tmp_path / "again") == {}


def test_hf_save_refuses_wrong_labels_or_tokenizer_before_writing(tmp_path):
    hf_model("bert", "sequence_classification").save_pretrained(tmp_path / "hf")
    ours = lub_fast.from_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"2 label names for a sequence_classification model of 3 classes"):
        ours.save_pretrained(tmp_path / "out", labels=("a", "b"))
    hf_model("bert", "masked_lm").save_pretrained(tmp_path / "mlm")
    with pytest.raises(ValueError, match=r"labels are for"):
        lub_fast.from_pretrained(tmp_path / "mlm").save_pretrained(tmp_path / "out", labels=("a",))
    assert read_labels(tmp_path / "mlm") is None
    with pytest.raises(ValueError, match=r"tokenizer=.* is not a vocab.txt file"):
        ours.save_pretrained(tmp_path / "out", tokenizer=tmp_path / "hf")
    assert not (tmp_path / "out").exists(), "a refused save wrote files"
