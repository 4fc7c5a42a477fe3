"""Decoding image files into uint8 tensors, with clear errors for unreadable files."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

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


#: Images decoded per chunk aim at this many bytes, so that a cache build holds one chunk at a time.
DECODE_CHUNK_BYTES = 64 << 20


def channels_of(mode: str) -> int:
    return 1 if mode == "L" else 3


def decode_chunks(paths: Sequence[str | os.PathLike], size: int, mode: str, invert: bool = False,
                  desc: str = "decoding", progress: bool = True, chunk_rows: int | None = None) -> Iterator[np.ndarray]:
    """Decode ``paths`` in order, in parallel threads, as ``uint8 [n, C, size, size]`` chunks of
    ``chunk_rows`` images (by default about :data:`DECODE_CHUNK_BYTES`): the memory needed is one
    chunk, whatever the number of images."""
    channels = channels_of(mode)
    if chunk_rows is None:
        chunk_rows = max(1, DECODE_CHUNK_BYTES // (channels * size * size))
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool, \
            progress_bar(enabled=progress, total=len(paths), desc=desc, unit="image") as bar:
        for start in range(0, len(paths), chunk_rows):
            part = paths[start : start + chunk_rows]
            out = np.empty((len(part), size, size, channels), dtype=np.uint8)

            def work(i: int) -> None:
                out[i] = load_image(part[i], size, mode, invert)

            for _ in pool.map(work, range(len(part))):
                bar.update(1)
            yield np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def load_images(paths: Sequence[str | os.PathLike], size: int, mode: str, invert: bool = False,
                desc: str = "decoding", progress: bool = True) -> torch.Tensor:
    """Decode many images into one in-memory ``uint8 [N, C, size, size]`` tensor (the cached
    loaders stream :func:`decode_chunks` into a file instead)."""
    out = np.empty((len(paths), channels_of(mode), size, size), dtype=np.uint8)
    start = 0
    for chunk in decode_chunks(paths, size, mode, invert, desc, progress):
        out[start : start + len(chunk)] = chunk
        start += len(chunk)
    return torch.from_numpy(out)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
