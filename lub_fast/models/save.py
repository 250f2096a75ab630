"""Writing a lub_fast model as an HF directory that the matching ``transformers`` Auto class loads.

``save_pretrained(model, directory, tokenizer=..., labels=...)`` writes ``config.json`` (names from
``lub_fast.models.hf``), ``model.safetensors`` and the tokenizer files it is given: the vocabulary and
the class names travel as arguments, not on the model. Reading is ``lub_fast.models.load``; this
module builds no model, so the models' ``save_pretrained`` method can call it.
"""

import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors.torch import save_file

from lub_fast.data.tokenizer import VOCAB_FILE, bert_tokenizer_config, vocab_from_files
from lub_fast.models.hf import LABELLED_TASKS, config_to_hf, lub_to_hf


def save_pretrained(model, directory, tokenizer: Mapping[str, bytes] | str | os.PathLike | None = None,
                    labels: Sequence[str] | None = None) -> None:  # fmt: skip
    """Write ``model`` (a model of ``lub_fast.models.heads``) into ``directory`` as an HF directory.

    ``tokenizer``: the tokenizer files to write beside the weights (file name -> bytes, e.g. what
    ``lub_fast.models.load.read_tokenizer_files`` read beside a checkpoint), or the path of the
    ``vocab.txt`` the model was trained with; None writes no tokenizer. A vocabulary is checked
    (``vocab.txt`` and ``tokenizer.json`` must agree) and gets BERT's ``tokenizer_config.json`` where it
    has none, a ``tokenizer_class`` where that names none (``AutoTokenizer`` would pick the family's own,
    SentencePiece for ALBERT), and ``model_max_length`` at most the model's positions.

    ``labels``: for sequence and token classification, the class names (``labels[i]`` names class
    ``i``; ``config.json``'s ``id2label``/``label2id``); None gives HF's ``LABEL_i``.
    """
    directory = Path(directory)
    cfg = model.config
    labelled = model.task in LABELLED_TASKS
    problem_type = model.problem_type if model.task == "sequence_classification" else None
    hf_config = config_to_hf(cfg, model.task, model.num_labels if labelled else None, labels, problem_type)
    if isinstance(tokenizer, (str, os.PathLike)):
        if not Path(tokenizer).is_file():
            raise ValueError(f"save_pretrained: tokenizer={tokenizer} is not a vocab.txt file; pass its path, or the "
                             "files of a model directory as read_tokenizer_files(directory) reads them")
        tokenizer = {VOCAB_FILE: Path(tokenizer).read_bytes()}
    tokenizer_files = _tokenizer_files(dict(tokenizer or {}), cfg, directory)  # checked before anything is written
    tensors = lub_to_hf(model.state_dict(), cfg, model.task)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    os.chmod(directory / "model.safetensors", _new_file_mode(directory))  # safetensors leaves its 0600 temporary's mode
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for name, data in tokenizer_files.items():
        (directory / name).write_bytes(data)


def _tokenizer_files(files: dict[str, bytes], cfg, directory: Path) -> dict[str, bytes]:
    """``files`` checked and completed as ``save_pretrained`` says."""
    if vocab_from_files(files, str(directory)) is None:
        return files
    positions = cfg.max_position_embeddings - cfg.position_offset
    settings = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else bert_tokenizer_config(positions)
    fixed = dict(settings)
    fixed.setdefault("tokenizer_class", "BertTokenizer")
    if not isinstance(fixed.get("model_max_length"), int) or fixed["model_max_length"] > positions:
        fixed["model_max_length"] = positions
    if fixed != settings or "tokenizer_config.json" not in files:
        files["tokenizer_config.json"] = (json.dumps(fixed, indent=2) + "\n").encode()
    return files


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
