"""``python -m lub_fast.info`` and the extension fallback: without the compiled extension every op
runs its PyTorch reference after one warning, never an ImportError; an extension that was built but
does not load makes ``info`` exit 2 naming it."""

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lub_fast import ops

SCRIPT = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch
    from lub_fast import ops
    from lub_fast.ops.attention import varlen_attention
    from lub_fast.ops.bias_gelu import bias_gelu
    from lub_fast.ops.wwm import wwm_mask
import torch.nn.functional as F
mine = [w for w in caught if "lub_fast" in str(w.message)]
print("WARNINGS", len(mine), mine[0].message if mine else "")
# Each result against torch's own computation of the same thing, not against lub_fast's reference.
q = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
out = varlen_attention(q, q, q, cu := torch.tensor([0, 2, 5], dtype=torch.int32), cu, 3, 3)
out.sum().backward()
leaf = q.detach().requires_grad_()
want = torch.cat([F.scaled_dot_product_attention(*(leaf[a:b].transpose(0, 1),) * 3).transpose(0, 1)
                  for a, b in ((0, 2), (2, 5))])
want.sum().backward()
print("ATTENTION", torch.allclose(out, want), torch.allclose(q.grad, leaf.grad))
x, bias = torch.randn(3, 4), torch.randn(4)
print("GELU", torch.allclose(bias_gelu(x, bias), F.gelu(x + bias), atol=1e-6))
ids = torch.randint(10, 50, (2, 16))
masked, labels = wwm_mask(ids, torch.ones_like(ids, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool),
                          torch.arange(2), seed=1, max_predictions=4, mask_token_id=4, random_low=10, random_high=50)
chosen = labels != -100
print("WWM", int(chosen.sum()), bool(torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])))
# What ``python -m lub_fast.info`` runs, in this process that has seen the import warnings: one
# interpreter start (torch and transformers imports) less than a second process.
from lub_fast import info
print("INFO_EXIT", info.main([]))
"""


def _run(env_extra, *args, cwd=None):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def info_run():
    """One ``python -m lub_fast.info`` in the suite's environment, read by the tests of its report."""
    return _run({}, "-m", "lub_fast.info")


def test_info_reports_versions_and_implementations(info_run):
    result = info_run
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("lub_fast", "torch", "transformers", "tokenizers", "lub_fast._C"):
        assert name in out, out
    for op in ops.OP_NAMES:
        assert f"lub_fast::{op}" in out, out
    from importlib import metadata

    for dist in ("rjieba", "snownlp", "jieba"):  # rjieba and snownlp have no __version__
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        assert f"{dist:<12} {version}" in out, out
    if ops.EXTENSION_ERRORS["lub_fast._C"] is None:
        line = next(l for l in out.splitlines() if l.startswith("lub_fast::wwm_mask"))
        assert line.split()[1] == "kernel", line
    routes = {l.split()[0] + " " + l.split()[1]: l.split()[2:] for l in out.splitlines() if l.startswith("cuda D=")}
    assert set(routes) == {"cuda D=64", "cuda D=128", "cuda D=96"}, out
    for head_dim, (fp32, bf16, fp16, fp64) in routes.items():  # fp32 never on the materialising reference
        assert fp32 == "sdpa" and fp64 == "reference" and bf16 == fp16 != "reference", (head_dim, out)
    assert "dropout: lub_fast and reference follow" in out and "use_deterministic_algorithms" in out, out


def test_info_without_extension_falls_back_with_one_warning():
    result = _run({"LUB_FAST_NO_EXT": "1"}, "-c", SCRIPT)
    assert result.returncode == 0, result.stderr
    keys = ("WARNINGS", "ATTENTION", "GELU", "WWM", "INFO_EXIT")
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(keys))
    assert lines["WARNINGS"].startswith("1 ") and "reference" in lines["WARNINGS"], result.stdout
    assert lines["ATTENTION"] == "True True" and lines["GELU"] == "True", result.stdout
    # rate 0.15 of a row's 16 maskable tokens is 2; labels hold the original ids, the rest is unchanged
    assert lines["WWM"] == "4 True", result.stdout
    assert lines["INFO_EXIT"] == "0", result.stdout + result.stderr
    implementations = [l.split()[1:] for l in result.stdout.splitlines() if l.startswith("lub_fast::")]
    assert implementations and all(impl == ["reference", "reference"] for impl in implementations), result.stdout


CPU_KERNELS = ("wwm_mask", "varlen_attention_fwd", "varlen_attention_bwd", "bias_gelu_fwd", "bias_gelu_bwd")


def test_info_extension_registers_cpu_kernels(require_kernels, info_run):
    require_kernels("cpu", *CPU_KERNELS)
    result = info_run
    assert result.returncode == 0, result.stderr
    cpu = {l.split()[0]: l.split()[1] for l in result.stdout.splitlines() if l.startswith("lub_fast::")}
    assert all(cpu[f"lub_fast::{op}"] == "kernel" for op in CPU_KERNELS), result.stdout


def _package_copy(tmp_path, broken):
    """A copy of the lub_fast package under ``tmp_path`` in which each extension named in ``broken``
    is a compiled file that cannot load (bytes that are no shared library)."""
    source = Path(ops.__file__).parents[1]
    shutil.copytree(source, tmp_path / "lub_fast", ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "_C*.pyd"))
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in broken:
        (tmp_path / "lub_fast" / f"{name}{suffix}").write_bytes(b"not a shared library\n")
    return {"PYTHONPATH": str(tmp_path), "LUB_FAST_NO_EXT": "0"}


@pytest.mark.parametrize("broken", [("_C",), ("_C", "_C_cuda")])
def test_info_fails_naming_a_built_extension_that_does_not_load(tmp_path, broken):
    env = _package_copy(tmp_path, broken)
    result = _run(env, "-m", "lub_fast.info", cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("lub_fast.info")]
    assert len(errors) == 1 and errors[0].startswith("lub_fast.info: error: "), result.stderr
    for name in broken:
        assert f"lub_fast.{name} ({tmp_path / 'lub_fast' / name}" in errors[0] and "does not load" in errors[0], errors[0]
    if "_C_cuda" not in broken:
        assert "_C_cuda" not in errors[0], errors[0]
    assert "pip install --no-build-isolation -e ." in errors[0], errors[0]
    assert "lub_fast::wwm_mask" in result.stdout, result.stdout  # the report still comes first


def test_info_passes_without_a_built_extension_or_with_it_disabled(tmp_path):
    env = _package_copy(tmp_path, ())
    assert _run(env, "-m", "lub_fast.info", cwd=tmp_path).returncode == 0
    _package_copy(tmp_path / "disabled", ("_C",))
    disabled = _run({"PYTHONPATH": str(tmp_path / "disabled"), "LUB_FAST_NO_EXT": "1"}, "-m", "lub_fast.info",
                    cwd=tmp_path / "disabled")
    assert disabled.returncode == 0, disabled.stderr
