"""``python -m lub_fast.info``: versions, extensions, and which implementation each op runs."""

import argparse
import platform
import sys

from lub_fast.errors import EXIT_CODES_HELP, run_command


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
    return "\n".join(lines)


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    argparse.ArgumentParser(prog="python -m lub_fast.info", description=__doc__, epilog=EXIT_CODES_HELP).parse_args(argv)
    return run_command("info", lambda: print(report()))


if __name__ == "__main__":
    sys.exit(main())
