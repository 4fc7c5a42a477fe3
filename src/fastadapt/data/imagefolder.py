"""Your own few-shot dataset: ``DIR/{train,val,test}/<class>/<image>``.

Every image is converted to gray (when all images are gray) or RGB, resized to
``image_size`` x ``image_size`` and cached as ``uint8``, keyed by the folder's file list, sizes
and modification times, so an edited folder is decoded again and an unchanged one is not.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from ..io import load_checkpoint, save_checkpoint
from ..errors import DataError
from ..tasks.sampler import ClassPool
from .cache import cache_dir
from .images import list_images, load_images

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


@lru_cache(maxsize=2)
def imagefolder_pools(data_dir: str, image_size: int = 84, progress: bool = True) -> dict[str, ClassPool]:
    """Class pools of each split present in ``data_dir``."""
    root = Path(data_dir)
    found = _scan(root)
    sig = hashlib.sha1(str(root.resolve()).encode())
    for split, classes in found.items():
        for name, files in classes:
            for f in files:
                st = f.stat()
                sig.update(f"{split}/{name}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    cache = cache_dir() / f"imagefolder-{image_size}px-{sig.hexdigest()[:16]}.pt"
    if cache.is_file():
        try:
            blob = load_checkpoint(cache)
            return {s: ClassPool(b["images"], b["offsets"], b["counts"], list(b["names"])) for s, b in blob.items()}
        except (DataError, KeyError, TypeError):
            cache.unlink(missing_ok=True)

    # Gray datasets stay single-channel; any colour image makes the whole dataset RGB.
    mode = "L"
    for classes in found.values():
        for _, files in classes:
            with Image.open(files[0]) as im:
                if im.mode not in ("1", "L", "I", "I;16", "F"):
                    mode = "RGB"
                    break
        if mode == "RGB":
            break
    pools = {}
    for split, classes in found.items():
        paths = [f for _, files in classes for f in files]
        labels = [i for i, (_, files) in enumerate(classes) for _ in files]
        images = load_images(paths, image_size, mode, desc=f"decoding {split}", progress=progress)
        pools[split] = ClassPool.from_labels(images, torch.tensor(labels), [n for n, _ in classes])
    save_checkpoint({s: {"images": p.images, "offsets": p.offsets, "counts": p.counts, "names": p.class_names}
                     for s, p in pools.items()}, cache)
    return pools
