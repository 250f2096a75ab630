"""HuggingFace ``transformers`` interop: the only module that knows HF parameter names.

Reads and writes HF directories (``config.json`` + ``model.safetensors``, sharded safetensors, or a
``pytorch_model.bin``, sharded or not, read with ``weights_only=True``) for model_type bert, roberta, albert and
electra, following the layouts of ``transformers`` 5 (``modeling_bert.py``, ``modeling_roberta.py``,
``modeling_albert.py``, ``modeling_electra.py``):

- Q, K and V (``attention.self.query|key|value`` in BERT/RoBERTa/ELECTRA, ``attention.query|...`` in
  ALBERT's ``albert_layer_groups.{g}.albert_layers.{j}``) are concatenated into lub_fast's fused
  ``qkv``; ALBERT's unique layer ``g * inner_group_num + j`` is group ``g``, inner layer ``j``.
- ALBERT's ``encoder.embedding_hidden_mapping_in`` and ELECTRA's ``embeddings_project`` are
  lub_fast's ``embedding_projection``.
- The MLM decoder is tied: HF 5 writes neither ``*.decoder.weight`` nor ``*.decoder.bias`` (tied to
  the word embeddings and to the head's ``bias``); older checkpoints that contain them load when
  they equal what they are tied to. ELECTRA's ``generator_lm_head`` keeps its own bias.
- Old names ``LayerNorm.gamma/beta`` are read as ``weight/bias``; ``position_ids``/``token_type_ids``
  buffers are ignored.

Weights are checked strictly: unknown keys, missing encoder keys and wrong shapes raise one error
that lists them. Weights of a head the target model does not have are dropped with a warning; a head
the checkpoint lacks entirely (HFL's Chinese RoBERTa-wwm releases have no MLM head) is initialised
with a warning. Chinese "RoBERTa-wwm" checkpoints are model_type bert and load and save as BERT.
"""

import json
import os
import stat
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lub_fast.data.tokenizer import (
    VOCAB_FILE,
    VocabularyError,
    bert_tokenizer_config,
    first_difference,
    vocab_bytes,
    vocab_from_files,
)
from lub_fast.models.config import FAMILIES, EncoderConfig
from lub_fast.models.heads import (
    ElectraDiscriminator,
    ElectraPair,
    EncoderModel,
    MaskedLM,
    PreTraining,
    QuestionAnswering,
    SequenceClassification,
    TokenClassification,
)

TASK_CLASSES = {
    "base": EncoderModel,
    "masked_lm": MaskedLM,
    "pretraining": PreTraining,
    "discriminator": ElectraDiscriminator,
    "sequence_classification": SequenceClassification,
    "token_classification": TokenClassification,
    "question_answering": QuestionAnswering,
}

_PREFIX = {"bert": "Bert", "roberta": "Roberta", "albert": "Albert", "electra": "Electra"}
_SUFFIX = {
    "base": "Model",
    "masked_lm": "ForMaskedLM",
    "sequence_classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
    "question_answering": "ForQuestionAnswering",
}
# (family, task) -> HF architecture. ElectraForPreTraining is the discriminator, ElectraForMaskedLM
# the generator.
ARCHITECTURES = {(f, t): _PREFIX[f] + s for f in FAMILIES for t, s in _SUFFIX.items()}
ARCHITECTURES.update(
    {
        ("bert", "pretraining"): "BertForPreTraining",
        ("albert", "pretraining"): "AlbertForPreTraining",
        ("electra", "discriminator"): "ElectraForPreTraining",
    }
)
_TASK_OF_ARCHITECTURE = {arch: task for (_, task), arch in ARCHITECTURES.items()}

# Head components of each task; "pooler" is part of the encoder but present only in some models.
_COMPONENTS = {
    "base": ("pooler",),
    "masked_lm": ("mlm",),
    "pretraining": ("pooler", "mlm", "pair"),
    "discriminator": ("rtd",),
    "sequence_classification": ("pooler", "seq_classifier"),
    "token_classification": ("token_classifier",),
    "question_answering": ("qa",),
}

TOKENIZER_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

_PARAMS = ("weight", "bias")


def _linear(lub: str, hf: str) -> list[tuple[str, str]]:
    return [(f"{lub}.{p}", f"{hf}.{p}") for p in _PARAMS]


def _encoder_pairs(config: EncoderConfig) -> list[tuple[str, str | tuple[str, str, str]]]:
    """(lub name, HF name without the base prefix) for the encoder without pooler; the fused ``qkv``
    maps to a (query, key, value) triple."""
    pairs = [
        ("encoder.embeddings.word.weight", "embeddings.word_embeddings.weight"),
        ("encoder.embeddings.position.weight", "embeddings.position_embeddings.weight"),
        ("encoder.embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"),
        *_linear("encoder.embeddings.norm", "embeddings.LayerNorm"),
    ]
    if config.has_embedding_projection:
        hf = "encoder.embedding_hidden_mapping_in" if config.family == "albert" else "embeddings_project"
        pairs += _linear("encoder.embedding_projection", hf)
    if config.family == "albert":
        names = dict(
            query="attention.query", key="attention.key", value="attention.value",
            attn_out="attention.dense", attn_norm="attention.LayerNorm",
            ffn_in="ffn", ffn_out="ffn_output", ffn_norm="full_layer_layer_norm",
        )  # fmt: skip
    else:
        names = dict(
            query="attention.self.query", key="attention.self.key", value="attention.self.value",
            attn_out="attention.output.dense", attn_norm="attention.output.LayerNorm",
            ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm",
        )  # fmt: skip
    for k in range(config.num_unique_layers):
        if config.family == "albert":
            group, inner = divmod(k, config.inner_group_num)
            hf = f"encoder.albert_layer_groups.{group}.albert_layers.{inner}."
        else:
            hf = f"encoder.layer.{k}."
        lub = f"encoder.layers.{k}."
        for p in _PARAMS:
            pairs.append((f"{lub}qkv.{p}", tuple(f"{hf}{names[x]}.{p}" for x in ("query", "key", "value"))))
        for part in ("attn_out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm"):
            pairs += _linear(lub + part, hf + names[part])
    return pairs


def _component_pairs(config: EncoderConfig, component: str) -> list[tuple[str, str]]:
    """(lub name, top-level HF name) of one head component; [] where the family has none."""
    family = config.family
    if component == "pooler":
        hf = {"bert": "pooler.dense", "roberta": "pooler.dense", "albert": "pooler"}.get(family)
        return _linear("encoder.pooler", f"{family}.{hf}") if hf else []
    if component == "mlm":
        dense, norm, bias = {
            "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias"),
            "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
            "albert": ("predictions.dense", "predictions.LayerNorm", "predictions.bias"),
            "electra": ("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head.bias"),
        }[family]
        return _linear("mlm.dense", dense) + _linear("mlm.norm", norm) + [("mlm.bias", bias)]
    if component == "pair":
        hf = {"bert": "cls.seq_relationship", "albert": "sop_classifier.classifier"}.get(family)
        return _linear("pair", hf) if hf else []
    if component == "rtd":
        if family != "electra":
            return []
        return _linear("rtd.dense", "discriminator_predictions.dense") + _linear(
            "rtd.out", "discriminator_predictions.dense_prediction"
        )
    if component == "seq_classifier":
        if family in ("roberta", "electra"):
            return _linear("classifier.dense", "classifier.dense") + _linear("classifier.out", "classifier.out_proj")
        return _linear("classifier.out", "classifier")
    if component == "token_classifier":
        return _linear("classifier", "classifier")
    if component == "qa":
        return _linear("qa", "qa_outputs")
    raise ValueError(f"unknown head component {component!r}")


def _tied_aliases(config: EncoderConfig) -> dict[str, str]:
    """Top-level HF names that older checkpoints store for tied tensors -> the lub name they equal."""
    root = {"bert": "cls.predictions.decoder", "roberta": "lm_head.decoder", "albert": "predictions.decoder"}
    if config.family == "electra":
        return {"generator_lm_head.weight": "encoder.embeddings.word.weight"}
    decoder = root[config.family]
    return {f"{decoder}.weight": "encoder.embeddings.word.weight", f"{decoder}.bias": "mlm.bias"}


_ALL_COMPONENTS = ("pooler", "mlm", "pair", "rtd", "seq_classifier", "token_classifier", "qa")
# BERT/ALBERT sequence and token classifiers are both HF "classifier": which one a checkpoint holds
# is known only from its architecture.
_AMBIGUOUS = ("seq_classifier", "token_classifier")


def _model_components(config: EncoderConfig, task: str) -> tuple[str, ...]:
    comps = _COMPONENTS[task]
    has_pooler = {
        "base": config.family != "electra",
        "pretraining": True,
        "sequence_classification": config.family in ("bert", "albert"),
    }.get(task, False)
    return tuple(c for c in comps if c != "pooler" or has_pooler)


def _normalise(name: str) -> str:
    if name.endswith(".gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[: -len("beta")] + "bias"
    return name


def hf_to_lub(
    state_dict: dict[str, Tensor], config: EncoderConfig, task: str, source_task: str | None = None
) -> dict[str, Tensor]:
    """HF-named tensors -> lub_fast names for the model of ``task``.

    ``state_dict``: an HF model's tensors (with or without the base prefix ``bert.``/``roberta.``/
    ``albert.``/``electra.``). ``source_task``: the task of the checkpoint's architecture, when known
    (it tells a sequence from a token ``classifier``). Head weights that the ``task`` model has no
    place for are dropped with a warning. Raises ``ValueError`` listing unknown keys,
    duplicates, shape mismatches of the fused QKV parts, and tied tensors that differ from their tie.
    Returns only the keys present (missing keys are the loader's business).
    """
    prefix = config.family + "."
    names: dict[str, str] = {}
    for raw in state_dict:
        name = _normalise(raw)
        if name.endswith(("position_ids", "token_type_ids")) and "embeddings." in name:
            continue  # buffers of old HF versions, not weights
        if name.startswith(prefix) and not name.startswith(f"{prefix}pooler"):
            name = name[len(prefix) :]
        elif not name.startswith(prefix) and name.startswith("pooler."):
            name = prefix + name  # bare-model checkpoint
        if name in names:
            raise ValueError(f"duplicate weights for {name!r}: {names[name]!r} and {raw!r}")
        names[name] = raw

    target = _model_components(config, task)
    source = _COMPONENTS[source_task] if source_task is not None else target
    order = list(dict.fromkeys([*source, *target, *_ALL_COMPONENTS]))
    owner: dict[str, tuple[str, str]] = {}  # HF name -> (component, lub name)
    for comp in order:
        for lub, hf in _component_pairs(config, comp):
            owner.setdefault(hf, (comp, lub))

    out: dict[str, Tensor] = {}
    unexpected, dropped = [], []
    used = set()
    for lub, hf in _encoder_pairs(config):
        parts = hf if isinstance(hf, tuple) else (hf,)
        present = [p for p in parts if p in names]
        if not present:
            continue
        if len(present) != len(parts):
            missing = sorted(set(parts) - set(present))
            raise ValueError(f"incomplete attention weights: missing {missing}")
        tensors = [state_dict[names[p]] for p in parts]
        out[lub] = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
        used.update(parts)
    aliases = _tied_aliases(config)
    alias_values = {}
    for name in names:
        if name in used:
            continue
        if name in aliases:
            alias_values[name] = state_dict[names[name]]
        elif name in owner:
            comp, lub = owner[name]
            if comp in target and (comp in source or comp not in _AMBIGUOUS):
                out[lub] = state_dict[names[name]]
            else:
                dropped.append(names[name])
        else:
            unexpected.append(names[name])
    if unexpected:
        hint = ""
        for other in FAMILIES:
            if other != config.family and any(k.startswith(other + ".") for k in unexpected):
                hint = f" (these look like {other} weights; the config says model_type {config.family!r})"
        shown = ", ".join(sorted(unexpected)[:20])
        raise ValueError(f"{len(unexpected)} unexpected weights for a {config.family} model{hint}: {shown}")
    for hf, value in alias_values.items():
        tied = out.get(aliases[hf])
        if tied is not None and (tied.shape != value.shape or not torch.equal(tied, value)):
            raise ValueError(f"{hf!r} is tied to {aliases[hf]!r} in lub_fast but the checkpoint's values differ")
    if dropped:
        warnings.warn(
            f"lub_fast: dropped {len(dropped)} weights of heads the {task} model does not have: "
            + ", ".join(sorted(dropped)),
            stacklevel=3,
        )
    return out


def lub_to_hf(state_dict: dict[str, Tensor], config: EncoderConfig, task: str) -> dict[str, Tensor]:
    """lub_fast names -> the names HF 5's ``save_pretrained`` writes for ``ARCHITECTURES[family, task]``
    (base prefix except for the bare ``base`` model; tied decoder tensors omitted)."""
    prefix = "" if task == "base" else config.family + "."
    table = {
        lub: tuple(prefix + h for h in hf) if isinstance(hf, tuple) else prefix + hf
        for lub, hf in _encoder_pairs(config)
    }
    for comp in _model_components(config, task):
        for lub, hf in _component_pairs(config, comp):
            table[lub] = prefix + hf.split(".", 1)[1] if comp == "pooler" else hf
    out, unknown = {}, []
    for lub, tensor in state_dict.items():
        hf = table.get(lub)
        if hf is None:
            unknown.append(lub)
        elif isinstance(hf, tuple):
            out.update(zip(hf, tensor.chunk(3, dim=0)))
        else:
            out[hf] = tensor
    if unknown:
        raise ValueError(f"lub_to_hf: no HF name for {sorted(unknown)} in a {config.family} {task} model")
    return out


def _read_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of an HF directory, in ``transformers``' order of preference: ``model.safetensors``,
    sharded safetensors (``model.safetensors.index.json``), ``pytorch_model.bin``, sharded PyTorch
    (``pytorch_model.bin.index.json``, as transformers 4 writes above ``max_shard_size``). ``.bin``
    files are read with ``torch.load(weights_only=True)``; a shard index must name exactly the
    tensors its shards hold."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    bin_single = path / "pytorch_model.bin"
    bin_index = path / "pytorch_model.bin.index.json"
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        return _read_sharded(index, _read_safetensors)
    if bin_single.exists():
        return _read_bin(bin_single)
    if bin_index.exists():
        return _read_sharded(bin_index, _read_bin)
    raise FileNotFoundError(
        f"{path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt? ({e})") from e


def _read_bin(file: Path) -> dict[str, Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors of a truncated or foreign file
        raise ValueError(f"{file}: cannot read PyTorch weights ({type(e).__name__}: {e})") from e


def _read_sharded(index: Path, read) -> dict[str, Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a shard index (a JSON object with a \"weight_map\"): {e}") from None
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        file = index.parent / shard
        if not file.exists():
            raise ValueError(f"{index} names the shard {shard}, which is missing: copy every shard of the checkpoint")
        held = read(file)
        misplaced = sorted(k for k in held if weight_map.get(k) != shard)
        if misplaced:
            raise ValueError(f"{file} holds {len(misplaced)} tensors that {index.name} does not place there: {misplaced[:5]}")
        tensors.update(held)
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise ValueError(f"{index} lists {len(absent)} tensors that its shards lack: {absent[:5]}")
    return tensors


def _load_into(model, hf_tensors: dict[str, Tensor], source_task: str | None, origin: str) -> None:
    cfg = model.config
    converted = hf_to_lub(hf_tensors, cfg, model.task, source_task)
    expected = model.state_dict()
    comp_of = {}
    for comp in _model_components(cfg, model.task):
        for lub, _ in _component_pairs(cfg, comp):
            comp_of[lub] = comp
    missing = [k for k in expected if k not in converted]
    wrong_shape = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(v.shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    absent_heads = {comp_of[k] for k in missing if k in comp_of}
    absent_heads = {c for c in absent_heads if not any(comp_of.get(k) == c for k in converted)}
    hard_missing = [k for k in missing if comp_of.get(k) not in absent_heads]
    problems = []
    if hard_missing:
        problems.append(f"missing weights: {', '.join(hard_missing)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {'; '.join(wrong_shape)}")
    if problems:
        raise ValueError(f"{origin}: cannot load into {type(model).__name__} ({cfg.family}): " + " | ".join(problems))
    if absent_heads:
        warnings.warn(
            f"lub_fast: {origin} has no weights for {sorted(absent_heads)} of {type(model).__name__}; "
            "initialised them" + (" (the MLM decoder is tied to the word embeddings)" if "mlm" in absent_heads else ""),
            stacklevel=3,
        )
    merged = {k: converted.get(k, v) for k, v in expected.items()}
    model.load_state_dict(merged, strict=True)


def from_hf(hf_config: dict, hf_tensors: dict[str, Tensor], task: str | None = None,
            num_labels: int | None = None, origin: str = "checkpoint"):
    """Build the lub_fast model of an HF ``config.json`` dict and HF-named tensors (strictly checked;
    see the module docstring). ``task`` and ``num_labels`` as in ``from_pretrained``."""
    config = EncoderConfig.from_hf(hf_config)
    architectures = hf_config.get("architectures") or []
    source_task = _TASK_OF_ARCHITECTURE.get(architectures[0]) if architectures else "base"
    if architectures and source_task is None and task is None:
        supported = sorted(a for (f, _), a in ARCHITECTURES.items() if f == config.family)
        raise ValueError(
            f"{origin}: architecture {architectures[0]!r} is not supported ({supported}); pass "
            f"task= one of {sorted(TASK_CLASSES)} to load its encoder under another head"
        )
    if task is None:
        task = source_task
    if task not in TASK_CLASSES:
        raise ValueError(f"task must be one of {sorted(TASK_CLASSES)}, got {task!r}")
    if (config.family, task) not in ARCHITECTURES:
        raise ValueError(f"{config.family} has no {task} model")
    kwargs = {}
    id2label = hf_config.get("id2label")
    if task in ("sequence_classification", "token_classification"):
        labels = num_labels or (len(id2label) if id2label else hf_config.get("num_labels", 2))
        kwargs["num_labels"] = labels
        if task == "sequence_classification":
            kwargs["problem_type"] = hf_config.get("problem_type")
    model = TASK_CLASSES[task](config, **kwargs)
    if id2label and task == source_task and len(id2label) == getattr(model, "num_labels", None):
        model.id2label = {int(i): name for i, name in id2label.items()}
    _load_into(model, hf_tensors, source_task, origin)
    return model


def from_pretrained(path, task: str | None = None, num_labels: int | None = None):
    """Load an HF directory of model_type bert, roberta, albert or electra, or a TensorFlow-1
    checkpoint (Google's BERT/ALBERT/ELECTRA layout: a directory or a ``model.ckpt`` prefix with its
    ``bert_config.json``/``albert_config.json``, or a ``config.json`` without HF's ``model_type``
    next to ``*.index`` files; read by ``lub_fast.tf1`` without TensorFlow).

    ``task`` (a key of ``TASK_CLASSES``) defaults to the one of ``config.json``'s ``architectures``
    (no architectures: ``"base"``); giving another task loads the encoder and initialises the new head
    (with a warning). ``num_labels`` overrides the checkpoint's for classification tasks. Tokenizer
    files in the directory (a TF-1 checkpoint's ``vocab.txt``) are kept in ``model.tokenizer_files``
    and written back by ``save_pretrained``; where there is no ``vocab.txt``, the WordPiece vocabulary
    of ``tokenizer.json`` (what ``transformers`` 5 saves) becomes one. Raises ``VocabularyError`` for a
    ``tokenizer.json`` that is not WordPiece or disagrees with ``vocab.txt``.
    """
    path = Path(path)
    config_file = path / "config.json"
    if _is_tf1(path):
        return _from_tf1(path, task, num_labels)
    hf_config = json.loads(config_file.read_text())
    if hf_config.get("model_type") not in FAMILIES:
        raise ValueError(f"{config_file}: unsupported HF model_type {hf_config.get('model_type')!r}; lub_fast loads {FAMILIES}")
    files = {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).exists()}
    tokens = vocab_from_files(files, str(path))
    model = from_hf(hf_config, _read_weights(path), task, num_labels, origin=str(path))
    if tokens is not None and VOCAB_FILE not in files:
        files[VOCAB_FILE] = vocab_bytes(tokens)  # the WordPiece vocabulary of tokenizer.json
    model.tokenizer_files.update(files)
    return model


def _is_tf1(path: Path) -> bool:
    """What ``from_pretrained`` reads as a TF-1 checkpoint: no ``config.json``, or Google's layout
    (``*.index`` files and a ``config.json`` that is a TF config, without HF's ``model_type``)."""
    config_file = path / "config.json"
    if not config_file.exists():
        return True
    try:
        has_model_type = "model_type" in json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False  # from_pretrained reports the unreadable config.json
    return not has_model_type and any(path.glob("*.index"))


def tf1_family(path) -> tuple[str, bool] | None:
    """For what ``from_pretrained`` reads as a TF-1 checkpoint: ``(family, holds an ELECTRA
    generator)`` from its index alone; None for anything else (an HF directory, a missing path)."""
    from lub_fast.tf1.convert import checkpoint_family

    return checkpoint_family(str(path)) if _is_tf1(Path(path)) else None


def _from_tf1(path: Path, task: str | None, num_labels: int | None):
    from lub_fast.tf1 import TF1CheckpointError, load_tf1_checkpoint
    from lub_fast.tf1.convert import resolve_prefix

    try:
        resolve_prefix(str(path))
    except (TF1CheckpointError, OSError):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such directory or checkpoint") from None
        raise FileNotFoundError(
            f"{path}: no config.json (not an HF model directory) and no TF-1 checkpoint (*.index)"
        ) from None
    hf_config, tensors, info = load_tf1_checkpoint(path)
    model = from_hf(hf_config, tensors, task, num_labels, origin=info.prefix)
    if info.vocab_file:
        model.tokenizer_files["vocab.txt"] = Path(info.vocab_file).read_bytes()
    return model


def _new_file_mode(directory: Path) -> int:
    """The permission bits ``open`` gives a new file in ``directory`` (0666 less the umask, or the
    directory's default ACL), read from a probe file, since the umask cannot be read without
    setting it."""
    probe = directory / f".mode-probe-{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)


def save_pretrained(model, path) -> None:
    """Write ``model`` as an HF directory that the matching ``transformers`` Auto class loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf_config = cfg.to_hf()
    hf_config["architectures"] = [ARCHITECTURES[cfg.family, model.task]]
    num_labels = getattr(model, "num_labels", None)
    if num_labels is not None and model.task != "question_answering":
        names = getattr(model, "id2label", None) or {i: f"LABEL_{i}" for i in range(num_labels)}
        hf_config["id2label"] = {str(i): names[i] for i in range(num_labels)}
        hf_config["label2id"] = {names[i]: i for i in range(num_labels)}
    if getattr(model, "problem_type", None):
        hf_config["problem_type"] = model.problem_type
    tensors = lub_to_hf(model.state_dict(), cfg, model.task)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    os.chmod(path / "model.safetensors", _new_file_mode(path))  # safetensors leaves its 0600 temporary's mode
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for name, data in _export_tokenizer_files(model, path).items():
        (path / name).write_bytes(data)


def _electra_pair_from_tf1(path) -> tuple[ElectraDiscriminator, MaskedLM]:
    """(discriminator, generator) of a TF-1 ELECTRA checkpoint holding both, each of its own size
    (the generator's read from its ``generator/...`` variables)."""
    from lub_fast.tf1 import TF1CheckpointError, load_tf1_checkpoint

    disc_config, disc_tensors, info = load_tf1_checkpoint(path)
    if info.family != "electra":
        raise TF1CheckpointError(f"{info.prefix}: a {info.family} checkpoint, not an ELECTRA pair")
    if not any(n.startswith(("generator/", "generator_predictions/")) for n in info.other_network):
        raise TF1CheckpointError(
            f"{info.prefix}: this ELECTRA checkpoint holds no generator (no generator/... "
            "variables; a discriminator-only export); pass DISC_DIR,GEN_DIR HF directories"
        )
    gen_config, gen_tensors, _ = load_tf1_checkpoint(path, generator=True)
    disc = from_hf(disc_config, disc_tensors, "discriminator", origin=info.prefix)
    gen = from_hf(gen_config, gen_tensors, "masked_lm", origin=f"{info.prefix} (generator)")
    if info.vocab_file:
        for model in (disc, gen):
            model.tokenizer_files["vocab.txt"] = Path(info.vocab_file).read_bytes()
    return disc, gen


def _export_tokenizer_files(model, path: Path) -> dict[str, bytes]:
    """``model.tokenizer_files`` checked to agree (vocab.txt and tokenizer.json, see
    ``lub_fast.data.tokenizer.vocab_from_files``), with BERT's ``tokenizer_config.json`` added beside a
    vocab.txt that has none, a ``tokenizer_class`` where it names none (``AutoTokenizer`` would pick the
    family's own, SentencePiece for ALBERT), and ``model_max_length`` at most the model's positions."""
    files = dict(model.tokenizer_files)
    if vocab_from_files(files, str(path)) is None:
        return files
    positions = model.config.max_position_embeddings - model.config.position_offset
    settings = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else bert_tokenizer_config(positions)
    fixed = dict(settings)
    fixed.setdefault("tokenizer_class", "BertTokenizer")
    if not isinstance(fixed.get("model_max_length"), int) or fixed["model_max_length"] > positions:
        fixed["model_max_length"] = positions
    if fixed != settings or "tokenizer_config.json" not in files:
        files["tokenizer_config.json"] = (json.dumps(fixed, indent=2) + "\n").encode()
    return files


def from_pretrained_electra_pair(discriminator_path, generator_path=None) -> ElectraPair:
    """Load an ELECTRA discriminator (``ElectraForPreTraining``) and generator (``ElectraForMaskedLM``)
    directory into one ``ElectraPair`` sharing the embeddings; without ``generator_path``,
    ``discriminator_path`` is a TF-1 ELECTRA checkpoint that holds both (google-research/electra's
    pretraining checkpoints). Raises when the two checkpoints' embeddings differ (they are one
    tensor set in ELECTRA pretraining)."""
    if generator_path is None:
        disc, gen = _electra_pair_from_tf1(discriminator_path)
    else:
        disc = from_pretrained(discriminator_path, task="discriminator")
        gen = from_pretrained(generator_path, task="masked_lm")
    if gen.config.family != "electra" or disc.config.family != "electra":
        raise ValueError("from_pretrained_electra_pair: both directories must be model_type electra")
    differing = [
        name
        for name, t in disc.encoder.embeddings.state_dict().items()
        if gen.encoder.embeddings.state_dict()[name].shape != t.shape
        or not torch.equal(gen.encoder.embeddings.state_dict()[name], t)
    ]
    if differing:
        raise ValueError(
            f"from_pretrained_electra_pair: generator and discriminator embeddings differ in {differing}; "
            "ELECTRA shares them"
        )
    generator_origin = generator_path if generator_path is not None else f"{discriminator_path} (generator)"
    vocabs = [vocab_from_files(m.tokenizer_files, str(p)) for m, p in ((disc, discriminator_path), (gen, generator_origin))]
    if None not in vocabs and vocabs[0] != vocabs[1]:
        raise VocabularyError(
            f"from_pretrained_electra_pair: {discriminator_path} and {generator_origin} have different vocabularies "
            f"({first_difference(*vocabs, 'the discriminator', 'the generator')}); ELECTRA's two models share one"
        )
    return ElectraPair(gen, disc)
