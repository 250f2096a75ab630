"""Every file lub_fast exports follows the process umask, as files that ``open`` creates do:
safetensors writes through a 0600 temporary file that it renames, which must not leak into HF
directories, fine-tuning's ``best_model``, TF-1 checkpoints or training checkpoints."""

import os
import stat
from pathlib import Path

import pytest
import torch

from lub_fast.checkpoint import save_checkpoint
from lub_fast.convert import convert
from lub_fast.models import EncoderConfig, MaskedLM
from lub_fast.objectives import MaskedLMObjective
from lub_fast.runs import export_hf
from lub_fast.tasks.run import export_model

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"t{i}" for i in range(27)]


def _write_everything(out: Path) -> None:
    """Each export path once: save_pretrained, runs.export_hf, finetune's best_model swap,
    convert to HF and to TF-1, a training checkpoint."""
    config = EncoderConfig(family="bert", vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = MaskedLM(config)
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    model.save_pretrained(out / "saved")
    objective = MaskedLMObjective(model)
    export_hf(objective, str(vocab), out / "run" / "hf")
    export_model(model, out / "best_model")
    export_model(model, out / "best_model")  # the second swaps the first out
    convert(out / "run" / "hf", out / "converted")
    convert(out / "run" / "hf", out / "tf1", to="tf1")
    save_checkpoint(out / "run", "step_00000001", objective, {"step": 1}, grads={"w": torch.ones(2)})


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)], ids=["022", "077"])
def test_exports_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        out.mkdir()
        _write_everything(out)
    finally:
        os.umask(previous)
    wrong = []
    for path in sorted(out.rglob("*")):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != (dir_mode if path.is_dir() else file_mode):
            wrong.append(f"{path.relative_to(out)} {mode:o}")
    names = {p.name for p in out.rglob("*")}
    assert {"model.safetensors", "grads.safetensors", "config.json", "model.ckpt.index"} <= names, sorted(names)
    assert not wrong, f"umask {umask:03o}: expected files {file_mode:o}, directories {dir_mode:o}; got {wrong}"
