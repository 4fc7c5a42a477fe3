"""Decoding image files into uint8 tensors, with clear errors for unreadable files."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..progress import progress_bar

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def load_image(path: str | os.PathLike, size: int, mode: str, invert: bool = False) -> np.ndarray:
    """One image as ``uint8 [size, size, channels]`` (``mode`` is PIL's "L" or "RGB")."""
    try:
        with Image.open(path) as im:
            im = im.convert(mode).resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); replace or delete the file") from exc
    if invert:
        arr = 255 - arr
    return arr.reshape(size, size, -1)


def load_images(paths: Sequence[str | os.PathLike], size: int, mode: str, invert: bool = False,
                desc: str = "decoding", progress: bool = True) -> torch.Tensor:
    """Decode many images in parallel threads into ``uint8 [N, C, size, size]``."""
    out = np.empty((len(paths), size, size, 1 if mode == "L" else 3), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = load_image(paths[i], size, mode, invert)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        for _ in progress_bar(pool.map(work, range(len(paths))), enabled=progress, total=len(paths), desc=desc,
                              unit="image"):
            pass
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
