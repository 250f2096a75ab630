"""The one gate of every kernel test: skip unless the ops have a compiled kernel; with
``LUB_FAST_REQUIRE_KERNELS=1`` (as CI sets it) a missing kernel fails instead, so that a ``_C`` that
builds but does not import fails the run rather than skipping the kernel tests, and no test passes by
comparing the reference with itself.

CUDA kernels are required only where a CUDA device is present: without one the GPU tests skip even
under ``LUB_FAST_REQUIRE_KERNELS=1``, so one setting serves CPU-only and GPU machines."""

import os

import pytest
import torch

from lub_fast import ops

EXTENSIONS = {"cpu": "lub_fast._C", "cuda": "lub_fast._C_cuda"}


def _require(device_type, *op_names):
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    missing = [name for name in op_names if not ops.has_kernel(name, device_type)]
    if not missing:
        return
    extension = EXTENSIONS[device_type]
    why = ops.EXTENSION_ERRORS.get(extension) or f"{extension} loaded but registers no such kernel"
    reason = f"no {device_type.upper()} kernel registered for {missing} ({extension}: {why})"
    if os.environ.get("LUB_FAST_REQUIRE_KERNELS", "0") == "1":
        pytest.fail(f"{reason}, and LUB_FAST_REQUIRE_KERNELS=1")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def require_kernels():
    """``require_kernels(device_type, *op_names)``: skip (or fail under LUB_FAST_REQUIRE_KERNELS=1)
    unless every ``lub_fast::<op>`` has a compiled kernel for ``device_type`` ("cpu" or "cuda")."""
    return _require


@pytest.fixture(autouse=True, scope="session")
def _plan_cache(tmp_path_factory):
    """Datasets cache their example plans under ``$LUB_FAST_CACHE`` (default ``~/.cache/lub_fast``):
    the suite keeps them in a temporary directory of its own, so that it writes nothing into the
    user's home and no plan from an earlier run is reused."""
    saved = os.environ.get("LUB_FAST_CACHE")
    os.environ["LUB_FAST_CACHE"] = str(tmp_path_factory.mktemp("lub_fast_cache"))
    yield
    if saved is None:
        os.environ.pop("LUB_FAST_CACHE", None)
    else:
        os.environ["LUB_FAST_CACHE"] = saved
