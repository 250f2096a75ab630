"""Loading HF directories and TensorFlow-1 checkpoints into lub_fast models.

``from_pretrained(path)`` reads ``config.json`` and the weights (``model.safetensors``, sharded
safetensors, or a ``pytorch_model.bin``, sharded or not, read with ``weights_only=True``) for
model_type bert, roberta, albert and electra, or a TF-1 checkpoint through ``lub_fast.tf1`` (no
TensorFlow needed); the names are mapped by ``lub_fast.models.hf``. It returns the model only: what
lay beside the weights comes from ``read_tokenizer_files(path)`` (the vocabulary and tokenizer
settings) and ``read_labels(path)`` (the class names), which a caller passes on to
``save_pretrained(..., tokenizer=..., labels=...)`` (``lub_fast.models.save``).

Weights are checked strictly: unknown keys, missing encoder keys and wrong shapes raise one error
that lists them. Weights of a head the target model does not have are dropped with a warning; a head
the checkpoint lacks entirely (HFL's Chinese RoBERTa-wwm releases have no MLM head) is initialised
with a warning.
"""

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lub_fast.data.tokenizer import (
    VOCAB_FILE,
    VocabularyError,
    first_difference,
    vocab_bytes,
    vocab_from_files,
)
from lub_fast.models.config import FAMILIES
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
from lub_fast.models.hf import (
    ARCHITECTURES,
    LABELLED_TASKS,
    TASKS,
    config_from_hf,
    head_weights,
    hf_to_lub,
)

_MODEL_OF_TASK = {
    "base": EncoderModel,
    "masked_lm": MaskedLM,
    "pretraining": PreTraining,
    "discriminator": ElectraDiscriminator,
    "sequence_classification": SequenceClassification,
    "token_classification": TokenClassification,
    "question_answering": QuestionAnswering,
}

# What save_pretrained of transformers' tokenizers writes; copied as they are.
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


def from_pretrained(path, task: str | None = None, num_labels: int | None = None, problem_type: str | None = None):
    """Load an HF directory of model_type bert, roberta, albert or electra, or a TensorFlow-1
    checkpoint (Google's BERT/ALBERT/ELECTRA layout: a directory or a ``model.ckpt`` prefix with its
    ``bert_config.json``/``albert_config.json``, or a ``config.json`` without HF's ``model_type``
    next to ``*.index`` files; read by ``lub_fast.tf1`` without TensorFlow).

    ``task`` (one of ``lub_fast.models.hf.TASKS``) defaults to the one of ``config.json``'s
    ``architectures`` (no architectures: ``"base"``); giving another task loads the encoder and
    initialises the new head (with a warning). ``num_labels`` overrides the checkpoint's for
    classification tasks, ``problem_type`` (HF's: ``"regression"``, ``"single_label_classification"``,
    ``"multi_label_classification"``) a sequence classifier's loss. An HF directory's tokenizer files
    are checked as ``read_tokenizer_files`` reads them (``VocabularyError`` for a ``tokenizer.json``
    that is not WordPiece or disagrees with ``vocab.txt``), and not kept: read them with it.
    """
    path = Path(path)
    if _is_tf1(path):
        return _from_tf1(path, task, num_labels, problem_type)
    hf_config = _read_config(path)
    read_tokenizer_files(path)  # the vocabulary contract: refuse a directory whose vocabularies disagree
    return from_hf(hf_config, _read_weights(path), task, num_labels, problem_type, origin=str(path))


def from_hf(hf_config: dict, hf_tensors: dict[str, Tensor], task: str | None = None, num_labels: int | None = None,
            problem_type: str | None = None, origin: str = "checkpoint"):  # fmt: skip
    """Build the lub_fast model of an HF ``config.json`` dict and HF-named tensors (strictly checked;
    see the module docstring). ``task``, ``num_labels`` and ``problem_type`` as in ``from_pretrained``."""
    hf = config_from_hf(hf_config)
    family = hf.encoder.family
    if hf.task is None and task is None:
        supported = sorted(a for (f, _), a in ARCHITECTURES.items() if f == family)
        raise ValueError(
            f"{origin}: architecture {hf.architecture!r} is not supported ({supported}); pass "
            f"task= one of {sorted(TASKS)} to load its encoder under another head"
        )
    task = hf.task if task is None else task
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if (family, task) not in ARCHITECTURES:
        raise ValueError(f"{family} has no {task} model")
    kwargs = {}
    if task in LABELLED_TASKS:
        kwargs["num_labels"] = num_labels or hf.num_labels
    if task == "sequence_classification":
        kwargs["problem_type"] = problem_type or hf.problem_type
    model = _MODEL_OF_TASK[task](hf.encoder, **kwargs)
    _load_into(model, hf_tensors, hf.task, origin)
    return model


def read_tokenizer_files(path) -> dict[str, bytes]:
    """The tokenizer files beside the checkpoint at ``path`` (as ``from_pretrained`` takes it): file
    name -> bytes of the ``TOKENIZER_FILES`` an HF directory holds, or a TF-1 checkpoint's
    ``vocab.txt``; {} when there are none. Where there is no ``vocab.txt``, the WordPiece vocabulary
    of ``tokenizer.json`` (what ``transformers`` 5 saves) becomes one. Raises ``VocabularyError`` as
    ``lub_fast.data.tokenizer.vocab_from_files`` does."""
    path = Path(path)
    if _is_tf1(path):
        from lub_fast.tf1.load import vocab_file

        found = vocab_file(str(path))
        files = {VOCAB_FILE: Path(found).read_bytes()} if found else {}
        origin = str(Path(found).parent) if found else str(path)
    else:
        files = {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}
        origin = str(path)
    tokens = vocab_from_files(files, origin)
    if tokens is not None and VOCAB_FILE not in files:
        files[VOCAB_FILE] = vocab_bytes(tokens)
    return files


def read_labels(path) -> tuple[str, ...] | None:
    """The class names of the HF directory at ``path`` (``config.json``'s ``id2label``, ``labels[i]``
    names class ``i``), for a sequence or token classifier; None for other models and TF-1
    checkpoints."""
    path = Path(path)
    if _is_tf1(path):
        return None
    hf = config_from_hf(_read_config(path))
    return hf.labels if hf.task in LABELLED_TASKS else None


def from_pretrained_electra_pair(discriminator_path, generator_path=None) -> ElectraPair:
    """Load an ELECTRA discriminator (``ElectraForPreTraining``) and generator (``ElectraForMaskedLM``)
    directory into one ``ElectraPair`` sharing the embeddings; without ``generator_path``,
    ``discriminator_path`` is a TF-1 ELECTRA checkpoint that holds both (google-research/electra's
    pretraining checkpoints). Raises when the two checkpoints' embeddings or vocabularies differ (they
    are one set in ELECTRA pretraining)."""
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
    if generator_path is not None:  # a TF-1 pair has one vocab.txt
        paths = (discriminator_path, generator_path)
        vocabs = [vocab_from_files(read_tokenizer_files(p), str(p)) for p in paths]
        if None not in vocabs and vocabs[0] != vocabs[1]:
            raise VocabularyError(
                f"from_pretrained_electra_pair: {discriminator_path} and {generator_path} have different vocabularies "
                f"({first_difference(*vocabs, 'the discriminator', 'the generator')}); ELECTRA's two models share one"
            )
    return ElectraPair(gen, disc)


def tf1_family(path) -> tuple[str, bool] | None:
    """For what ``from_pretrained`` reads as a TF-1 checkpoint: ``(family, holds an ELECTRA
    generator)`` from its index alone; None for anything else (an HF directory, a missing path)."""
    from lub_fast.tf1.load import checkpoint_family

    return checkpoint_family(str(path)) if _is_tf1(Path(path)) else None


# ---------------------------------------------------------------------------------------- loading


def _load_into(model, hf_tensors: dict[str, Tensor], source_task: str | None, origin: str) -> None:
    cfg = model.config
    converted = hf_to_lub(hf_tensors, cfg, model.task, source_task)
    expected = model.state_dict()
    comp_of = head_weights(cfg, model.task)
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


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    hf_config = json.loads(config_file.read_text())
    if hf_config.get("model_type") not in FAMILIES:
        raise ValueError(f"{config_file}: unsupported HF model_type {hf_config.get('model_type')!r}; lub_fast loads {FAMILIES}")
    return hf_config


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


# ------------------------------------------------------------------------------------------ TF-1


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


def _from_tf1(path: Path, task: str | None, num_labels: int | None, problem_type: str | None):
    from lub_fast.tf1 import TF1CheckpointError, load_tf1_checkpoint
    from lub_fast.tf1.load import resolve_prefix

    try:
        resolve_prefix(str(path))
    except (TF1CheckpointError, OSError):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such directory or checkpoint") from None
        raise FileNotFoundError(
            f"{path}: no config.json (not an HF model directory) and no TF-1 checkpoint (*.index)"
        ) from None
    hf_config, tensors, info = load_tf1_checkpoint(path)
    return from_hf(hf_config, tensors, task, num_labels, problem_type, origin=info.prefix)


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
    return disc, gen
