"""The built-in few-shot dataset: procedurally drawn glyphs, no download needed.

Each class is a random "character": two to four quadratic Bezier strokes. Each instance
re-draws the character by hand, as it were: control points are jittered, then the whole glyph
gets a random rotation, scale, shear and shift, and a random pen width. Classes are a pure
function of the seed, so the same seed always gives the same dataset; disjoint class ranges
form the train, val and test splits, so evaluation is on unseen classes as with Omniglot.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..tasks.sampler import ClassPool
from .cache import cache_dir
from .pool_cache import CacheContent, cached_rows

SPLITS = {"train": 1000, "val": 100, "test": 300}


def _bezier(ctrl: torch.Tensor, points: int) -> torch.Tensor:
    """``ctrl [..., 3, 2]`` quadratic Bezier control points -> ``[..., points, 2]``."""
    t = torch.linspace(0.0, 1.0, points, dtype=ctrl.dtype)[:, None]
    p0, p1, p2 = ctrl[..., 0:1, :], ctrl[..., 1:2, :], ctrl[..., 2:3, :]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def make_glyphs(
    num_classes: int,
    per_class: int = 20,
    size: int = 28,
    seed: int = 0,
    jitter: float = 0.05,
    max_rotation_deg: float = 20.0,
    chunk: int = 2048,
) -> torch.Tensor:
    """Render ``uint8 [num_classes, per_class, 1, size, size]`` glyph images."""
    g = torch.Generator().manual_seed(seed)
    max_strokes, pts = 4, 48
    # Class prototypes: strokes in the unit square, a random number of them active.
    ctrl = 0.15 + 0.7 * torch.rand(num_classes, max_strokes, 3, 2, generator=g)
    n_strokes = torch.randint(2, max_strokes + 1, (num_classes,), generator=g)
    active = torch.arange(max_strokes)[None, :] < n_strokes[:, None]  # [C, S]

    n = num_classes * per_class
    inst = ctrl.repeat_interleave(per_class, 0) + jitter * torch.randn(n, max_strokes, 3, 2, generator=g)
    pts_xy = _bezier(inst, pts).reshape(n, max_strokes * pts, 2) - 0.5
    # Per-instance affine: rotation, anisotropic scale, shear, translation.
    ang = math.radians(max_rotation_deg) * (2 * torch.rand(n, generator=g) - 1)
    scale = 0.85 + 0.3 * torch.rand(n, 2, generator=g)
    shear = 0.15 * (2 * torch.rand(n, generator=g) - 1)
    shift = 0.08 * (2 * torch.rand(n, 2, generator=g) - 1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [n, 2, 2]
    sh = torch.eye(2).repeat(n, 1, 1)
    sh[:, 0, 1] = shear
    mat = rot @ sh * scale[:, None, :]
    pts_xy = pts_xy @ mat.transpose(1, 2) + 0.5 + shift[:, None, :]
    sigma = 0.02 + 0.012 * torch.rand(n, generator=g)  # pen width
    # A stroke is drawn as a line integral of a Gaussian pen: each sample point carries its share
    # of arc length, so the ink is even along the stroke whatever the Bezier speed. The Gaussian
    # is separable, so the whole image is one batched matrix product (rows x points x columns).
    seg = pts_xy.reshape(n, max_strokes, pts, 2)
    ds = torch.zeros(n, max_strokes, pts)
    step = (seg[:, :, 1:] - seg[:, :, :-1]).norm(dim=-1)
    ds[:, :, 1:] += 0.5 * step
    ds[:, :, :-1] += 0.5 * step
    weight = ds * active.repeat_interleave(per_class, 0)[:, :, None] / (sigma[:, None, None] * math.sqrt(2 * math.pi))
    weight = weight.reshape(n, -1)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    out = torch.empty(n, size, size, dtype=torch.uint8)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        inv = 1.0 / (2 * sigma[s:e, None, None] ** 2)
        gx = torch.exp(-((pts_xy[s:e, :, 0:1] - coords) ** 2) * inv)  # [b, P, W]
        gy = torch.exp(-((pts_xy[s:e, :, 1:2] - coords) ** 2) * inv)  # [b, P, H]
        ink = torch.bmm(gy.transpose(1, 2) * weight[s:e, None, :], gx).clamp_(0.0, 1.0)
        out[s:e] = (ink * 255).round_().to(torch.uint8)
    return out.reshape(num_classes, per_class, 1, size, size)


@lru_cache(maxsize=4)
def glyph_pools(seed: int = 0, size: int = 28, per_class: int = 20) -> dict[str, ClassPool]:
    """The built-in dataset's splits (1000 train, 100 val, 300 test classes of 20 images)."""
    total = sum(SPLITS.values())
    name = f"glyphs-v1-seed{seed}-{size}px-{per_class}"

    def build() -> CacheContent:
        images = make_glyphs(total, per_class=per_class, size=size, seed=seed).reshape(-1, 1, size, size)
        return CacheContent((1, size, size), len(images), [images.numpy()], {})

    images = cached_rows(cache_dir() / name, name, build, in_memory=True)[0].reshape(total, per_class, 1, size, size)
    pools, start = {}, 0
    for split, count in SPLITS.items():
        names = [f"glyph{c:04d}" for c in range(start, start + count)]
        pools[split] = ClassPool.from_grouped(images[start : start + count], names)
        start += count
    pools["trainval"] = ClassPool.from_grouped(images[: SPLITS["train"] + SPLITS["val"]],
                                               [f"glyph{c:04d}" for c in range(SPLITS["train"] + SPLITS["val"])])
    return pools
