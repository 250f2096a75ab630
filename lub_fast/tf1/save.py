"""Writing an HF config + state dict as a TensorFlow-1 checkpoint in Google's names (BERT, ALBERT,
ELECTRA with its generator), that Google's code, bert4keras and ``tf.train.load_checkpoint`` read.
Names come from ``lub_fast.tf1.names``, the bundle format from ``lub_fast.tf1.bundle``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import numpy as np
import torch

from lub_fast.tf1.bundle import BFLOAT16, TF1CheckpointError, write_bundle
from lub_fast.tf1.names import (
    CHECKPOINT_NAME,
    CONFIG_FILES,
    FAMILIES,
    GENERATOR_CONFIG_FILE,
    TIED,
    name_map,
    tf_config_from_hf,
)

_BUFFERS = (".position_ids", ".token_type_ids")  # HF buffers that old HF files saved


def _to_numpy(tensor: torch.Tensor, transpose: bool) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if transpose:
        tensor = tensor.t()
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(BFLOAT16)
    return tensor.numpy()


def _normalized(state_dict: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Full-model HF names: bare-model keys get the ``bert.``-style prefix, buffers go."""
    base = {"bert": "bert.", "albert": "albert.", "electra": "electra."}[family]
    sd = {}
    for name, tensor in state_dict.items():
        if name.endswith(_BUFFERS):
            continue
        if name.startswith(("embeddings.", "encoder.", "pooler.", "embeddings_project.")):
            name = base + name
        sd[name] = tensor
    return sd


def _tf_tensors(hf_config: dict, sd: dict[str, torch.Tensor], family: str, *,
                generator: bool = False, shared: Mapping[str, torch.Tensor] | None = None
                ) -> dict[str, np.ndarray]:
    """Google-named arrays of one normalized HF state dict. For an ELECTRA generator,
    ``shared`` is the discriminator's: embeddings equal to its own are written once."""
    sd = dict(sd)
    for tied, source in TIED[family]:
        if tied in sd:
            if source not in sd or not torch.equal(sd[tied], sd[source]):
                raise TF1CheckpointError(
                    f"{tied} is not tied to {source}; Google's {family} layout has one tensor "
                    "for both"
                )
            del sd[tied]
    if family == "albert" and hf_config["embedding_size"] == hf_config["hidden_size"]:
        w = sd.pop("albert.encoder.embedding_hidden_mapping_in.weight", None)
        b = sd.pop("albert.encoder.embedding_hidden_mapping_in.bias", None)
        identity = (w is not None and b is not None and not b.any()
                    and torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype)))
        if w is not None and not identity:
            raise TF1CheckpointError(
                "embedding_size == hidden_size: TF ALBERT has no embedding_hidden_mapping_in, "
                "but this one is not the identity"
            )
    untied = False
    if generator:
        emb = [k for k in sd if k.startswith("electra.embeddings.")]
        untied = not all(k in shared and torch.equal(sd[k], shared[k]) for k in emb)
        if not untied:
            for k in emb:
                del sd[k]
    mapping = name_map(family, generator=generator, untied_embeddings=untied)
    out, unknown = {}, []
    for name, tensor in sd.items():
        target = mapping.to_tf(name)
        if target is None:
            unknown.append(name)
            continue
        out[target[0]] = _to_numpy(tensor, target[1])
    if unknown:
        raise TF1CheckpointError(
            f"{len(unknown)} parameters have no name in Google's {family} layout: {unknown[:20]}"
        )
    return out


def save_tf1_checkpoint(directory: str, hf_config: dict, state_dict: Mapping[str, torch.Tensor],
                        family: str, *, vocab_file: str | None = None,
                        generator: tuple[dict, Mapping[str, torch.Tensor]] | None = None,
                        num_shards: int = 1) -> list[str]:
    """Write an HF model as a TensorFlow-1 checkpoint in Google's names.

    ``state_dict``: HF names of ``{Bert,Albert}For{PreTraining,MaskedLM}``,
    ``ElectraForPreTraining`` or the bare models (with or without the ``bert.``/``albert.``/
    ``electra.`` prefix); tied copies are checked and written once. ``family``: "bert",
    "albert" or "electra". ``generator``: for ELECTRA, the generator's ``(hf_config,
    state_dict)`` (``ElectraForMaskedLM``), written into the same checkpoint as
    ``generator/...`` + ``generator_predictions/...`` the way google-research/electra does.

    Writes ``model.ckpt.index``, ``model.ckpt.data-0000i-of-0000N``, ``checkpoint``, the config
    (``bert_config.json``, ``albert_config.json``, or ``discriminator_config.json`` and
    ``generator_config.json``) and ``vocab.txt`` when ``vocab_file`` is given. Returns the paths
    written. Raises ``TF1CheckpointError`` for parameters that have no Google name."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if generator is not None and family != "electra":
        raise ValueError("generator= is only for ELECTRA")
    disc = _normalized(state_dict, family)
    tensors = _tf_tensors(hf_config, disc, family)
    configs = {CONFIG_FILES[family]: tf_config_from_hf(hf_config, family)}
    if generator is not None:
        gen_config, gen_sd = generator
        gen_tensors = _tf_tensors(gen_config, _normalized(gen_sd, family), family,
                                  generator=True, shared=disc)
        clash = sorted(set(tensors) & set(gen_tensors))
        if clash:
            raise TF1CheckpointError(f"generator and discriminator both define {clash[:5]}")
        tensors.update(gen_tensors)
        configs[GENERATOR_CONFIG_FILE] = tf_config_from_hf(gen_config, family)
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, CHECKPOINT_NAME)
    written = write_bundle(prefix, tensors, num_shards=num_shards)
    for filename, config in configs.items():
        written.append(os.path.join(directory, filename))
        with open(written[-1], "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    written.append(os.path.join(directory, "checkpoint"))
    with open(written[-1], "w", encoding="utf-8") as f:
        f.write(f'model_checkpoint_path: "{CHECKPOINT_NAME}"\n'
                f'all_model_checkpoint_paths: "{CHECKPOINT_NAME}"\n')
    if vocab_file is not None:
        written.append(os.path.join(directory, "vocab.txt"))
        if os.path.abspath(vocab_file) != os.path.abspath(written[-1]):
            shutil.copyfile(vocab_file, written[-1])
    return written
