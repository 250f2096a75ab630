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


def _vocab(path):
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"t{i}" for i in range(V - 5)]) + "\n")
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
    assert ours.config.family == family and "vocab.txt" in ours.tokenizer_files
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
