"""HuggingFace ``transformers`` names: the only module that knows HF parameter and config.json names.

Pure mappings, no model classes and no files (``lub_fast.models.load`` and ``save`` do the IO), for
model_type bert, roberta, albert and electra, following the layouts of ``transformers`` 5
(``modeling_bert.py``, ``modeling_roberta.py``, ``modeling_albert.py``, ``modeling_electra.py``):

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
- ``config.json``: the encoder fields are ``EncoderConfig.from_hf``/``to_hf``; the model's task is its
  ``architectures`` entry (``ARCHITECTURES``), class names are ``id2label``/``label2id``, and a
  sequence classifier's loss is ``problem_type`` (``config_from_hf``, ``config_to_hf``).

Chinese "RoBERTa-wwm" checkpoints are model_type bert and load and save as BERT.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lub_fast.models.config import FAMILIES, EncoderConfig

TASKS = (
    "base",
    "masked_lm",
    "pretraining",
    "discriminator",
    "sequence_classification",
    "token_classification",
    "question_answering",
)
# Tasks whose config.json names their classes (id2label); QA's two outputs are start and end.
LABELLED_TASKS = ("sequence_classification", "token_classification")

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
        if config.classifier_activation is not None:
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
        "base": config.has_pooler,
        "pretraining": True,
        "sequence_classification": config.classifier_activation is None,
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


def head_weights(config: EncoderConfig, task: str) -> dict[str, str]:
    """lub name -> head component (``"pooler"``, ``"mlm"``, ...) of the ``task`` model's head weights:
    what a checkpoint of another task may lack (the loader initialises such a head)."""
    return {lub: comp for comp in _model_components(config, task) for lub, _ in _component_pairs(config, comp)}


@dataclass(frozen=True)
class HFConfig:
    """What an HF ``config.json`` says of a model (see ``config_from_hf``)."""

    encoder: EncoderConfig
    architecture: str | None  # architectures[0]
    task: str | None  # the task of ``architecture``; "base" without one; None: lub_fast has no such model
    num_labels: int  # HF's: len(id2label), else num_labels, else 2
    labels: tuple[str, ...] | None  # id2label's names in id order
    problem_type: str | None


def config_from_hf(hf: dict) -> HFConfig:
    """Read an HF ``config.json`` dict of model_type bert, roberta, albert or electra."""
    architectures = hf.get("architectures") or []
    architecture = architectures[0] if architectures else None
    id2label = hf.get("id2label")
    labels = tuple(id2label[k] for k in sorted(id2label, key=int)) if id2label else None
    return HFConfig(
        encoder=EncoderConfig.from_hf(hf),
        architecture=architecture,
        task=_TASK_OF_ARCHITECTURE.get(architecture) if architecture else "base",
        num_labels=len(labels) if labels else hf.get("num_labels", 2),
        labels=labels,
        problem_type=hf.get("problem_type"),
    )


def config_to_hf(
    config: EncoderConfig,
    task: str,
    num_labels: int | None = None,
    labels: Sequence[str] | None = None,
    problem_type: str | None = None,
) -> dict:
    """The ``config.json`` dict of the ``task`` model: ``config.to_hf()``, ``architectures``, and for
    ``LABELLED_TASKS`` ``id2label``/``label2id`` of ``num_labels`` classes named ``labels`` (``labels[i]``
    names class ``i``; default HF's ``LABEL_i``) and ``problem_type`` when given."""
    hf = config.to_hf()
    hf["architectures"] = [ARCHITECTURES[config.family, task]]
    if task in LABELLED_TASKS:
        names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(num_labels)]
        if len(names) != num_labels:
            raise ValueError(f"{len(names)} label names for a {task} model of {num_labels} classes: {names[:5]}")
        hf["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf["label2id"] = {name: i for i, name in enumerate(names)}
    elif labels is not None:
        raise ValueError(f"labels are for {LABELLED_TASKS} models, not {task}")
    if problem_type is not None:
        hf["problem_type"] = problem_type
    return hf
