"""Reading TensorFlow-1 checkpoints (Google BERT, ALBERT, ELECTRA layouts) as HF config + state dict.

``load_tf1_checkpoint`` reads a released checkpoint directory (``model.ckpt.index``,
``model.ckpt.data-*``, ``bert_config.json`` / ``albert_config.json`` / ELECTRA's
``*_discriminator_config.json``, ``vocab.txt``) with the pure-NumPy bundle reader and returns the
HF config dict and HF-named state dict (``BertForPreTraining``, ``AlbertForPreTraining``,
``ElectraForPreTraining`` or the ELECTRA generator's ``ElectraForMaskedLM`` names, tied
parameters included). ``lub_fast.tf1.save`` writes the reverse.

brightmart/albert_zh's first releases (``bert/encoder/layer_shared``, factorized
``bert/embeddings/word_embeddings`` [V, E] @ ``word_embeddings_2`` [E, H], position and type
embeddings at H) are not an HF ALBERT; they load exactly as an HF BERT whose word embeddings are
the product [V, H] and whose layers all hold the shared weights (its MLM head multiplies by the
same product, see that repository's ``run_pretraining.py``).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lub_fast.tf1.bundle import BFLOAT16, BundleReader, TF1CheckpointError
from lub_fast.tf1.names import (
    CONFIG_FILES,
    TIED,
    hf_config_from_tf,
    is_training_state,
    name_map,
)


@dataclass(frozen=True)
class TF1LoadInfo:
    """What ``load_tf1_checkpoint`` read and how it interpreted it."""

    prefix: str  # the checkpoint prefix read (``dir/model.ckpt``)
    family: str  # HF family of the returned state dict: "bert", "albert", "electra"
    layout: str  # "google", or "albert_zh-legacy" for brightmart's first ALBERT layout
    config_file: str | None  # the TF config used; None when every size came from the shapes
    vocab_file: str | None  # vocab.txt next to the checkpoint, if any
    training_state: tuple[str, ...]  # optimizer slots and counters that were skipped
    other_network: tuple[str, ...]  # ELECTRA: the other network's variables (not loaded)
    unmapped: tuple[str, ...]  # variables of no known meaning (only when strict=False)
    notes: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Locating checkpoint files


def resolve_prefix(path: str) -> str:
    """The checkpoint prefix for a directory, a prefix, an ``.index`` or a data file path.

    A directory's ``checkpoint`` file (TensorFlow's ``CheckpointState``) picks the prefix, but only
    inside that directory: TensorFlow writes absolute paths (``/home/x/run/model.ckpt-1000``) and
    directories get copied, so a named path elsewhere is read as the file of the same basename
    here, and a name with no such file here is an error, never the other directory's weights."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(glob.escape(path), "*.index")))
        state = os.path.join(path, "checkpoint")
        named = None
        if os.path.exists(state):
            with open(state, encoding="utf-8") as f:
                m = re.search(r'^model_checkpoint_path:\s*"(.*)"', f.read(), re.MULTILINE)
            named = m.group(1) if m else None
        if named:
            candidates = [os.path.join(path, os.path.basename(named))]
            if not os.path.isabs(named):
                candidates.insert(0, os.path.join(path, named))
            root = os.path.join(os.path.realpath(path), "")
            for candidate in candidates:
                inside = os.path.join(os.path.realpath(os.path.dirname(candidate)), "")
                if inside.startswith(root) and os.path.exists(candidate + ".index"):
                    return candidate
            raise TF1CheckpointError(
                f"{state}: model_checkpoint_path names {named!r}, but {path} has no "
                f"{os.path.basename(named)}.index (it holds "
                f"{[os.path.basename(p) for p in found] or 'no *.index'}); only a checkpoint in "
                "this directory is read: pass its prefix, e.g. "
                f"{found[0][: -len('.index')] if found else os.path.join(path, 'model.ckpt')}, "
                "or fix the checkpoint file"
            )
        if len(found) == 1:
            return found[0][: -len(".index")]
        raise TF1CheckpointError(
            f"{path}: expected one TF checkpoint (*.index), found "
            f"{[os.path.basename(p) for p in found] or 'none'}; pass the prefix, e.g. "
            f"{os.path.join(path, 'model.ckpt')}"
        )
    if os.path.exists(path + ".index"):
        return path
    stripped = re.sub(r"\.(index|data-\d{5}-of-\d{5})$", "", path)
    if stripped != path and os.path.exists(stripped + ".index"):
        return stripped
    raise TF1CheckpointError(f"{path}: no TF checkpoint ({path}.index not found)")


def vocab_file(path: str) -> str | None:
    """The ``vocab.txt`` next to the checkpoint at ``path`` (as ``resolve_prefix`` takes it), or None."""
    vocab = os.path.join(os.path.dirname(os.path.abspath(resolve_prefix(path))), "vocab.txt")
    return vocab if os.path.exists(vocab) else None


def _is_tf_config(path: str) -> bool:
    """A ``config.json`` next to a TF checkpoint is Google's format unless it has HF's model_type."""
    try:
        with open(path, encoding="utf-8") as f:
            return "model_type" not in json.load(f)
    except (OSError, ValueError) as e:
        raise TF1CheckpointError(f"{path}: not a readable JSON config ({e})") from None


def _find_config(directory: str, family: str, generator: bool) -> str | None:
    if family == "electra":
        kind = "generator" if generator else "discriminator"
        patterns = [f"*{kind}_config.json"] + ([] if generator else
                                               ["electra_config.json", "bert_config.json",
                                                "config.json"])
    else:
        patterns = dict.fromkeys([CONFIG_FILES[family], f"{family}_config*.json",
                                  "bert_config*.json", "config.json"])
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))
        if pattern == "config.json":
            found = [p for p in found if _is_tf_config(p)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise TF1CheckpointError(
                f"{directory}: several configs match {pattern!r}: "
                f"{[os.path.basename(p) for p in found]}; pass config_file="
            )
    return None


_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "embedding_size")


def _read_tf_config(directory: str, family: str, generator: bool, config_file: str | None,
                    notes: list) -> tuple[dict, str | None]:
    if config_file is None:
        config_file = _find_config(directory, family, generator)
    if config_file is not None:
        with open(config_file, encoding="utf-8") as f:
            return json.load(f), config_file
    if generator:
        # Google's ELECTRA releases ship no config; the generator shares the vocabulary,
        # positions and activation with the discriminator but not its sizes.
        disc_file = _find_config(directory, family, False)
        if disc_file is not None:
            with open(disc_file, encoding="utf-8") as f:
                config = {k: v for k, v in json.load(f).items() if k not in _SIZE_KEYS}
            notes.append(f"generator sizes from the weights, other fields from {disc_file}")
            return config, disc_file
    return {}, None


# --------------------------------------------------------------------------------------------
# Loading


def _detect_layout(names: list[str]) -> tuple[str, str]:
    if any(n.startswith(("electra/", "generator/", "discriminator_predictions/")) for n in names):
        return "electra", "google"
    if any(n.startswith(("bert/encoder/layer_shared/", "bert/embeddings/word_embeddings_2"))
           for n in names):
        return "bert", "albert_zh-legacy"
    if any(n.startswith(("bert/encoder/transformer/", "bert/encoder/embedding_hidden_mapping_in"))
           for n in names):
        return "albert", "google"
    if any(n.startswith("bert/") for n in names):
        return "bert", "google"
    if any("/.ATTRIBUTES/" in n for n in names):
        raise TF1CheckpointError(
            f"an object-based TF2 checkpoint (tf.train.Checkpoint or Keras; variables like "
            f"{next(n for n in names if '/.ATTRIBUTES/' in n)!r}): lub_fast reads the name-based "
            "TF-1 checkpoints that Google's BERT, ALBERT and ELECTRA code writes with "
            "tf.compat.v1.train.Saver"
        )
    raise TF1CheckpointError(
        f"cannot tell the model family from variables {names[:5]}...: expected Google BERT "
        "(bert/...), ALBERT (bert/encoder/transformer/...) or ELECTRA (electra/...) names"
    )


def checkpoint_family(path: str) -> tuple[str, bool] | None:
    """``(family, holds an ELECTRA generator)`` of the TF-1 checkpoint at ``path`` (a directory
    or prefix), read from its index alone; None when ``path`` is not a readable TF-1 checkpoint
    (``load_tf1_checkpoint`` then says why)."""
    try:
        names = [n.removeprefix("module/") for n in BundleReader(resolve_prefix(path)).entries
                 if not is_training_state(n)]
        family, _ = _detect_layout(names)
    except TF1CheckpointError:
        return None
    return family, any(n.startswith(("generator/", "generator_predictions/")) for n in names)


def _to_torch(array: np.ndarray, transpose: bool) -> torch.Tensor:
    if array.dtype == BFLOAT16:
        tensor = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor.t().contiguous() if transpose else tensor


def _legacy_albert_zh(sources: dict, shapes: dict, num_layers: int) -> None:
    """Rewrite brightmart's pre-Google ALBERT variables in place into BERT ones."""
    table = sources.pop("bert/embeddings/word_embeddings")
    project = sources.pop("bert/embeddings/word_embeddings_2")
    v, e = shapes.pop("bert/embeddings/word_embeddings")
    h = shapes.pop("bert/embeddings/word_embeddings_2")[1]
    sources["bert/embeddings/word_embeddings"] = lambda: (
        table().astype(np.float64) @ project().astype(np.float64)).astype(np.float32)
    shapes["bert/embeddings/word_embeddings"] = (v, h)
    for name in [n for n in sources if n.startswith("bert/encoder/layer_shared/")]:
        read, shape = sources.pop(name), shapes.pop(name)
        for i in range(num_layers):
            renamed = name.replace("layer_shared", f"layer_{i}")
            sources[renamed], shapes[renamed] = read, shape


def _infer_sizes(shapes: dict, family: str, scope: str, emb_scope: str) -> dict:
    """Config sizes that the variable shapes determine (heads never are)."""
    out = {}
    word = shapes.get(f"{emb_scope}/embeddings/word_embeddings")
    if word:
        out["vocab_size"], out["embedding_size"] = word
    for key, var in (("max_position_embeddings", "position_embeddings"),
                     ("type_vocab_size", "token_type_embeddings")):
        if f"{emb_scope}/embeddings/{var}" in shapes:
            out[key] = shapes[f"{emb_scope}/embeddings/{var}"][0]
    if family == "albert":
        layer = f"{scope}/encoder/transformer/group_0/inner_group_0"
        query = f"{layer}/attention_1/self/query/kernel"
        inter = f"{layer}/ffn_1/intermediate/dense/kernel"
    else:
        layers = {int(m.group(1)) for n in shapes
                  if (m := re.match(rf"{scope}/encoder/layer_(\d+)/", n))}
        if layers:
            out["num_hidden_layers"] = max(layers) + 1
        query = f"{scope}/encoder/layer_0/attention/self/query/kernel"
        inter = f"{scope}/encoder/layer_0/intermediate/dense/kernel"
    if query in shapes:
        out["hidden_size"] = shapes[query][1]
    if inter in shapes:
        out["intermediate_size"] = shapes[inter][1]
    if family == "albert":
        groups = {int(m.group(1)) for n in shapes if (m := re.search(r"/group_(\d+)/", n))}
        inner = {int(m.group(1)) for n in shapes if (m := re.search(r"/inner_group_(\d+)/", n))}
        out["num_hidden_groups"], out["inner_group_num"] = max(groups) + 1, max(inner) + 1
    return out


def _merge_config(tf_config: dict, inferred: dict, family: str, config_file: str | None,
                  notes: list) -> dict:
    """Sizes from the shapes checked against (or filling in for) the TF config."""
    merged = dict(tf_config)
    for key, value in inferred.items():
        if key == "embedding_size" and family == "bert":
            continue
        if key in merged and merged[key] != value:
            raise TF1CheckpointError(
                f"{config_file}: {key}={merged[key]} but the checkpoint's variables have "
                f"{key}={value}"
            )
        merged[key] = value
    if "num_attention_heads" not in merged:
        if family != "electra":
            raise TF1CheckpointError(
                f"no {CONFIG_FILES[family]} found next to the checkpoint and the number of "
                "attention heads cannot be read from the weights; pass config_file="
            )
        # google-research/electra configure_pretraining.py / get_generator_config: hidden // 64.
        merged["num_attention_heads"] = max(1, merged["hidden_size"] // 64)
        notes.append(f"num_attention_heads={merged['num_attention_heads']} set by ELECTRA's "
                     "rule hidden_size // 64 (no config file)")
    return merged


def _architecture(family: str, sd: dict, generator: bool) -> list[str]:
    if family == "electra":
        if generator:
            return ["ElectraForMaskedLM"]
        return ["ElectraForPreTraining" if "discriminator_predictions.dense.weight" in sd
                else "ElectraModel"]
    prefix = "Bert" if family == "bert" else "Albert"
    mlm = "cls.predictions.bias" if family == "bert" else "predictions.bias"
    nsp = "cls.seq_relationship.weight" if family == "bert" else "sop_classifier.classifier.weight"
    if "classifier.weight" in sd:
        return [f"{prefix}ForSequenceClassification"]
    if "qa_outputs.weight" in sd:
        return [f"{prefix}ForQuestionAnswering"]
    if mlm in sd:
        return [f"{prefix}ForPreTraining" if nsp in sd else f"{prefix}ForMaskedLM"]
    return [f"{prefix}Model"]


def load_tf1_checkpoint(path: str, *, config_file: str | None = None, generator: bool = False,
                        strict: bool = True, verify: bool = True
                        ) -> tuple[dict, dict[str, torch.Tensor], TF1LoadInfo]:
    """Load a TensorFlow-1 checkpoint of Google's BERT, ALBERT or ELECTRA layout.

    ``path``: the checkpoint directory, its prefix (``dir/model.ckpt``), or its ``.index`` or data
    file. ``config_file``: the Google-format config, found next to the checkpoint by default.
    ``generator``: for ELECTRA, load the generator (``ElectraForMaskedLM``) instead of the
    discriminator. ``strict``: raise when a variable is neither a weight of the model, of the
    other ELECTRA network, nor optimizer state (with False they are listed in ``info.unmapped``).
    ``verify``: check every tensor's CRC32C.

    Returns ``(hf_config, state_dict, info)``: the HF config dict (``model_type``,
    ``architectures``, sizes, ``hidden_act``), HF parameter names -> CPU tensors in the stored
    dtype (Linear weights transposed to [out, in]; tied parameters such as
    ``cls.predictions.decoder.weight`` present and sharing storage with their source), and a
    ``TF1LoadInfo``. Raises ``TF1CheckpointError`` for missing, truncated or corrupt files and
    for configs that disagree with the weights."""
    prefix = resolve_prefix(path)
    directory = os.path.dirname(os.path.abspath(prefix))
    reader = BundleReader(prefix, verify=verify)
    training_state = tuple(n for n in reader.entries if is_training_state(n))
    sources: dict[str, Callable[[], np.ndarray]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in reader.entries:
        if is_training_state(name):
            continue
        key = name.removeprefix("module/")  # TF-Hub exports of ALBERT
        sources[key] = lambda name=name: reader.read(name)
        shapes[key] = reader.entries[name].shape
    try:
        family, layout = _detect_layout(list(sources))
    except TF1CheckpointError as e:
        raise TF1CheckpointError(f"{prefix}: {e}") from None
    if generator and family != "electra":
        raise TF1CheckpointError(f"{prefix}: generator=True needs an ELECTRA checkpoint, "
                                 f"this is {family}")
    notes: list[str] = []

    tf_config, config_file = _read_tf_config(
        directory, "albert" if layout == "albert_zh-legacy" else family, generator, config_file,
        notes)

    if layout == "albert_zh-legacy":
        if "num_hidden_layers" not in tf_config:
            raise TF1CheckpointError(f"{prefix}: brightmart albert_zh checkpoint needs its "
                                     "albert_config*.json for num_hidden_layers")
        _legacy_albert_zh(sources, shapes, tf_config["num_hidden_layers"])
        tf_config = {k: v for k, v in tf_config.items() if k != "embedding_size"}
        notes.append("brightmart albert_zh (pre-Google layout) loaded as BERT: word embeddings "
                     "= word_embeddings @ word_embeddings_2, layer_shared copied to every layer")

    untied = any(n.startswith("generator/embeddings/") for n in sources)
    mapping = name_map(family, generator=generator, untied_embeddings=untied)
    scope = "generator" if generator else ("electra" if family == "electra" else "bert")
    emb_scope = scope if (untied or not generator) else "electra"
    sizes = _infer_sizes(shapes, family, scope, emb_scope)
    tf_config = _merge_config(tf_config, sizes, family, config_file, notes)
    if family == "electra" and "embedding_size" not in tf_config:
        tf_config["embedding_size"] = tf_config["hidden_size"]
    try:
        hf_config = hf_config_from_tf(tf_config, family)
    except ValueError as e:
        raise TF1CheckpointError(f"{config_file or prefix}: {e}") from None

    other = name_map("electra", generator=not generator, untied_embeddings=untied) \
        if family == "electra" else None
    state_dict: dict[str, torch.Tensor] = {}
    other_network, unmapped = [], []
    for name in sorted(sources):
        target = mapping.to_hf(name)
        if target is None:
            (other_network if other is not None and other.to_hf(name) else unmapped).append(name)
            continue
        hf_name, transpose = target
        state_dict[hf_name] = _to_torch(sources[name](), transpose)
    if unmapped and strict:
        raise TF1CheckpointError(
            f"{prefix}: {len(unmapped)} variables are not weights of a {family} model nor "
            f"optimizer state: {unmapped[:20]}; pass strict=False to skip them"
        )
    if family == "albert" and "albert.encoder.embedding_hidden_mapping_in.weight" not in state_dict:
        # TF ALBERT creates the mapping only when embedding_size != hidden_size.
        h = hf_config["hidden_size"]
        state_dict["albert.encoder.embedding_hidden_mapping_in.weight"] = torch.eye(h)
        state_dict["albert.encoder.embedding_hidden_mapping_in.bias"] = torch.zeros(h)
        notes.append("embedding_size == hidden_size: embedding_hidden_mapping_in set to identity")
    for tied, source in TIED[family]:
        head = tied.rsplit(".", 2)[0]
        if source in state_dict and any(k.startswith(head + ".") for k in state_dict):
            state_dict[tied] = state_dict[source]
    hf_config["architectures"] = _architecture(family, state_dict, generator)
    if "classifier.weight" in state_dict:
        hf_config["num_labels"] = state_dict["classifier.weight"].shape[0]
    info = TF1LoadInfo(prefix, family, layout, config_file, vocab_file(prefix), training_state,
                       tuple(other_network), tuple(unmapped), tuple(notes))
    return hf_config, state_dict, info
