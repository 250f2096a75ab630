"""lub_fast ops: ``torch.library`` custom ops whose default implementation is a PyTorch reference.

Each op module defines the schema, the reference ``<op>_ref``, fake and autograd registration and
the public function. The compiled extensions (``lub_fast._C`` for CPU kernels, ``lub_fast._C_cuda``
for CUDA kernels) only add kernels for dispatch keys; when they are missing every op still runs its
reference, with one warning saying why.
"""

import os
import warnings

from lub_fast.ops import attention, bias_gelu, wwm  # defines the ops
from lub_fast.ops._kernels import has_kernel  # noqa: F401  (re-exported)

# Every op this package defines, without the ``lub_fast::`` namespace.
OP_NAMES = attention.OPS + bias_gelu.OPS + wwm.OPS

# Why an extension could not be loaded: None when it loaded, else the error text.
EXTENSION_ERRORS = {}


def _load_extensions():
    import importlib
    from pathlib import Path

    from lub_fast._build_stamp import stale_reason

    disabled = os.environ.get("LUB_FAST_NO_EXT", "0") == "1"
    stale = None if disabled else stale_reason(Path(__file__).resolve().parent.parent)
    for name in ("lub_fast._C", "lub_fast._C_cuda"):
        if disabled:
            EXTENSION_ERRORS[name] = "disabled by LUB_FAST_NO_EXT=1"
            continue
        if stale is not None:
            EXTENSION_ERRORS[name] = stale
            continue
        try:
            importlib.import_module(name)
            EXTENSION_ERRORS[name] = None
        except Exception as e:  # an ImportError, or an undefined symbol from a mismatched torch
            EXTENSION_ERRORS[name] = f"{type(e).__name__}: {e}"
    if EXTENSION_ERRORS["lub_fast._C"] is not None:
        warnings.warn(
            "lub_fast: the C++ extension lub_fast._C is not available "
            f"({EXTENSION_ERRORS['lub_fast._C']}); every op runs its PyTorch reference. "
            "Reinstall with `pip install --no-build-isolation .` to build it.",
            stacklevel=2,
        )


_load_extensions()

