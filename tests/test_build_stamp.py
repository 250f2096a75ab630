"""A checkout whose csrc/ changed since its extensions were built (a ``git pull`` without a rebuild)
must not load them: torch aborts the whole process on a changed op schema while such a library
initialises. ``lub_fast.ops`` runs the references instead and says why; ``lub_fast.info`` exits 2."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lub_fast._build_stamp import STAMP_FILE, sources_sha256, stale_reason

ROOT = Path(__file__).resolve().parents[1]
PROBE = "from lub_fast import ops; print(repr(ops.EXTENSION_ERRORS['lub_fast._C']))"


def _checkout(tmp_path) -> Path:
    """A copy of the package (with its built extension and stamp) and of csrc/."""
    if not list((ROOT / "lub_fast").glob("_C.*")):
        pytest.skip("lub_fast._C is not built")
    shutil.copytree(ROOT / "lub_fast", tmp_path / "lub_fast", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    return tmp_path


def _run(root: Path, *args):
    return subprocess.run([sys.executable, *args], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300, check=False)


def test_build_stamp_unchanged_sources_load(tmp_path):
    root = _checkout(tmp_path)
    assert stale_reason(root / "lub_fast") is None, (root / "lub_fast" / STAMP_FILE).read_text()
    result = _run(root, "-c", PROBE)
    assert result.returncode == 0 and result.stdout.strip() == "None", result.stdout + result.stderr


def test_build_stamp_changed_sources_are_not_loaded(tmp_path):
    root = _checkout(tmp_path)
    before = sources_sha256(root / "csrc")
    header = root / "csrc" / "attention" / "attention_core.h"
    header.write_text(header.read_text() + "\n// changed after the build\n")
    assert sources_sha256(root / "csrc") != before
    result = _run(root, "-c", PROBE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stale build" in result.stdout and "pip install --no-build-isolation -e ." in result.stdout, result.stdout
    info = _run(root, "-m", "lub_fast.info")
    assert info.returncode == 2 and "stale build" in info.stderr, (info.returncode, info.stderr[-2000:])


def test_build_stamp_missing_is_stale_only_in_a_checkout(tmp_path):
    root = _checkout(tmp_path)
    (root / "lub_fast" / STAMP_FILE).unlink()
    assert "records no sources" in stale_reason(root / "lub_fast")
    shutil.rmtree(root / "csrc")  # an installed package: no csrc/ beside it, its files belong together
    assert stale_reason(root / "lub_fast") is None
