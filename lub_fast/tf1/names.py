"""Google's TensorFlow-1 variable names <-> HuggingFace transformers parameter names, and configs.

Sources of the TF names: google-research/bert ``modeling.py`` and ``run_pretraining.py``
(``bert/...``, ``cls/predictions/...``, ``cls/seq_relationship/...``; ``run_classifier.py``'s
top-level ``output_weights``/``output_bias``; ``run_squad.py``'s ``cls/squad/...``),
google-research/albert ``modeling.py`` (``bert/encoder/embedding_hidden_mapping_in``,
``bert/encoder/transformer/group_G/inner_group_I/{attention_1,LayerNorm,ffn_1,LayerNorm_1}``;
TF-Hub exports prefix ``module/``), google-research/electra ``model/modeling.py`` and
``run_pretraining.py`` (``electra/...``, ``electra/embeddings_project``,
``discriminator_predictions/dense{,_1}``, ``generator_predictions/{dense,LayerNorm,output_bias}``;
the generator's transformer under ``generator/``, its embeddings shared under
``electra/embeddings`` unless ``untied_generator_embeddings``). The HF side follows
``BertForPreTraining``, ``AlbertForPreTraining``, ``ElectraForPreTraining`` and
``ElectraForMaskedLM`` of transformers 5, cross-checked against transformers 4's
``load_tf_weights_in_{bert,albert,electra}``.

TF dense kernels are [in, out] and HF ``nn.Linear`` weights [out, in]: rules say which to
transpose. The ``output_weights`` of the NSP/SOP, classifier and SQuAD heads are already
[out, in].
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FAMILIES = ("bert", "albert", "electra")
# The files of Google's checkpoint directories.
CONFIG_FILES = {"bert": "bert_config.json", "albert": "albert_config.json",
                "electra": "discriminator_config.json"}
GENERATOR_CONFIG_FILE = "generator_config.json"
CHECKPOINT_NAME = "model.ckpt"

# Path components or whole names that are optimizer or training state, never model weights:
# Google's AdamWeightDecayOptimizer (adam_m/adam_v), ALBERT's LAMB (lamb_m/lamb_v), tf.train
# optimizers' slots, mixed-precision loss scaling, and the object graph of tf.train.Checkpoint.
_SLOT_COMPONENTS = frozenset({
    "adam_m", "adam_v", "lamb_m", "lamb_v", "Adam", "Adam_1", "LAMB", "LAMB_1", "Momentum",
    "RMSProp", "RMSProp_1", "Adagrad", "Adadelta", "Adadelta_1", "AdamWeightDecayOptimizer",
    "AdamWeightDecayOptimizer_1", "ExponentialMovingAverage", "global_step", "beta1_power",
    "beta2_power", "loss_scale", "current_loss_scale", "good_steps",
    "_CHECKPOINTABLE_OBJECT_GRAPH",
})


def is_training_state(tf_name: str) -> bool:
    """True for optimizer slots and counters (``.../adam_m``, ``global_step``, ...)."""
    return any(part in _SLOT_COMPONENTS for part in tf_name.split("/"))


@dataclass(frozen=True)
class NameRule:
    """One TF variable <-> one HF parameter; ``{i}``/``{j}`` stand for layer/group indices."""

    tf: str
    hf: str
    transpose: bool


def _dense(tf: str, hf: str) -> list[NameRule]:
    return [NameRule(f"{tf}/kernel", f"{hf}.weight", True),
            NameRule(f"{tf}/bias", f"{hf}.bias", False)]


def _norm(tf: str, hf: str) -> list[NameRule]:
    return [NameRule(f"{tf}/gamma", f"{hf}.weight", False),
            NameRule(f"{tf}/beta", f"{hf}.bias", False)]


def _embeddings(tf: str, hf: str) -> list[NameRule]:
    return [
        NameRule(f"{tf}/word_embeddings", f"{hf}.word_embeddings.weight", False),
        NameRule(f"{tf}/token_type_embeddings", f"{hf}.token_type_embeddings.weight", False),
        NameRule(f"{tf}/position_embeddings", f"{hf}.position_embeddings.weight", False),
        *_norm(f"{tf}/LayerNorm", f"{hf}.LayerNorm"),
    ]


def _bert_layer(tf: str, hf: str) -> list[NameRule]:
    return [
        *_dense(f"{tf}/attention/self/query", f"{hf}.attention.self.query"),
        *_dense(f"{tf}/attention/self/key", f"{hf}.attention.self.key"),
        *_dense(f"{tf}/attention/self/value", f"{hf}.attention.self.value"),
        *_dense(f"{tf}/attention/output/dense", f"{hf}.attention.output.dense"),
        *_norm(f"{tf}/attention/output/LayerNorm", f"{hf}.attention.output.LayerNorm"),
        *_dense(f"{tf}/intermediate/dense", f"{hf}.intermediate.dense"),
        *_dense(f"{tf}/output/dense", f"{hf}.output.dense"),
        *_norm(f"{tf}/output/LayerNorm", f"{hf}.output.LayerNorm"),
    ]


def _classifier() -> list[NameRule]:
    # run_classifier.py's head: [num_labels, hidden], i.e. already nn.Linear's layout.
    return [
        NameRule("output_weights", "classifier.weight", False),
        NameRule("output_bias", "classifier.bias", False),
    ]


def _squad() -> list[NameRule]:
    # run_squad.py's span head (also HFL's CMRC 2018 baselines): [2, hidden], start then end.
    return [
        NameRule("cls/squad/output_weights", "qa_outputs.weight", False),
        NameRule("cls/squad/output_bias", "qa_outputs.bias", False),
    ]


def _bert_rules() -> list[NameRule]:
    return [
        *_embeddings("bert/embeddings", "bert.embeddings"),
        *_bert_layer("bert/encoder/layer_{i}", "bert.encoder.layer.{i}"),
        *_dense("bert/pooler/dense", "bert.pooler.dense"),
        *_dense("cls/predictions/transform/dense", "cls.predictions.transform.dense"),
        *_norm("cls/predictions/transform/LayerNorm", "cls.predictions.transform.LayerNorm"),
        NameRule("cls/predictions/output_bias", "cls.predictions.bias", False),
        NameRule("cls/seq_relationship/output_weights", "cls.seq_relationship.weight", False),
        NameRule("cls/seq_relationship/output_bias", "cls.seq_relationship.bias", False),
        *_classifier(),
        *_squad(),
    ]


def _albert_rules() -> list[NameRule]:
    g = "bert/encoder/transformer/group_{i}/inner_group_{j}"
    h = "albert.encoder.albert_layer_groups.{i}.albert_layers.{j}"
    return [
        *_embeddings("bert/embeddings", "albert.embeddings"),
        *_dense("bert/encoder/embedding_hidden_mapping_in",
                "albert.encoder.embedding_hidden_mapping_in"),
        *_dense(f"{g}/attention_1/self/query", f"{h}.attention.query"),
        *_dense(f"{g}/attention_1/self/key", f"{h}.attention.key"),
        *_dense(f"{g}/attention_1/self/value", f"{h}.attention.value"),
        *_dense(f"{g}/attention_1/output/dense", f"{h}.attention.dense"),
        *_norm(f"{g}/LayerNorm", f"{h}.attention.LayerNorm"),
        *_dense(f"{g}/ffn_1/intermediate/dense", f"{h}.ffn"),
        *_dense(f"{g}/ffn_1/intermediate/output/dense", f"{h}.ffn_output"),
        *_norm(f"{g}/LayerNorm_1", f"{h}.full_layer_layer_norm"),
        *_dense("bert/pooler/dense", "albert.pooler"),
        *_dense("cls/predictions/transform/dense", "predictions.dense"),
        *_norm("cls/predictions/transform/LayerNorm", "predictions.LayerNorm"),
        NameRule("cls/predictions/output_bias", "predictions.bias", False),
        NameRule("cls/seq_relationship/output_weights", "sop_classifier.classifier.weight", False),
        NameRule("cls/seq_relationship/output_bias", "sop_classifier.classifier.bias", False),
        *_classifier(),
    ]


def _electra_rules(scope: str, embedding_scope: str, generator: bool) -> list[NameRule]:
    rules = [
        *_embeddings(f"{embedding_scope}/embeddings", "electra.embeddings"),
        *_dense(f"{scope}/embeddings_project", "electra.embeddings_project"),
        *_bert_layer(f"{scope}/encoder/layer_{{i}}", "electra.encoder.layer.{i}"),
    ]
    if generator:
        return rules + [
            *_dense("generator_predictions/dense", "generator_predictions.dense"),
            *_norm("generator_predictions/LayerNorm", "generator_predictions.LayerNorm"),
            NameRule("generator_predictions/output_bias", "generator_lm_head.bias", False),
        ]
    return rules + [
        *_dense("discriminator_predictions/dense", "discriminator_predictions.dense"),
        *_dense("discriminator_predictions/dense_1", "discriminator_predictions.dense_prediction"),
    ]


# HF parameters that transformers ties to another one: (tied name, source name).
TIED = {
    "bert": (("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
             ("cls.predictions.decoder.bias", "cls.predictions.bias")),
    "albert": (("predictions.decoder.weight", "albert.embeddings.word_embeddings.weight"),
               ("predictions.decoder.bias", "predictions.bias")),
    "electra": (("generator_lm_head.weight", "electra.embeddings.word_embeddings.weight"),),
}


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(escaped + "$")


class NameMap:
    """Bidirectional mapping for one model: ``to_hf(tf_name)`` and ``to_tf(hf_name)`` return
    ``(name, transpose)`` or ``None`` when the name is not a weight of this model."""

    def __init__(self, rules: list[NameRule]):
        self.rules = tuple(rules)
        self._tf = [(_pattern(r.tf), r) for r in self.rules]
        self._hf = [(_pattern(r.hf), r) for r in self.rules]

    @staticmethod
    def _match(table, name: str, target: str) -> tuple[str, bool] | None:
        for pattern, rule in table:
            m = pattern.match(name)
            if m:
                return getattr(rule, target).format(**m.groupdict()), rule.transpose
        return None

    def to_hf(self, tf_name: str) -> tuple[str, bool] | None:
        return self._match(self._tf, tf_name, "hf")

    def to_tf(self, hf_name: str) -> tuple[str, bool] | None:
        return self._match(self._hf, hf_name, "tf")


def name_map(family: str, *, generator: bool = False, untied_embeddings: bool = False) -> NameMap:
    """The ``NameMap`` of a family. For ``electra``, ``generator=True`` maps the generator
    (``ElectraForMaskedLM``); its embeddings are the discriminator's ``electra/embeddings``
    unless ``untied_embeddings`` (then ``generator/embeddings``)."""
    if family == "bert":
        return NameMap(_bert_rules())
    if family == "albert":
        return NameMap(_albert_rules())
    if family == "electra":
        if generator:
            embedding_scope = "generator" if untied_embeddings else "electra"
            return NameMap(_electra_rules("generator", embedding_scope, True))
        return NameMap(_electra_rules("electra", "electra", False))
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


# --------------------------------------------------------------------------------------------
# Configs

_ARCH_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings", "type_vocab_size")
_DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
MODEL_TYPES = {"bert": "bert", "albert": "albert", "electra": "electra"}


# Key added to configs we write when the HF activation is not what "gelu" reads as (a tanh-GELU
# model): Google's BertConfig and bert4keras ignore it, our
# reader restores it, so HF -> TF -> HF keeps the activation (likewise "layer_norm_eps" when it
# is not TF's 1e-12).
HF_ACT_KEY = "lub_fast_hidden_act"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_ERF_GELUS = ("gelu", "gelu_python")


def hf_hidden_act(tf_config: dict, family: str) -> str:
    """HF ``hidden_act`` for the config's ``hidden_act``, as transformers' own converters map it.

    google-research/bert and google-research/albert compute their "gelu" with the tanh
    approximation (HF's "gelu_new"), google-research/electra with erf. transformers' converters,
    and so every released Chinese checkpoint on the HF hub, read "gelu" as the exact erf GELU: we do
    the same, so that a TF checkpoint and its HF conversion give identical outputs (the TF graph
    itself differs from both by up to about 1e-3 per activation for BERT and ALBERT)."""
    if HF_ACT_KEY in tf_config:
        return tf_config[HF_ACT_KEY]
    act = tf_config.get("hidden_act", "gelu").lower()
    if act == "gelu":
        return "gelu"
    if act in ("relu", "tanh"):
        return act
    raise ValueError(f"unsupported hidden_act {act!r} in the TF config (Google's code has "
                     "gelu, relu, tanh)")


def tf_hidden_act(hf_act: str, family: str) -> dict:
    """Config entries (``hidden_act``, and ``HF_ACT_KEY`` when needed) for an HF activation."""
    native = _ERF_GELUS
    if hf_act in native or hf_act in ("relu", "tanh"):
        return {"hidden_act": "gelu" if hf_act in native else hf_act}
    if hf_act in _ERF_GELUS + _TANH_GELUS:
        return {"hidden_act": "gelu", HF_ACT_KEY: hf_act}
    raise ValueError(f"hidden_act {hf_act!r} has no equivalent in Google's {family} TF code")


def hf_config_from_tf(tf_config: dict, family: str) -> dict:
    """HF config dict (``model_type`` and the fields ``transformers`` reads) from a Google
    ``bert_config.json`` / ``albert_config.json`` / ELECTRA discriminator or generator config."""
    missing = [k for k in _ARCH_SIZES if k not in tf_config]
    if missing:
        raise ValueError(f"TF config lacks {missing}")
    out = {"model_type": MODEL_TYPES[family]}
    out.update({k: int(tf_config[k]) for k in _ARCH_SIZES})
    out["hidden_act"] = hf_hidden_act(tf_config, family)
    for k in _DROPOUTS:
        out[k] = float(tf_config.get(k, 0.0 if family == "albert" else 0.1))
    out["initializer_range"] = float(tf_config.get("initializer_range", 0.02))
    # tf.contrib.layers.layer_norm's variance epsilon; a different one only comes from our writer.
    out["layer_norm_eps"] = float(tf_config.get("layer_norm_eps", 1e-12))
    if family == "albert":
        out["embedding_size"] = int(tf_config.get("embedding_size", 128))
        out["num_hidden_groups"] = int(tf_config.get("num_hidden_groups", 1))
        out["inner_group_num"] = int(tf_config.get("inner_group_num", 1))
        for key in ("down_scale_factor", "net_structure_type", "gap_size", "num_memory_blocks"):
            default = 1 if key == "down_scale_factor" else 0
            if tf_config.get(key, default) != default:
                raise ValueError(f"ALBERT config {key}={tf_config[key]} is not supported by HF")
    if family == "electra":
        out["embedding_size"] = int(tf_config.get("embedding_size", tf_config["hidden_size"]))
    return out


def tf_config_from_hf(hf_config: dict, family: str) -> dict:
    """Google-format config (what ``modeling.BertConfig.from_json_file`` and bert4keras read)."""
    missing = [k for k in _ARCH_SIZES if k not in hf_config]
    if missing:
        raise ValueError(f"HF config lacks {missing}")
    out = {k: hf_config[k] for k in _ARCH_SIZES}
    out.update(tf_hidden_act(hf_config.get("hidden_act", "gelu"), family))
    for k in _DROPOUTS:
        out[k] = hf_config.get(k, 0.1)
    out["initializer_range"] = hf_config.get("initializer_range", 0.02)
    if hf_config.get("layer_norm_eps", 1e-12) != 1e-12:
        out["layer_norm_eps"] = hf_config["layer_norm_eps"]
    if family == "albert":
        out["embedding_size"] = hf_config["embedding_size"]
        out["num_hidden_groups"] = hf_config.get("num_hidden_groups", 1)
        out["inner_group_num"] = hf_config.get("inner_group_num", 1)
        out.update(down_scale_factor=1, net_structure_type=0, gap_size=0, num_memory_blocks=0)
    if family == "electra":
        out["embedding_size"] = hf_config.get("embedding_size", hf_config["hidden_size"])
    return dict(sorted(out.items()))
