"""The 15 CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019), vectorised over a batch.

"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations". Parameters are
the published CIFAR-10-C ones (``make_cifar_c.py`` of the authors' ``robustness`` repository),
severities 1 to 5. The reference code runs one PIL image at a time through scikit-image, OpenCV
and ImageMagick; here every corruption is written in numpy/scipy/torch and works on a whole
``[N, H, W, 3]`` batch, with these equivalences:

* ImageMagick's ``MotionBlurImage`` is a one-sided Gaussian line kernel of ``2 * ceil(radius) + 1``
  taps along the blur angle, edge pixels repeated (:func:`_motion_blur`).
* scikit-image's ``rgb2hsv -> V + c -> hsv2rgb`` keeps hue and saturation, which scales RGB by
  ``V' / V`` (:func:`_brightness`).
* OpenCV's ``GaussianBlur``, ``filter2D``, ``warpAffine`` (reflect-101 border) and ``resize``
  are written out directly.
* Glass blur's pixel "swap" in the published code assigns through numpy views, so it copies the
  neighbour into ``(h, w)`` and leaves the neighbour as it was; in its scan order every source
  pixel is read before it is written, so one pass is a single gather (:func:`_glass_shuffle`).

Randomness comes from one ``numpy.random.Generator`` seeded by ``(seed, corruption, severity)``,
so a corruption is a pure function of its inputs. Frost overlays photographs of frost; they are
read from ``frost_dir``, ``$FASTADAPT_FROST_DIR`` or an installed ``imagecorruptions`` package
(``pip install --no-deps imagecorruptions`` is enough; its code is not imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from ..errors import ConfigError, DataError

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)
SIZE = 32


def _check_corruption(name: str) -> None:
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption '{name}'; choose one of {', '.join(CORRUPTIONS)}")


def _check_severity(severity: int) -> None:
    if not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise ConfigError(f"severity must be an integer from 1 to 5, got {severity!r}")


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"corrupt() takes uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if tuple(images.shape[2:]) != (SIZE, SIZE):
        raise ConfigError(f"the CIFAR-10-C parameters are for 32x32 images, got {tuple(images.shape[2:])}")


# ----------------------------------------------------------------------------------------- helpers

def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian over the spatial axes of ``[N, H, W(, C)]``."""
    sig = (0.0, sigma, sigma) + ((0.0,) if x.ndim == 4 else ())
    return ndimage.gaussian_filter(x, sig, mode=mode, truncate=truncate)


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre of ``[N, H, H, C]`` by ``factor``, cropped back to ``H``.

    ``scipy.ndimage.zoom(order=1)`` as in the reference: output pixel ``o`` samples input
    ``o * (ch - 1) / (out - 1)`` linearly, i.e. bilinear resizing with aligned corners.
    """
    h = x.shape[1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    size = int(round(ch * factor))
    crop = torch.from_numpy(np.ascontiguousarray(x[:, top : top + ch, top : top + ch])).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(crop.double(), size=(size, size), mode="bilinear", align_corners=True)
    out = out.permute(0, 2, 3, 1).numpy().astype(x.dtype)
    trim = (size - h) // 2
    return out[:, trim : trim + h, trim : trim + h]


def _reflect101(i: np.ndarray, n: int) -> np.ndarray:
    i = np.abs(i)
    return np.where(i > n - 1, 2 * (n - 1) - i, i)


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    i = np.where(i < 0, -i - 1, i)
    return np.where(i > n - 1, 2 * n - 1 - i, i)


def _bilinear(x: np.ndarray, ys: np.ndarray, xs: np.ndarray, border) -> np.ndarray:
    """Sample ``x [N, H, W, C]`` at float positions ``ys, xs [N, H, W]``; ``border`` maps indices."""
    n, h, w, _ = x.shape
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    b = np.arange(n)[:, None, None]
    ya, yb = border(y0, h), border(y0 + 1, h)
    xa, xb = border(x0, w), border(x0 + 1, w)
    top = x[b, ya, xa] * (1 - fx) + x[b, ya, xb] * fx
    bot = x[b, yb, xa] * (1 - fx) + x[b, yb, xb] * fx
    return top * (1 - fy) + bot * fy


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick ``MotionBlurImage`` on ``[N, H, W, C]`` with one angle per image."""
    width = 2 * int(math.ceil(radius)) + 1
    taps = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    a = np.deg2rad(angles_deg)[:, None]
    ox = np.ceil(taps[None] * np.cos(a) - 0.5).astype(np.int64)  # [N, width]
    oy = np.ceil(taps[None] * np.sin(a) - 0.5).astype(np.int64)
    n, h, w, _ = x.shape
    b = np.arange(n)[:, None, None]
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(width):
        r = np.clip(rows + oy[:, i, None, None], 0, h - 1)
        c = np.clip(cols + ox[:, i, None, None], 0, w - 1)
        out += kernel[i] * x[b, r, c]
    return out


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """Defocus kernel: an aliased disk smoothed by OpenCV's 3x3 Gaussian (reflect-101 border)."""
    ax = np.arange(-8, 9)
    xx, yy = np.meshgrid(ax, ax)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_blur**2))
    g /= g.sum()
    k = ndimage.correlate1d(disk, g, axis=0, mode="mirror")
    k = ndimage.correlate1d(k, g, axis=1, mode="mirror")
    keep_r, keep_c = np.nonzero(k.any(1))[0], np.nonzero(k.any(0))[0]  # drop all-zero border rows
    return k[keep_r[0] : keep_r[-1] + 1, keep_c[0] : keep_c[-1] + 1]


def _plasma_fractal(n: int, wibbledecay: float, rng: np.random.Generator, mapsize: int = SIZE) -> np.ndarray:
    """Diamond-square height maps ``[n, mapsize, mapsize]`` in ``[0, 1]`` (reference's fog)."""
    m = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled_mean(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corner = m[:, 0:mapsize:step, 0:mapsize:step]
        sq = corner + np.roll(corner, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        m[:, half:mapsize:step, half:mapsize:step] = wibbled_mean(sq)
        dr = m[:, half:mapsize:step, half:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2)
        m[:, 0:mapsize:step, half:mapsize:step] = wibbled_mean(lt)
        tt = dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1)
        m[:, half:mapsize:step, 0:mapsize:step] = wibbled_mean(tt)
        step //= 2
        wibble /= wibbledecay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def _glass_shuffle(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """One pass of the reference's local pixel shuffling, as a gather.

    ``offsets [N, H-2, W-2, 2]`` are the ``(dx, dy)`` drawn for positions ``h, w = 2 .. H-1``.
    """
    n, h, w, _ = x.shape
    out = x.copy()
    hh = np.arange(2, h)[None, :, None]
    ww = np.arange(2, w)[None, None, :]
    b = np.arange(n)[:, None, None]
    out[:, 2:, 2:] = x[b, hh + offsets[..., 1], ww + offsets[..., 0]]
    return out


def _frost_dir(frost_dir: str | os.PathLike | None) -> Path:
    candidates = [frost_dir, os.environ.get("FASTADAPT_FROST_DIR")]
    spec = importlib.util.find_spec("imagecorruptions")  # locates the package without running it
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "frost" for p in spec.submodule_search_locations]
    for c in candidates:
        if c and (Path(c) / "frost1.png").is_file():
            return Path(c)
    raise DataError("frost needs the frost photographs frost1.png ... frost5.jpg: "
                    "pip install --no-deps imagecorruptions, or set FASTADAPT_FROST_DIR to a folder holding them")


def frost_photographs(frost_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the frost photographs (``frost_dir``, ``$FASTADAPT_FROST_DIR`` or an installed
    ``imagecorruptions``); raises ``DataError`` with how to get them when there is none."""
    return _frost_dir(frost_dir)


@lru_cache(maxsize=4)
def _frost_images(folder: str) -> tuple[np.ndarray, ...]:
    """The five frost photos used by CIFAR-10-C, RGB, shrunk 5x as OpenCV's bilinear resize does."""
    from PIL import Image

    out = []
    for name in ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"):
        with Image.open(Path(folder) / name) as im:
            arr = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        small = torch.nn.functional.interpolate(arr, scale_factor=0.2, mode="bilinear", align_corners=False,
                                                recompute_scale_factor=False, antialias=False)
        out.append(small[0].permute(1, 2, 0).round().numpy())
    return tuple(out)


# -------------------------------------------------------------------- corruptions ([N, H, W, 3] uint8)

def _gaussian_noise(x, s, rng, **_):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    x = x / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _shot_noise(x, s, rng, **_):
    c = [500, 250, 100, 75, 50][s - 1]
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def _impulse_noise(x, s, rng, **_):
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    x = x / 255.0
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    x = np.where(flipped & salted, 1.0, x)
    x = np.where(flipped & ~salted, 0.0, x)
    return x * 255


def _defocus_blur(x, s, rng, **_):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    k = _disk(radius, alias)
    out = ndimage.correlate(x / 255.0, k[None, :, :, None], mode="mirror")
    return np.clip(out, 0, 1) * 255


def _glass_blur(x, s, rng, **_):
    sigma, delta, iters = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][s - 1]
    x = (_gaussian(x / 255.0, sigma) * 255).astype(np.uint8)
    n, h, w, _ = x.shape
    for _ in range(iters):
        x = _glass_shuffle(x, rng.integers(-delta, delta, size=(n, h - 2, w - 2, 2)))
    return np.clip(_gaussian(x / 255.0, sigma), 0, 1) * 255


def _motion_blur_c(x, s, rng, **_):
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][s - 1]
    angles = rng.uniform(-45, 45, size=len(x))
    return np.clip(np.round(_motion_blur(x.astype(np.float64), radius, sigma, angles)), 0, 255)


def _zoom_blur(x, s, rng, **_):
    top = [1.06, 1.11, 1.16, 1.21, 1.26][s - 1]
    x = (x / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    factors = np.arange(1, top, 0.01)
    for f in factors:
        out += _clipped_zoom(x, f)
    return np.clip((x + out) / (len(factors) + 1), 0, 1) * 255


def _snow(x, s, rng, **_):
    c = [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][s - 1]
    x = x.astype(np.float32) / 255.0
    n, h, w, _ = x.shape
    layer = rng.normal(size=(n, h, w), loc=c[0], scale=c[1])
    layer = _clipped_zoom(layer[..., None], c[2])
    layer[layer < c[3]] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8).astype(np.float64)  # the 8-bit PNG round trip
    layer = np.round(_motion_blur(layer, c[4], c[5], rng.uniform(-135, -45, size=n))) / 255.0
    gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, 2, axes=(1, 2)), 0, 1) * 255


def _frost(x, s, rng, frost_dir=None, **_):
    c = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    frosts = _frost_images(str(_frost_dir(frost_dir)))
    n, h, w, _ = x.shape
    idx = rng.integers(5, size=n)
    layer = np.empty(x.shape, dtype=np.float32)
    for k in range(5):
        sel = np.nonzero(idx == k)[0]
        if len(sel) == 0:
            continue
        fr = frosts[k]
        y0 = rng.integers(0, fr.shape[0] - h, size=len(sel))
        x0 = rng.integers(0, fr.shape[1] - w, size=len(sel))
        rows = y0[:, None, None] + np.arange(h)[None, :, None]
        cols = x0[:, None, None] + np.arange(w)[None, None, :]
        layer[sel] = fr[rows, cols]
    return np.clip(c[0] * x.astype(np.float32) + c[1] * layer, 0, 255)


def _fog(x, s, rng, **_):
    strength, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    x = x / 255.0
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + strength * _plasma_fractal(len(x), decay, rng)[..., None]
    return np.clip(x * max_val / (max_val + strength), 0, 1) * 255


def _brightness(x, s, rng, **_):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    x = x / 255.0
    v = x.max(axis=-1, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    # Same hue and saturation: RGB scales with V; a black pixel (V = 0, S = 0) becomes grey V'.
    out = np.where(v > 0, x * v_new / np.where(v > 0, v, 1), v_new)
    return np.clip(out, 0, 1) * 255


def _contrast(x, s, rng, **_):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    x = x / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


_ELASTIC = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)]


def _elastic_displacement(noise: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed displacement fields ``(dx, dy)`` from uniform noise ``[2, N, H, W]``.

    Severity trades the global affine jitter (largest at 1) for local warping: the
    displacement's amplitude-to-smoothness ratio ``alpha / sigma`` grows from 0 to 3.3.
    """
    alpha, sigma, _ = (v * SIZE for v in _ELASTIC[s - 1])
    dx = _gaussian(noise[0], sigma, mode="reflect", truncate=3) * alpha
    dy = _gaussian(noise[1], sigma, mode="reflect", truncate=3) * alpha
    return dx, dy


def _elastic_transform(x, s, rng, **_):
    affine = _ELASTIC[s - 1][2] * SIZE
    x = x.astype(np.float32) / 255.0
    n, h, w, _ = x.shape
    centre, half = np.float32(h // 2), h // 3
    pts1 = np.array([[centre + half, centre + half], [centre + half, centre - half], [centre - half, centre - half]])
    pts2 = pts1[None] + rng.uniform(-affine, affine, size=(n, 3, 2)).astype(np.float32)
    # cv2.getAffineTransform: M [2, 3] with M @ (x, y, 1) = pts2; warpAffine samples src at M^-1 (dst).
    a = np.concatenate([pts1, np.ones((3, 1))], 1)
    m = np.linalg.solve(a[None], pts2).transpose(0, 2, 1)  # [N, 2, 3]
    lin_inv = np.linalg.inv(m[:, :, :2])
    shift = -np.einsum("nij,nj->ni", lin_inv, m[:, :, 2])
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    sx = lin_inv[:, 0, 0, None, None] * xx + lin_inv[:, 0, 1, None, None] * yy + shift[:, 0, None, None]
    sy = lin_inv[:, 1, 0, None, None] * xx + lin_inv[:, 1, 1, None, None] * yy + shift[:, 1, None, None]
    x = _bilinear(x, sy, sx, _reflect101)
    dx, dy = _elastic_displacement(rng.uniform(-1, 1, size=(2, n, h, w)), s)
    return np.clip(_bilinear(x, yy[None] + dy, xx[None] + dx, _reflect), 0, 1) * 255


def _pixelate(x, s, rng, **_):
    from PIL import Image

    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    n, h, w, _ = x.shape
    small = (int(w * c), int(h * c))
    out = np.empty_like(x)
    for i in range(n):  # PIL's BOX filter per image: microseconds each, no Python per pixel
        im = Image.fromarray(x[i]).resize(small, Image.BOX).resize((w, h), Image.BOX)
        out[i] = np.asarray(im)
    return out


def _jpeg_compression(x, s, rng, **_):
    from PIL import Image

    q = [80, 65, 58, 50, 40][s - 1]
    out = np.empty_like(x)
    for i in range(len(x)):
        buf = io.BytesIO()
        Image.fromarray(x[i]).save(buf, "JPEG", quality=q)
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


_FUNCS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur_c,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness,
    "contrast": _contrast, "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


def _corrupt_array(x: np.ndarray, name: str, severity: int, rng: np.random.Generator, frost_dir=None) -> np.ndarray:
    out = _FUNCS[name](x, int(severity), rng, frost_dir=frost_dir)
    return np.clip(out, 0, 255).astype(np.uint8)


def corrupt(
    images: Tensor, name: str, severity: int, seed: int = 0, frost_dir: str | os.PathLike | None = None
) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to uint8 ``images [N, 3, 32, 32]``.

    Returns uint8 images of the same shape; the result is a pure function of
    ``(images, name, severity, seed)``. Values are truncated to integers as the published
    code's ``np.uint8`` does.
    """
    _check_corruption(name)
    _check_severity(severity)
    _check_images(images)
    rng = np.random.default_rng([int(seed), CORRUPTIONS.index(name), int(severity)])
    out = _corrupt_array(images.permute(0, 2, 3, 1).cpu().numpy(), name, severity, rng, frost_dir)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()


CACHE_VERSION = 1
CHUNK = 1000


def corrupt_dataset(
    images: Tensor,
    name: str,
    severity: int,
    seed: int = 0,
    frost_dir: str | os.PathLike | None = None,
    cache: bool = True,
    progress: bool = True,
) -> Tensor:
    """:func:`corrupt` over a whole dataset in chunks of 1,000 images, cached in the user cache.

    Chunk ``k`` draws from its own stream ``(seed, corruption, severity, k)``, so the result does
    not depend on memory limits; the cache is keyed by a digest of ``images``.
    """
    _check_corruption(name)
    _check_severity(severity)
    _check_images(images)
    from ..data.cache import cache_dir
    from ..io import load_checkpoint, save_checkpoint
    from ..progress import progress_bar

    path = None
    if cache:
        digest = hashlib.sha1(images.contiguous().numpy().tobytes()).hexdigest()[:16]
        path = cache_dir() / "cifar10c" / f"v{CACHE_VERSION}-{digest}" / f"{name}-{int(severity)}-seed{int(seed)}.pt"
        if path.is_file():
            try:
                cached = load_checkpoint(path)
                if cached.shape == images.shape:
                    return cached
            except DataError:
                pass  # rebuilt below
    x = images.permute(0, 2, 3, 1).numpy()
    out = np.empty_like(x)
    chunks = range(0, len(x), CHUNK)
    for k, i in enumerate(progress_bar(chunks, enabled=progress, desc=f"{name}-{severity}")):
        rng = np.random.default_rng([int(seed), CORRUPTIONS.index(name), int(severity), k])
        out[i : i + CHUNK] = _corrupt_array(x[i : i + CHUNK], name, severity, rng, frost_dir)
    result = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    if path is not None:
        save_checkpoint(result, path)
    return result
