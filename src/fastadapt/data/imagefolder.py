"""Your own few-shot dataset: ``DIR/{train,val,test}/<class>/<image>``.

Every image is converted to gray (when all images are gray) or RGB, resized to
``image_size`` x ``image_size`` and cached as one raw ``uint8`` file with a JSON index (see
:mod:`fastadapt.data.pool_cache`), keyed by the folder's file list, sizes and modification times,
so an edited folder is decoded again and an unchanged one is not. Decoding streams a chunk of
images at a time into the cache file, and the pools are memory-mapped from it: a folder larger
than memory trains, and runs and processes reading the same folder share one copy in the page
cache.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from typing import Any

import torch
from PIL import Image

from ..errors import DataError
from ..tasks.sampler import ClassPool
from .cache import cache_dir
from .images import channels_of, decode_chunks, list_images
from .pool_cache import CacheContent, cached_rows

SPLITS = ("train", "val", "test")


def _scan(root: Path) -> dict[str, list[tuple[str, list[Path]]]]:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; pass --data-dir DIR with DIR/train/<class>/*.png "
                        "and DIR/test/<class>/*.png")
    found: dict[str, list[tuple[str, list[Path]]]] = {}
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            continue
        classes = [(c.name, list_images(c)) for c in sorted(d.iterdir()) if c.is_dir()]
        classes = [(name, files) for name, files in classes if files]
        if classes:
            found[split] = classes
    for needed in ("train", "test"):
        if needed not in found:
            raise DataError(f"{root / needed} is missing or holds no class folders with images; an image folder "
                            "dataset needs train/ and test/ (val/ is optional), one sub-folder per class")
    return found


def imagefolder_classes(data_dir: str, split: str) -> int:
    """The number of classes of ``split`` in ``data_dir``, from the folder listing alone (no image
    is decoded)."""
    found = _scan(Path(data_dir))
    if split not in found:
        raise DataError(f"the imagefolder dataset has no '{split}' split (it has {', '.join(sorted(found))})")
    return len(found[split])


def imagefolder_cache_plan(data_dir: str, image_size: int) -> tuple[Path, str, dict[str, Any]]:
    """Where the decoded cache of ``data_dir`` at ``image_size`` lives (its stem, see
    :mod:`fastadapt.data.pool_cache`), the fingerprint of the folder it must match (file list,
    sizes, modification times) and its layout: per split, in row order, the class names and
    image counts."""
    return _plan(Path(data_dir), image_size)[1:]


def _plan(root: Path, image_size: int) -> tuple[dict[str, list[tuple[str, list[Path]]]], Path, str, dict[str, Any]]:
    found = _scan(root)
    sig = hashlib.sha1(str(root.resolve()).encode())
    for split, classes in found.items():
        for name, files in classes:
            for f in files:
                st = f.stat()
                sig.update(f"{split}/{name}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    stem = cache_dir() / f"imagefolder-{image_size}px-{sig.hexdigest()[:16]}"
    layout = {split: {"names": [n for n, _ in classes], "counts": [len(files) for _, files in classes]}
              for split, classes in found.items()}
    return found, stem, f"imagefolder {root.resolve()} sha1:{sig.hexdigest()}", {"splits": layout}


def _colour_mode(found: dict[str, list[tuple[str, list[Path]]]]) -> str:
    """Gray datasets stay single-channel; any colour image makes the whole dataset RGB."""
    for classes in found.values():
        for _, files in classes:
            with Image.open(files[0]) as im:
                if im.mode not in ("1", "L", "I", "I;16", "F"):
                    return "RGB"
    return "L"


def pools_from_rows(images: torch.Tensor, meta: dict[str, Any]) -> dict[str, ClassPool]:
    """Class pools over the rows of a cache laid out as :func:`imagefolder_cache_plan` says: views
    of ``images``, never copies."""
    pools, start = {}, 0
    for split, part in meta["splits"].items():
        counts = torch.tensor(part["counts"], dtype=torch.long)
        n = int(counts.sum())
        pools[split] = ClassPool(images[start : start + n], torch.cumsum(counts, 0) - counts, counts,
                                 list(part["names"]))
        start += n
    if start != len(images):
        raise DataError(f"an image folder cache holds {len(images)} images but its index lists {start}; "
                        "delete the cache to decode the folder again")
    return pools


@lru_cache(maxsize=2)
def imagefolder_pools(data_dir: str, image_size: int = 84, progress: bool = True) -> dict[str, ClassPool]:
    """Class pools of each split present in ``data_dir``, memory-mapped from the decoded cache
    (decoded in chunks on first use)."""
    found, stem, source, layout = _plan(Path(data_dir), image_size)

    def build() -> CacheContent:
        mode = _colour_mode(found)
        paths = [f for split in layout["splits"] for _, files in found[split] for f in files]
        chunks = decode_chunks(paths, image_size, mode, desc=f"decoding {Path(data_dir).name}", progress=progress)
        return CacheContent((channels_of(mode), image_size, image_size), len(paths), chunks, layout)

    images, meta = cached_rows(stem, source, build)
    return pools_from_rows(images, meta)
