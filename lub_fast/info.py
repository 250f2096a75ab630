"""``python -m lub_fast.info``: versions, extensions, and which implementation each op runs.

It exits 2 when an extension was built (its compiled file is in the package) but cannot be
imported, so that a setup or CI run stops there instead of running every op on its reference."""

import argparse
import os
import platform
import sys

from lub_fast.errors import EXIT_CODES_HELP, UsageError, run_command


class ExtensionLoadError(UsageError):
    """A compiled extension is present but does not import (built against another torch, a missing
    symbol or library)."""


def _version(module):
    """The installed distribution's version (rjieba and snownlp have no ``__version__``)."""
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        pass
    try:
        return getattr(__import__(module), "__version__", "installed (version unknown)")
    except Exception:
        return "not installed"


def report():
    import torch

    import lub_fast
    from lub_fast import ops

    lines = [
        f"lub_fast     {lub_fast.__version__}",
        f"python       {sys.version.split()[0]} ({platform.machine()})",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    for module in ("transformers", "tokenizers", "safetensors", "numpy", "jieba", "rjieba", "snownlp"):
        lines.append(f"{module:<12} {_version(module)}")
    cuda = torch.cuda.is_available()
    lines.append(f"GPU          {torch.cuda.get_device_name(0) if cuda else 'none visible'}")
    lines.append("")
    for ext, err in ops.EXTENSION_ERRORS.items():
        lines.append(f"{ext:<17} {'loaded' if err is None else 'not loaded: ' + err}")
    lines.append("")
    lines.append(f"{'op':<34}{'cpu':<12}cuda")
    for name in sorted(ops.OP_NAMES):
        cpu = "kernel" if ops.has_kernel(name, "cpu") else "reference"
        gpu = "kernel" if ops.has_kernel(name, "cuda") else "reference"
        lines.append(f"lub_fast::{name:<24}{cpu:<12}{gpu}")
    lines.append("")
    lines.extend(attention_routes())
    return "\n".join(lines)


def attention_routes(head_dims=(64, 128, 96)):
    """The table of ``lub_fast.ops.attention.attention_route`` per device, dtype and head dim, with
    what each route means for dropout and reproducibility."""
    import torch

    from lub_fast.ops import attention, has_kernel

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    cpu = attention.built_on(torch.device("cpu"))
    if torch.cuda.is_available():
        cuda, note = attention.built_on(torch.device("cuda", torch.cuda.current_device())), ""
    else:
        flash = torch.backends.cuda.is_flash_attention_available()
        cuda = attention.Built(lub_fast=has_kernel("varlen_attention_fwd", "cuda"), torch_flash=flash)
        note = " (no GPU visible: as on an sm80+ GPU)"
    lines = [f"varlen attention route{note}", (f"{'device':<16}" + "".join(f"{d:<14}" for d in dtypes)).rstrip()]
    for device, built in (("cpu", cpu), ("cuda", cuda)):
        for head_dim in head_dims:
            routes = [attention.attention_route(device, dt, head_dim, built) for dt in dtypes.values()]
            lines.append((f"{device + ' D=' + str(head_dim):<16}" + "".join(f"{r:<14}" for r in routes)).rstrip())
    exact = [r for r in attention.ROUTES if attention.DROPOUT_EXACT[r]]
    lines.append(
        f"dropout: {' and '.join(exact)} follow lub_fast's counter-based masks (CPU and GPU drop the same "
        "probabilities); torch_varlen and sdpa draw torch's own"
    )
    lines.append("")
    lines.extend(attention_backwards(cpu, cuda))
    return lines


def attention_backwards(cpu, cuda, head_dim=64):
    """The table of ``lub_fast.ops.attention.backward_route`` per device and dtype at ``head_dim``, by
    default and under ``torch.use_deterministic_algorithms(True)``; ``cpu``, ``cuda``: ``Built``."""
    import torch

    from lub_fast.ops import attention

    switch = "use_deterministic_algorithms(True)"
    lines = [f"{'backward D=' + str(head_dim):<16}{'default':<22}{switch}"]
    for device, built in (("cpu", cpu), ("cuda", cuda)):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            route = attention.attention_route(device, dtype, head_dim, built)
            default, switched = (attention.backward_route(device, route, d) for d in (False, True))
            lines.append(f"{device + ' ' + name:<16}{default:<22}{switched}")
    lines.append(
        "reproducibility: lub_fast_atomic_dq adds dq over key tiles with fp32 atomics (its last bits vary between "
        "runs); under torch.use_deterministic_algorithms(True) the CUDA kernel runs lub_fast_dq_pass (no atomics: "
        "bit-identical runs, about 1.4x the backward's matrix FLOPs); lub_fast_cpu and reference are deterministic "
        "either way; torch (torch_varlen, sdpa) follows the switch itself"
    )
    return lines


def check_extensions_load():
    """Raise ``ExtensionLoadError`` naming every extension whose compiled file exists but whose
    import failed; an extension that was never built (or is off by ``LUB_FAST_NO_EXT=1``) is fine."""
    from importlib.util import find_spec

    from lub_fast import ops

    if os.environ.get("LUB_FAST_NO_EXT", "0") == "1":
        return
    # find_spec locates the file without loading it: None means the extension was not built.
    broken = [
        f"{name} ({spec.origin}) does not load: {error}"
        for name, error in ops.EXTENSION_ERRORS.items()
        if error is not None and (spec := find_spec(name)) is not None
    ]
    if broken:
        raise ExtensionLoadError(
            "; ".join(broken) + "; rebuild it against the installed torch with `pip install --no-build-isolation -e .` "
            "(or delete the file to run the PyTorch references)"
        )


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    argparse.ArgumentParser(prog="python -m lub_fast.info", description=__doc__, epilog=EXIT_CODES_HELP).parse_args(argv)

    def body():
        print(report())
        check_extensions_load()

    return run_command("info", body)


if __name__ == "__main__":
    sys.exit(main())
