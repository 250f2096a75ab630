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
checkpoint is detected before anything is loaded from it. A full disk during a save is reported
as one ``CheckpointError`` naming the device's directory and the size needed, with the partial
copy removed.

Owner and readers (``lub_fast.lock``): only the process that holds the run's lock writes, prunes
(``keep_last``: each old checkpoint is first renamed to ``.tmp-pruned-*``, so a reader sees it
whole or not at all) and sets invalid checkpoints aside. Readers (``convert RUN``, ``--init-from
RUN``) change nothing; ``load_latest_checkpoint`` retries when the owner prunes what they read.
"""

import errno
import hashlib
import json
import os
import pickle
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

from lub_fast import lock
from lub_fast.errors import UsageError

FORMAT = "lub_fast-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})(?:_micro_(\d{4,}))?$")


class CheckpointError(UsageError, RuntimeError):
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
    try:
        tmp.mkdir()
        _write(tmp, name, model, state, grads)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial copy on a full disk
        if isinstance(error, (OSError, RuntimeError)) and _disk_full(error):
            needed = _tensor_bytes(model.state_dict()) + _tensor_bytes(state) + _tensor_bytes(grads)
            raise CheckpointError(
                f"no space left on the device of {root} while saving {name} (about {needed / 2**20:.1f} MB "
                f"needed, {shutil.disk_usage(root).free / 2**20:.1f} MB free); the partial copy was removed, the "
                f"earlier checkpoints are kept: free space (or move the run) and continue with --resume"
            ) from None
        raise
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
            # Renamed first (atomic), so that a reader sees a whole checkpoint or none.
            doomed = root / f".tmp-pruned-{path.name}-{os.getpid()}"
            os.rename(path, doomed)
            shutil.rmtree(doomed)
        _fsync(root)
    return final


def _write(tmp: Path, name: str, model: nn.Module, state: dict, grads: dict[str, torch.Tensor] | None) -> None:
    """The files of checkpoint ``name`` into ``tmp``, each fsynced, the manifest last."""
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


def _disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain: torch.save reports a full disk as
    ``RuntimeError: [enforce fail at inline_container.cc:...]`` raised while handling the
    ``OSError``; safetensors as an error whose message is the OS's."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) dict/list."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


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
        try:
            size = file.stat().st_size
            digest = _sha256(file) if size == expected["bytes"] else None
        except FileNotFoundError:  # absent, or removed while read (the owner pruned it)
            raise CheckpointError(f"checkpoint {path}: missing file {name}") from None
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} has {size} bytes, manifest says {expected['bytes']} (truncated?)"
            )
        if digest != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} fails its SHA-256 check (corrupted)")
    for required in ("model.safetensors", "state.pt"):
        if required not in manifest.get("files", {}):
            raise CheckpointError(f"checkpoint {path}: manifest lists no {required}")
    return manifest


def latest_valid_checkpoint(run_dir: str | os.PathLike, attempts: int = 5) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes ``verify_checkpoint``.

    Each newer invalid one is reported with a warning naming it and the reason. Only the run's
    owner (the holder of its ``lub_fast.lock``) renames it to ``invalid-<name>`` so that later
    resumes and ``keep_last`` pruning ignore it; a reader leaves the run as it is. A checkpoint
    that vanishes while it is read (the owner pruned it) is skipped silently, and when that
    leaves none, the listing is read again (``attempts`` times). ``None`` when the run has no
    checkpoint; ``CheckpointError`` when it has some but none is valid.
    """
    owner = lock.holds(run_dir)
    errors = []
    for _ in range(attempts):
        vanished = False
        for path in reversed(list_checkpoints(run_dir)):
            try:
                verify_checkpoint(path)
            except CheckpointError as error:
                if not path.exists():
                    vanished = True
                    continue
                errors.append(str(error))
                if owner:
                    aside = path.with_name(f"invalid-{path.name}")
                    suffix = 1
                    while aside.exists():
                        suffix += 1
                        aside = path.with_name(f"invalid-{path.name}-{suffix}")
                    warnings.warn(
                        f"{error}; falling back to the previous checkpoint (this one moved to {aside.name})",
                        stacklevel=2,
                    )
                    os.rename(path, aside)
                else:
                    warnings.warn(f"{error}; falling back to the previous checkpoint", stacklevel=2)
                continue
            return path
        if not vanished:
            break
    if errors:
        root = Path(run_dir) / CHECKPOINT_DIR
        raise CheckpointError(f"no valid checkpoint in {root}: " + "; ".join(errors))
    return None


def load_latest_checkpoint(
    run_dir: str | os.PathLike, model: nn.Module, attempts: int = 5
) -> tuple[Path, dict, dict[str, torch.Tensor] | None] | None:
    """A reader's load of a run that may be live: the newest valid checkpoint into ``model``;
    ``(path, state, grads)`` (see ``load_checkpoint``), ``None`` when the run has none. A
    checkpoint pruned by the run's owner while it is being loaded is replaced by the newest one
    then (``attempts`` times)."""
    failures = 0
    while True:
        path = latest_valid_checkpoint(run_dir)
        if path is None:
            return None
        try:
            return (path, *load_checkpoint(path, model))
        except Exception:
            failures += 1
            if path.exists() or failures == attempts:
                raise


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
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{path / 'state.pt'}: not loadable as plain tensors and numbers (torch.load with "
            f"weights_only=True: {_reason(error)}); it is truncated, not a lub_fast state, or tampered "
            "with: use another checkpoint"
        ) from None
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


def _reason(error: BaseException) -> str:
    """The specific sentence of torch.load's long message (which also suggests weights_only=False:
    never for a file nobody vouches for)."""
    text = str(error)
    if text.startswith("Weights only load failed"):
        body = text.split("Check the documentation")[0]
        if "WeightsUnpickler error:" in body:
            body = body.split("WeightsUnpickler error:", 1)[1]
        else:
            body = " ".join(body.split("\n\n")[1:])
        return " ".join(["refused:", *body.split()])
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
    return lines[0].split(". ")[0].rstrip(".")


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


def resume_path(run_dir: Path, resume, rank: int, world_size: int) -> Path | None:
    """The checkpoint ``lub_fast.train.train``'s ``resume`` names (None: start fresh, refused when
    ``run_dir`` holds checkpoints; ``"latest"``: the newest valid one; else that path, verified).
    Rank 0 picks and verifies it and tells the other ranks (collective under DDP)."""
    chosen, error = None, None
    if rank == 0:
        try:
            if resume is None:
                existing = list_checkpoints(run_dir)
                if existing:
                    raise CheckpointError(
                        f"{run_dir} already holds checkpoints ({existing[-1].name}): resume with "
                        f"resume='latest' (--resume) or choose another output directory"
                    )
            elif str(resume) == "latest":
                chosen = latest_valid_checkpoint(run_dir)
            else:
                chosen = Path(resume)
                verify_checkpoint(chosen)
        except CheckpointError as caught:
            error = caught
    if world_size > 1:
        message = [str(chosen) if chosen else None, str(error) if error else None]
        torch.distributed.broadcast_object_list(message, src=0)
        chosen = Path(message[0]) if message[0] else None
        if message[1] and error is None:
            error = CheckpointError(message[1])
    if error is not None:
        raise error
    return chosen


def check_resumable(saved: dict, config: dict, world_size: int, path: Path) -> None:
    """Refuse resuming the training state ``saved`` (of checkpoint ``path``) mid-window with another
    accumulation or world size; warn when the training ``config`` (``to_dict`` of a ``TrainConfig``)
    or the world size changed."""
    old, new = saved["config"], config
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    if saved["window_pos"] and (old.get("grad_accum_steps") != new["grad_accum_steps"] or saved["world_size"] != world_size):
        raise CheckpointError(
            f"checkpoint {path} was taken mid-window ({saved['window_pos']} of "
            f"{old.get('grad_accum_steps')} micro-batches, {saved['world_size']} process(es)): it resumes "
            f"only with the same grad_accum_steps and world size (now {new['grad_accum_steps']}, "
            f"{world_size})"
        )
    if changed:
        warnings.warn(f"resuming {path} with a changed training config: {'; '.join(changed)}", stacklevel=3)
    if saved["world_size"] != world_size:
        warnings.warn(
            f"resuming {path} (saved by {saved['world_size']} processes) with {world_size}: the data "
            "order and the global batch change, the run is no longer an exact continuation",
            stacklevel=3,
        )
