"""Batched image transforms shared by source training and Test-Time Training.

Everything works on a whole batch at once with per-image random choices drawn from an explicit
``torch.Generator``, so there is no per-image Python loop and a seed fixes the outcome.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_batch(x: Tensor, labels: Tensor) -> Tensor:
    """Rotate image ``i`` of ``x [B, C, H, W]`` by ``labels[i] * 90`` degrees counter-clockwise.

    Label 0 is the upright image, 1 is 90 degrees, 2 is 180, 3 is 270: the four-way
    self-supervised task of Gidaris et al. (2018) used by TTT. Images must be square.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(x.shape[-2:])}")
    out = x.clone()
    for k in range(1, 4):
        sel = labels == k
        if sel.any():
            out[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
    return out


def random_rotation_labels(n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    return torch.randint(0, 4, (n,), generator=generator).to(device or "cpu")


def random_crop_flip(x: Tensor, generator: torch.Generator | None = None, padding: int = 4) -> Tensor:
    """Standard CIFAR augmentation: zero-pad by ``padding``, random crop back, random h-flip."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def to_float(images: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` images -> float ``[0, 1]``."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images
