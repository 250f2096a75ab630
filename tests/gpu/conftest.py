"""Gate of the GPU kernel tests: ``require_kernels("cuda", ...)`` from ``tests/conftest.py`` (skip
without a CUDA device; with one, a missing kernel fails under ``LUB_FAST_REQUIRE_KERNELS=1``)."""

import functools

import pytest


@pytest.fixture
def require_cuda_kernels(require_kernels):
    """``require_cuda_kernels(*op_names)``: ``require_kernels("cuda", *op_names)``."""
    return functools.partial(require_kernels, "cuda")


@pytest.fixture(scope="module")
def require_cuda_kernels_module(require_kernels):
    """``require_cuda_kernels`` for module-scoped gates (before a module's expensive fixtures run)."""
    return functools.partial(require_kernels, "cuda")
