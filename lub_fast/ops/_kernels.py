"""Whether a compiled kernel is registered for a ``lub_fast`` op on a device type."""

import torch

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@torch.compiler.assume_constant_result
def has_kernel(op_name: str, device_type: str) -> bool:
    """True when a compiled kernel is registered for ``lub_fast::op_name`` on ``device_type`` (``"cpu"``,
    ``"cuda"``; False for any other). A constant under ``torch.compile``: registrations do not change
    while a graph runs."""
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"lub_fast::{op_name}", key)
