"""Which C++/CUDA sources the compiled extensions were built from.

After a ``git pull`` in a checkout installed with ``pip install -e``, the ``lub_fast/_C*.so`` files
are the old build while ``lub_fast/ops`` defines the new op schemas. Loading such a library does not
raise: torch finds the mismatched schema while the library initialises and aborts the process. So
``setup.py`` records the sha256 of the ``csrc/`` sources next to the extensions it builds
(``_build_stamp.json``), and ``lub_fast.ops`` loads them only when the checkout's ``csrc/`` still
hashes the same (outside a checkout there is no ``csrc/``, and the installed files belong together).

This module imports nothing of lub_fast or torch: ``setup.py`` loads it by path before building.
"""

import hashlib
import json
from pathlib import Path

STAMP_FILE = "_build_stamp.json"
_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def sources_sha256(csrc: Path) -> str:
    """sha256 over the names and bytes of the extension sources under ``csrc`` (not ``csrc/tests``)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(csrc).rglob("*") if p.suffix in _SUFFIXES and "tests" not in p.relative_to(csrc).parts):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def write_stamp(package_dir: Path, csrc: Path) -> None:
    """Record the sources that the extensions in ``package_dir`` are being built from."""
    (Path(package_dir) / STAMP_FILE).write_text(json.dumps({"csrc_sha256": sources_sha256(csrc)}) + "\n")


def stale_reason(package_dir: Path) -> str | None:
    """Why the extensions in ``package_dir`` must not be loaded (built from other sources than the
    checkout's ``csrc/``), or None: not a checkout, or the sources are those of the build."""
    package_dir = Path(package_dir)
    csrc = package_dir.parent / "csrc"
    if not csrc.is_dir():
        return None
    stamp = package_dir / STAMP_FILE
    try:
        built = json.loads(stamp.read_text())["csrc_sha256"]
    except (OSError, ValueError, KeyError):
        built = None
    if built == sources_sha256(csrc):
        return None
    what = "records no sources" if built is None else f"was built from other sources than {csrc}"
    return (f"stale build: {stamp.name} {what} (loading it could abort on a changed op schema); "
            "rebuild with `pip install --no-build-isolation -e .`")
