"""Shared gate of the GPU kernel tests: skip unless a CUDA device is present and the op has a
registered CUDA kernel; with ``LUB_FAST_REQUIRE_KERNELS=1`` a missing device or kernel fails instead,
so that a GPU run never passes by comparing the reference with itself."""

import os

import pytest
import torch

from lub_fast import ops

REQUIRE_KERNELS = os.environ.get("LUB_FAST_REQUIRE_KERNELS", "0") == "1"


def _require(*op_names):
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    else:
        missing = [name for name in op_names if not ops.has_kernel(name, "cuda")]
        if not missing:
            return
        reason = (
            f"no CUDA kernel registered for {missing} "
            f"(lub_fast._C_cuda: {ops.EXTENSION_ERRORS.get('lub_fast._C_cuda')})"
        )
    if REQUIRE_KERNELS:
        pytest.fail(f"{reason}, and LUB_FAST_REQUIRE_KERNELS=1")
    pytest.skip(reason)


@pytest.fixture
def require_cuda_kernels():
    """``require_cuda_kernels(*op_names)``: skip (or fail under LUB_FAST_REQUIRE_KERNELS=1) unless a
    CUDA device is present and every ``lub_fast::<op>`` has a registered CUDA kernel."""
    return _require


@pytest.fixture(scope="module")
def require_cuda_kernels_module():
    """``require_cuda_kernels`` for module-scoped gates (before a module's expensive fixtures run)."""
    return _require
