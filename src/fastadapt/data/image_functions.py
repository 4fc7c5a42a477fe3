"""Image datasets as image-function task families (``kind = "image_function"``).

Each ``--dataset NAME-images`` turns the images of a dataset split into tasks of
:class:`fastadapt.tasks.image_function.ImageFunctionTasks`: fit a coordinate network to one image.
Train and test images come from the dataset's own disjoint splits:

* ``builtin-images``   the built-in procedural glyphs (train/val/test classes), nothing to download;
* ``omniglot-images``  Omniglot drawings of the Vinyals train/val/test characters (no rotations);
* ``mnist-images``     MNIST (see :mod:`fastadapt.data.mnist` for its split of the test file);
* ``cifar10-images``   CIFAR-10's official train (50,000) and test (10,000) images;
* ``imagefolder-images`` every image under ``DIR/train``, ``DIR/test`` (and ``DIR/val``), classes ignored.

Images are resized to ``--image-size`` (the dataset's default: 28 for glyphs, Omniglot and MNIST,
32 for CIFAR-10 and image folders). ``--support-fraction`` below 1 observes a random subset of each
image's pixels.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError
from ..registry import DATASETS
from ..tasks.image_function import KIND, ImageFunctionTasks, resize_images
from .cifar10 import load_cifar10
from .glyphs import SPLITS as GLYPH_SPLITS
from .glyphs import glyph_pools
from .imagefolder import imagefolder_pools
from .mnist import mnist_splits
from .omniglot import DRAWINGS, load_characters, split_characters

NAMES = ("builtin-images", "omniglot-images", "mnist-images", "cifar10-images", "imagefolder-images")


def _size(cfg: dict[str, Any], default: int) -> int:
    return int(cfg.get("image_size") or default)


def _tasks(images: Tensor, ids: Tensor, id_space: str, cfg: dict[str, Any], split: str, name: str) -> ImageFunctionTasks:
    return ImageFunctionTasks(images, split, float(cfg.get("support_fraction") or 1.0), ids, name, id_space)


def _no_split(name: str, split: str, known: tuple[str, ...]) -> DataError:
    return DataError(f"the {name} dataset has no '{split}' split (it has {', '.join(known)})")


def _train_split(cfg: dict[str, Any], split: str) -> str:
    return (cfg.get("train_split") or "train") if split == "train" else split


def _register(name: str, default_size: int, channels: int | None):
    """Register ``builder`` as dataset ``name`` of the image-function kind; with ``channels`` known,
    the input shape of a run is declared without reading the data."""

    def wrap(builder):
        builder.kind = KIND
        if channels is not None:
            builder.in_shape = lambda cfg: (channels, _size(cfg, default_size), _size(cfg, default_size))
        return DATASETS.register(name)(builder)

    return wrap


@lru_cache(maxsize=2)
def _glyph_images(seed: int, size: int) -> dict[str, tuple[Tensor, Tensor]]:
    pools = glyph_pools(seed, size)
    per_class = int(pools["train"].counts[0])
    out, start = {}, 0
    for split, count in GLYPH_SPLITS.items():
        ids = torch.arange(start * per_class, (start + count) * per_class)
        out[split] = (pools[split].images, ids)
        start += count
    out["trainval"] = (torch.cat([out["train"][0], out["val"][0]]), torch.cat([out["train"][1], out["val"][1]]))
    return out


@_register("builtin-images", 28, 1)
def builtin_image_tasks(cfg: dict[str, Any], split: str, ways: int, shots: int, queries: int) -> ImageFunctionTasks:
    """The built-in glyphs as image functions (images of disjoint glyph classes per split); no download."""
    split = _train_split(cfg, split)
    splits = _glyph_images(int(cfg.get("data_seed", 0)), _size(cfg, 28))
    if split not in splits:
        raise _no_split("builtin-images", split, tuple(splits))
    images, ids = splits[split]
    return _tasks(images, ids, "glyphs", cfg, split, "builtin-images")


@lru_cache(maxsize=2)
def _omniglot_images(data_dir: str | None, size: int, download: bool, progress: bool) -> dict[str, tuple[Tensor, Tensor]]:
    images, names = load_characters(data_dir, size, download, progress)  # [1623, 20, 1, S, S]
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for split in ("train", "val", "trainval", "test"):
        chars = torch.tensor([index[c] for c in split_characters(split)])
        ids = (chars[:, None] * DRAWINGS + torch.arange(DRAWINGS)).reshape(-1)
        out[split] = (images[chars].reshape(-1, *images.shape[2:]), ids)
    return out


@_register("omniglot-images", 28, 1)
def omniglot_image_tasks(cfg: dict[str, Any], split: str, ways: int, shots: int, queries: int) -> ImageFunctionTasks:
    """Omniglot drawings as image functions: the characters of the Vinyals split (train 1028, val 172,
    test 423 characters of 20 drawings), upright, strokes bright on black."""
    split = _train_split(cfg, split)
    data_dir = cfg.get("data_dir")
    splits = _omniglot_images(str(data_dir) if data_dir else None, _size(cfg, 28), bool(cfg.get("download", True)),
                              bool(cfg.get("progress", True)))
    if split not in splits:
        raise _no_split("omniglot-images", split, tuple(splits))
    images, ids = splits[split]
    return _tasks(images, ids, "omniglot-drawings", cfg, split, "omniglot-images")


@_register("mnist-images", 28, 1)
def mnist_image_tasks(cfg: dict[str, Any], split: str, ways: int, shots: int, queries: int) -> ImageFunctionTasks:
    """MNIST digits as image functions (the official train/test files, or the test file split
    8,000 / 2,000 by index when only it is present: every fifth image is a test image)."""
    data_dir = cfg.get("data_dir")
    splits = mnist_splits(str(data_dir) if data_dir else None)
    if split not in splits:
        raise _no_split("mnist-images", split, tuple(splits))
    images, ids, space = splits[split]
    return _tasks(resize_images(images, _size(cfg, 28)), ids, space, cfg, split, "mnist-images")


@lru_cache(maxsize=2)
def _cifar_images(split: str, data_dir: str | None, size: int, download: bool, progress: bool) -> Tensor:
    images, _ = load_cifar10(split, data_dir, download, progress)
    return resize_images(images, size)


@_register("cifar10-images", 32, 3)
def cifar10_image_tasks(cfg: dict[str, Any], split: str, ways: int, shots: int, queries: int) -> ImageFunctionTasks:
    """CIFAR-10 images as image functions: the official train (50,000) and test (10,000) images."""
    if split not in ("train", "test"):
        raise _no_split("cifar10-images", split, ("train", "test"))
    data_dir = cfg.get("data_dir")
    images = _cifar_images(split, str(data_dir) if data_dir else None, _size(cfg, 32), bool(cfg.get("download", True)),
                           bool(cfg.get("progress", True)))
    return _tasks(images, torch.arange(len(images)), f"cifar10-{split}", cfg, split, "cifar10-images")


@_register("imagefolder-images", 32, None)
def imagefolder_image_tasks(cfg: dict[str, Any], split: str, ways: int, shots: int, queries: int) -> ImageFunctionTasks:
    """Your own images as image functions: ``--data-dir DIR`` with ``DIR/train/<folder>/*`` and
    ``DIR/test/<folder>/*`` (optional ``DIR/val``); sub-folders only group files."""
    from ..errors import ConfigError

    data_dir = cfg.get("data_dir")
    if not data_dir:
        raise ConfigError("--dataset imagefolder-images needs --data-dir DIR (DIR/train/<folder>/*, DIR/test/<folder>/*)")
    pools = imagefolder_pools(str(data_dir), _size(cfg, 32), bool(cfg.get("progress", True)))
    split = _train_split(cfg, split)
    if split not in pools:
        raise _no_split("imagefolder-images", split, tuple(sorted(pools)))
    images = pools[split].images
    return _tasks(images, torch.arange(len(images)), f"{data_dir}/{split}", cfg, split, "imagefolder-images")
