"""Whether code is running under ``torch.func.vmap`` (a leaf helper for models and methods)."""

from __future__ import annotations

import torch
from torch import Tensor


def under_vmap(t: Tensor) -> bool:
    """True when ``t`` carries a ``torch.func.vmap`` batch dimension (at any transform level)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False
