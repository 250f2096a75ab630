"""Atomic, verifiable training checkpoints.

Layout of ``run_dir/checkpoints/``::

    step_00000100/                 after optimizer step 100
    step_00000100_micro_0002/      mid-window: 2 micro-batches of step 101 already accumulated
        model.safetensors          objective.state_dict(); tied tensors stored once (safetensors'
                                   save_model/load_model rules), nothing unpickled
        grads.safetensors          mid-window checkpoints only: the accumulated gradients
        state.pt                   optimizer, scheduler, grad scaler, RNG states of every rank,
                                   counters; plain tensors/numbers only: torch.load(weights_only=True)
        manifest.json              written last: format, step, counters, size + SHA-256 per file

A checkpoint is written into ``.tmp-<name>-<pid>/``, every file and the directory are fsynced,
the directory is renamed to its final name (atomic on POSIX) and the parent directory is fsynced
(the recipe of ``man 2 rename`` / LWN "Ensuring data reaches disk"). A crash mid-save leaves only a
``.tmp-*`` directory, which ``remove_stale_tmp`` deletes and ``list_checkpoints`` never returns.
``verify_checkpoint`` re-hashes every file against the manifest, so a truncated or corrupted
checkpoint is detected before anything is loaded from it.
"""

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

FORMAT = "lub_fast-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})(?:_micro_(\d{4,}))?$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and the reason."""


def checkpoint_name(step: int, window_pos: int = 0) -> str:
    """``step_00000100`` after step 100; ``step_00000100_micro_0002`` two micro-batches later."""
    return f"step_{step:08d}" + (f"_micro_{window_pos:04d}" if window_pos else "")


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of ``run_dir``, oldest first (by step, then micro-batch)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append(((int(match[1]), int(match[2] or 0)), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(
    run_dir: str | os.PathLike,
    name: str,
    model: nn.Module,
    state: dict,
    grads: dict[str, torch.Tensor] | None = None,
    keep_last: int = 0,
) -> Path:
    """Write ``model``'s weights, ``state`` (a ``weights_only``-loadable dict: tensors, numbers,
    strings, lists, dicts) and optional gradients as checkpoint ``name``, atomically; then delete
    all but the ``keep_last`` newest checkpoints (``0`` keeps all). Returns the final directory."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
    save_model(model, str(tmp / "model.safetensors"))
    if grads is not None:
        save_file({k: v.detach().contiguous() for k, v in grads.items()}, str(tmp / "grads.safetensors"))
    mode = (tmp / "state.pt").stat().st_mode  # safetensors creates 0600 files; follow the umask
    files = {}
    for path in sorted(tmp.iterdir()):
        os.chmod(path, mode)
        _fsync(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "step": state.get("step"),
        "micro_step": state.get("micro_step"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "files": files,
    }
    with open(tmp / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    final = root / name
    if final.exists():
        # Re-saving the same position (e.g. SIGTERM right after a resume): swap the old one out.
        old = root / f".tmp-replaced-{name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(root)
    if keep_last > 0:
        for path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(path)
        _fsync(root)
    return final


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check the manifest and every file's size and SHA-256; return the manifest or raise
    ``CheckpointError`` naming ``path`` and what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no manifest.json (save did not complete)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest.json ({error})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: missing file {name}")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} has {size} bytes, manifest says {expected['bytes']} (truncated?)"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} fails its SHA-256 check (corrupted)")
    for required in ("model.safetensors", "state.pt"):
        if required not in manifest.get("files", {}):
            raise CheckpointError(f"checkpoint {path}: manifest lists no {required}")
    return manifest


def latest_valid_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes ``verify_checkpoint``.

    Each newer invalid one is reported with a warning naming it and the reason, and renamed to
    ``invalid-<name>`` so that later resumes and ``keep_last`` pruning ignore it. ``None`` when the
    run has no checkpoint; ``CheckpointError`` when it has some but none is valid.
    """
    candidates = list_checkpoints(run_dir)
    errors = []
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            errors.append(str(error))
            aside = path.with_name(f"invalid-{path.name}")
            suffix = 1
            while aside.exists():
                suffix += 1
                aside = path.with_name(f"invalid-{path.name}-{suffix}")
            warnings.warn(
                f"{error}; falling back to the previous checkpoint (this one moved to {aside.name})", stacklevel=2
            )
            os.rename(path, aside)
            continue
        return path
    if errors:
        root = Path(run_dir) / CHECKPOINT_DIR
        raise CheckpointError(f"no valid checkpoint in {root}: " + "; ".join(errors))
    return None


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, verify: bool = True
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Load the weights into ``model`` (strict; tied weights restored through their kept name) and
    return ``(state, grads)``: the ``state.pt`` dict (tensors on CPU) and the saved gradients (on
    ``model``'s device) or ``None``. ``verify`` re-checks the manifest first."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {path}: weights do not match {type(model).__name__}: {error}"
        ) from None
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    grads = None
    if (path / "grads.safetensors").is_file():
        device = next(model.parameters()).device
        grads = load_file(str(path / "grads.safetensors"), device=str(device))
    return state, grads


def remove_stale_tmp(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-*`` directories that interrupted saves left behind; return them."""
    root = Path(run_dir) / CHECKPOINT_DIR
    stale = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def rng_state(device: torch.device) -> dict:
    """torch CPU (and ``device``'s CUDA), numpy and python ``random`` states as plain tensors."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_version": int(py_state[0]),
        "python_gauss": py_state[2],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
