"""``python -m lub_fast.info`` and the extension fallback: without the compiled extension every op
runs its PyTorch reference after one warning, never an ImportError."""

import os
import subprocess
import sys

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
mine = [w for w in caught if "lub_fast" in str(w.message)]
print("WARNINGS", len(mine), mine[0].message if mine else "")
q = torch.randn(5, 2, 8, requires_grad=True)
out = varlen_attention(q, q, q, cu := torch.tensor([0, 2, 5], dtype=torch.int32), cu, 3, 3, dropout_p=0.1, seed=3)
out.sum().backward()
print("ATTENTION", tuple(out.shape), bool(torch.isfinite(q.grad).all()))
print("GELU", tuple(bias_gelu(torch.randn(3, 4), torch.randn(4)).shape))
ids = torch.randint(10, 50, (2, 16))
masked, labels = wwm_mask(ids, torch.ones_like(ids, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool),
                          torch.arange(2), seed=1, max_predictions=4, mask_token_id=4, random_low=10, random_high=50)
print("WWM", int((labels != -100).sum()))
"""


def _run(env_extra, *args):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_info_reports_versions_and_implementations():
    result = _run({}, "-m", "lub_fast.info")
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
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["WARNINGS"].startswith("1 ") and "reference" in lines["WARNINGS"], result.stdout
    assert lines["ATTENTION"] == "(5, 2, 8) True" and lines["GELU"] == "(3, 4)", result.stdout
    assert int(lines["WWM"]) >= 1, result.stdout
    info = _run({"LUB_FAST_NO_EXT": "1"}, "-m", "lub_fast.info")
    assert info.returncode == 0, info.stderr
    implementations = [l.split()[1:] for l in info.stdout.splitlines() if l.startswith("lub_fast::")]
    assert implementations and all(impl == ["reference", "reference"] for impl in implementations), info.stdout


@pytest.mark.skipif(ops.EXTENSION_ERRORS["lub_fast._C"] is not None, reason="lub_fast._C is not built")
def test_info_extension_registers_cpu_kernels():
    for op in ("wwm_mask", "varlen_attention_fwd", "varlen_attention_bwd", "bias_gelu_fwd", "bias_gelu_bwd"):
        assert ops.has_kernel(op, "cpu"), op
