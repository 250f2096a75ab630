"""``benchmarks/timing.git_revision``: the revision every benchmark result records, and whether the
tree it measured was dirty (results files themselves do not count)."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

TIMING = Path(__file__).resolve().parents[1] / "benchmarks" / "timing.py"


@pytest.fixture(scope="module")
def timing():
    spec = importlib.util.spec_from_file_location("benchmark_timing", TIMING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_git_revision_names_head_and_the_uncommitted_files(tmp_path, timing):
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "benchmarks" / "results" / "2026-12-02-x.md").write_text("written by the run\n")
    clean = timing.git_revision(repo)
    assert clean == {"git_revision": head, "git_dirty": False, "git_changes": []}, clean
    assert timing.describe_revision(clean) == f"git {head[:12]} (clean)"
    (repo / "code.py").write_text("x = 2\n")
    (repo / "new.py").write_text("y = 1\n")
    dirty = timing.git_revision(repo)
    assert dirty == {"git_revision": head, "git_dirty": True, "git_changes": ["code.py", "new.py"]}, dirty
    assert timing.describe_revision(dirty).startswith(f"git {head[:12]} + uncommitted changes to code.py, new.py (dirty")


def test_git_revision_outside_a_checkout_is_unknown_and_dirty(tmp_path, timing):
    revision = timing.git_revision(tmp_path)
    assert revision["git_revision"] == "unknown" and revision["git_dirty"], revision
