"""TF-1 checkpoints through ``lub_fast.from_pretrained`` and ``python -m lub_fast.convert``: tiny
random HF models (built here) saved in Google's layout load into lub_fast with HF's outputs, and
convert to HF directories / back to TF-1 without losing a weight."""

import json

import pytest
import torch
import transformers
from transformers import AlbertConfig, AlbertForPreTraining, BertConfig, BertForPreTraining, ElectraConfig, ElectraForPreTraining

import lub_fast
from lub_fast.convert import main as convert_main
from lub_fast.models.load import from_pretrained_electra_pair, read_tokenizer_files
from lub_fast.tf1 import load_tf1_checkpoint, save_tf1_checkpoint

V = 99
SMALL = dict(vocab_size=V, max_position_embeddings=32, type_vocab_size=2, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)


def _seeded(cls, config, seed=0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # HF zero-initialises biases: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, V, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 1:] = 0
    types = torch.zeros_like(ids)
    types[0, 7:] = 1
    return ids, mask, types


CHARS = list("今天气很好")
TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"t{i}" for i in range(V - 5 - len(CHARS))] + CHARS


def _vocab(path):
    path.write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
    return path


CASES = {
    "bert": (BertConfig, BertForPreTraining, "prediction_logits", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)),
    "albert": (AlbertConfig, AlbertForPreTraining, "prediction_logits", dict(embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, hidden_act="gelu_new")),
    "electra": (ElectraConfig, ElectraForPreTraining, "logits", dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)),
}


def _tf1_checkpoint(tmp_path, family):
    config_cls, model_cls, key, shape = CASES[family]
    hf = _seeded(model_cls, config_cls(**shape, **SMALL))
    directory = tmp_path / f"{family}_tf1"
    save_tf1_checkpoint(directory, hf.config.to_dict(), hf.state_dict(), family, vocab_file=str(_vocab(tmp_path / "vocab.txt")))
    return hf, directory, key


def _real_rows(tensor, mask):
    return tensor[mask.bool()]


@pytest.mark.parametrize("family", sorted(CASES))
def test_convert_tf1_checkpoint_loads_with_hf_outputs(tmp_path, family):
    hf, directory, key = _tf1_checkpoint(tmp_path, family)
    ours = lub_fast.from_pretrained(directory).eval()
    assert ours.config.family == family and "vocab.txt" in read_tokenizer_files(directory)
    ids, mask, types = _batch()
    with torch.no_grad():
        expected = getattr(hf(input_ids=ids, attention_mask=mask, token_type_ids=types), key)
        got = ours(ids, mask, types).logits
    torch.testing.assert_close(_real_rows(got, mask), _real_rows(expected, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(CASES))
def test_convert_cli_tf1_to_hf_to_tf1_round_trip(tmp_path, family):
    hf, directory, key = _tf1_checkpoint(tmp_path, family)
    assert convert_main([str(directory), str(tmp_path / "hf")]) == 0
    loaded = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "hf").eval()
    ids, mask, types = _batch()
    with torch.no_grad():
        expected = getattr(hf(input_ids=ids, attention_mask=mask, token_type_ids=types), key)
        got = getattr(loaded(input_ids=ids, attention_mask=mask, token_type_ids=types), key)
    torch.testing.assert_close(_real_rows(got, mask), _real_rows(expected, mask), atol=1e-5, rtol=1e-5)
    assert (tmp_path / "hf" / "vocab.txt").exists()

    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "tf1"]) == 0
    _, original, _ = load_tf1_checkpoint(directory)
    _, back, _ = load_tf1_checkpoint(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert torch.equal(tensor, back[name]), name


def test_convert_missing_source_is_a_clear_error(tmp_path, capsys):
    assert convert_main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no such directory or checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert convert_main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_convert_hf_export_keeps_config(tmp_path):
    hf, directory, _ = _tf1_checkpoint(tmp_path, "bert")
    assert convert_main([str(directory), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"] and config["hidden_act"] == "gelu"


@pytest.mark.parametrize("family", sorted(CASES))
def test_convert_google_config_json_is_read_as_tf1(tmp_path, family):
    # Google's ELECTRA layout: *.index files next to a TF config named config.json (no model_type).
    hf, directory, key = _tf1_checkpoint(tmp_path, family)
    config_file = next(p for p in directory.glob("*config.json"))
    config_file.rename(directory / "config.json")
    assert "model_type" not in json.loads((directory / "config.json").read_text())
    ours = lub_fast.from_pretrained(directory).eval()
    ids, mask, types = _batch()
    with torch.no_grad():
        expected = getattr(hf(input_ids=ids, attention_mask=mask, token_type_ids=types), key)
        got = ours(ids, mask, types).logits
    torch.testing.assert_close(_real_rows(got, mask), _real_rows(expected, mask), atol=1e-5, rtol=1e-5)
    assert convert_main([str(directory), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family


def _electra_pair_checkpoint(directory, google_release):
    """A tiny random HF ELECTRA discriminator (128 wide, 2 layers) and generator (64 wide, 1 layer:
    Google's ``generator_hidden_size`` 0.5, ``generator_layers`` 0.5), embeddings shared, in one TF-1
    checkpoint. ``google_release``: as Google ships it, no configs (heads by ELECTRA's hidden // 64)
    and the prefix ``electra_small`` named by an absolute path in ``checkpoint``."""
    sizes = dict(embedding_size=16, intermediate_size=96, **SMALL)
    disc_config = ElectraConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, **sizes)
    gen_config = ElectraConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, **sizes)
    disc = _seeded(ElectraForPreTraining, disc_config)
    gen = _seeded(transformers.ElectraForMaskedLM, gen_config, seed=1)
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    save_tf1_checkpoint(directory, disc_config.to_dict(), disc.state_dict(), "electra",
                        vocab_file=str(_vocab(directory.parent / "vocab.txt")),
                        generator=(gen_config.to_dict(), gen.state_dict()))
    if google_release:
        for name in ("discriminator_config.json", "generator_config.json"):
            (directory / name).unlink()
        for suffix in (".index", ".data-00000-of-00001"):
            (directory / f"model.ckpt{suffix}").rename(directory / f"electra_small{suffix}")
        (directory / "checkpoint").write_text('model_checkpoint_path: "/home/author/electra_small/electra_small"\n')
    return disc, gen


@pytest.mark.parametrize("google_release", [False, True])
def test_convert_tf1_electra_writes_discriminator_and_generator(tmp_path, google_release):
    disc, gen = _electra_pair_checkpoint(tmp_path / "electra", google_release)
    assert convert_main([str(tmp_path / "electra"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "generator" / "config.json").read_text())
    shape = (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"])
    assert shape == (64, 1, 1), config
    pair = from_pretrained_electra_pair(tmp_path / "electra")
    ids, mask, types = _batch()
    for sub, original, ours, cls in (
        ("discriminator", disc, pair.discriminator, ElectraForPreTraining),
        ("generator", gen, pair.generator, transformers.ElectraForMaskedLM),
    ):
        loaded = cls.from_pretrained(tmp_path / "hf" / sub).eval()
        assert (tmp_path / "hf" / sub / "vocab.txt").exists(), sub
        with torch.no_grad():
            want = _real_rows(original(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, mask)
            theirs = _real_rows(loaded(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, mask)
            got = _real_rows(ours.eval()(ids, mask, types).logits, mask)
        torch.testing.assert_close(theirs, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{sub} HF export: {m}")
        torch.testing.assert_close(got, theirs, atol=1e-5, rtol=1e-5, msg=lambda m: f"{sub} lub_fast: {m}")


@pytest.mark.parametrize("family", sorted(CASES))
def test_convert_tf1_export_tokenizer_splits_chinese_characters(tmp_path, family):
    """``AutoTokenizer`` of every family's export is BERT's WordPiece on the vocab.txt (not ALBERT's
    SentencePiece, which makes a whole Chinese sentence one token), within the model's positions."""
    _, directory, _ = _tf1_checkpoint(tmp_path, family)
    assert convert_main([str(directory), str(tmp_path / "hf")]) == 0
    settings = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "BertTokenizer" and settings["do_lower_case"] is True, settings
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer("今天天气很好")["input_ids"]
    expected = [TOKENS.index(t) for t in ["[CLS]", *"今天天气很好", "[SEP]"]]
    assert ids == expected, (type(tokenizer).__name__, ids, expected)
    assert tokenizer.model_max_length == SMALL["max_position_embeddings"], tokenizer.model_max_length


def test_convert_tokenizer_json_only_hf_to_tf1_writes_its_vocab(tmp_path):
    """A transformers-5-saved directory (tokenizer.json, no vocab.txt) converts to a TF-1 checkpoint
    whose vocab.txt is tokenizer.json's WordPiece vocabulary, in its id order."""
    shuffled = TOKENS[:5] + TOKENS[5:][::-1]
    source = tmp_path / "source"
    source.mkdir()
    (source / "vocab.txt").write_text("\n".join(shuffled) + "\n", encoding="utf-8")
    hf = tmp_path / "hf"
    _seeded(BertForPreTraining, BertConfig(**CASES["bert"][3], **SMALL)).save_pretrained(hf)
    transformers.BertTokenizer.from_pretrained(source).save_pretrained(hf)
    assert not (hf / "vocab.txt").exists() and (hf / "tokenizer.json").exists()
    assert convert_main([str(hf), str(tmp_path / "tf1"), "--to", "tf1"]) == 0
    assert (tmp_path / "tf1" / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1] == shuffled


def test_convert_garbage_config_json_names_the_file(tmp_path, capsys):
    hf = tmp_path / "hf"
    _seeded(BertForPreTraining, BertConfig(**SMALL, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32)).save_pretrained(hf)  # fmt: skip
    (hf / "config.json").write_text('{"model_type": "bert", "hidden_size": 16,')  # cut off mid-write
    capsys.readouterr()
    assert convert_main([str(hf), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = f"lub_fast.convert: error: {hf / 'config.json'}: not a readable JSON"
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "out").exists()


def test_convert_into_a_directory_another_writer_holds_stops_at_once(tmp_path, capsys):
    import subprocess
    import sys

    _, directory, _ = _tf1_checkpoint(tmp_path, "bert")
    busy = tmp_path / "busy"
    hold = "import sys, time\nfrom lub_fast.lock import output_lock\nwith output_lock(sys.argv[1], 'pretrain'):\n" \
           "    print('locked', flush=True)\n    time.sleep(60)\n"  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", hold, str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert convert_main([str(directory), str(busy)]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{busy} is in use by lub_fast.pretrain, PID {holder.pid}" in err[0], err
    assert not (busy / "config.json").exists()
