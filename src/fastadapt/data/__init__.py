"""Datasets and task families, registered by name in :data:`fastadapt.registry.DATASETS`.

A registered entry is a builder ``build(cfg, split, ways, shots, queries) -> task source``,
where ``cfg`` is the resolved run configuration (a plain dict) and ``split`` one of
``train``, ``val``, ``test``. A builder may declare ``kind`` (``classification`` or
``regression``) and ``in_shape(cfg) -> shape of one input``, which lets a trained run be loaded
(:func:`fastadapt.load_run`) without reading the dataset.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, DataError
from ..registry import DATASETS
from ..tasks.sampler import ClassPool, EpisodeSampler
from .glyphs import SPLITS as _GLYPH_SPLITS
from .glyphs import glyph_pools
from .imagefolder import imagefolder_pools, imagefolder_classes
from .omniglot import ROTATIONS as _OMNIGLOT_ROTATIONS
from .omniglot import omniglot_pools, split_characters
from . import image_functions as _image_functions  # noqa: F401,E402  (registers the *-images datasets)


def _pick_split(pools: dict[str, ClassPool], split: str, cfg: dict[str, Any], dataset: str) -> tuple[ClassPool, str]:
    if split == "train":
        split = cfg.get("train_split") or "train"
    if split not in pools:
        known = ", ".join(sorted(pools))
        raise DataError(f"the {dataset} dataset has no '{split}' split (it has {known})")
    return pools[split], split


@DATASETS.register("builtin")
def builtin_tasks(cfg: dict[str, Any], split: str, ways: int, shots: int, queries: int) -> EpisodeSampler:
    """Procedural glyphs (see :mod:`fastadapt.data.glyphs`); no download."""
    size = int(cfg.get("image_size") or 28)
    pools = glyph_pools(int(cfg.get("data_seed", 0)), size)
    pool, split = _pick_split(pools, split, cfg, "builtin")
    return EpisodeSampler(pool, ways, shots, queries, split)


def _gray_square(cfg: dict[str, Any]) -> tuple[int, int, int]:
    """One-channel ``image_size`` x ``image_size`` images (default 28), as the glyphs and Omniglot."""
    size = int(cfg.get("image_size") or 28)
    return (1, size, size)


builtin_tasks.in_shape = _gray_square  # type: ignore[attr-defined]


def _split_name(cfg: dict[str, Any], split: str) -> str:
    return (cfg.get("train_split") or "train") if split == "train" else split


def _glyph_classes(cfg: dict[str, Any], split: str) -> int:
    split = _split_name(cfg, split)
    if split == "trainval":
        return _GLYPH_SPLITS["train"] + _GLYPH_SPLITS["val"]
    return _GLYPH_SPLITS[split]


# Classes of a split, known without reading the data: learners with one classifier row per
# training class (qiao, ncm) are built from a configuration alone (fastadapt.load_run).
builtin_tasks.num_classes = _glyph_classes  # type: ignore[attr-defined]


@DATASETS.register("omniglot")
def omniglot_tasks(cfg: dict[str, Any], split: str, ways: int, shots: int, queries: int) -> EpisodeSampler:
    """Omniglot, Vinyals split with rotations (see :mod:`fastadapt.data.omniglot`)."""
    data_dir = cfg.get("data_dir")
    pools = omniglot_pools(str(data_dir) if data_dir else None, int(cfg.get("image_size") or 28),
                           bool(cfg.get("download", True)), bool(cfg.get("progress", True)))
    pool, split = _pick_split(pools, split, cfg, "omniglot")
    return EpisodeSampler(pool, ways, shots, queries, split)


omniglot_tasks.in_shape = _gray_square  # type: ignore[attr-defined]
omniglot_tasks.num_classes = (  # type: ignore[attr-defined]
    lambda cfg, split: len(split_characters(_split_name(cfg, split))) * len(_OMNIGLOT_ROTATIONS))


@DATASETS.register("imagefolder")
def imagefolder_tasks(cfg: dict[str, Any], split: str, ways: int, shots: int, queries: int) -> EpisodeSampler:
    """Your own images: ``--data-dir DIR`` with ``train/``, ``test/`` and optional ``val/``."""
    data_dir = cfg.get("data_dir")
    if not data_dir:
        raise ConfigError("--dataset imagefolder needs --data-dir DIR (DIR/train/<class>/*, DIR/test/<class>/*)")
    pools = imagefolder_pools(str(data_dir), int(cfg.get("image_size") or 84), bool(cfg.get("progress", True)))
    pool, split = _pick_split(pools, split, cfg, "imagefolder")
    return EpisodeSampler(pool, ways, shots, queries, split)


def _imagefolder_classes(cfg: dict[str, Any], split: str) -> int:
    data_dir = cfg.get("data_dir")
    if not data_dir:
        raise ConfigError("--dataset imagefolder needs --data-dir DIR (DIR/train/<class>/*, DIR/test/<class>/*)")
    return imagefolder_classes(str(data_dir), _split_name(cfg, split))


imagefolder_tasks.num_classes = _imagefolder_classes  # type: ignore[attr-defined]


def build_task_source(cfg: dict[str, Any], split: str, ways: int, shots: int, queries: int) -> Any:
    """The task source of ``cfg['dataset']`` for ``split``."""
    return DATASETS.get(cfg["dataset"])(cfg, split, ways, shots, queries)


__all__ = ["build_task_source", "glyph_pools", "omniglot_pools", "imagefolder_pools"]
