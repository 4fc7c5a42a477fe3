"""CIFAR-10 (Krizhevsky 2009) as uint8 tensors, read from a local copy or the official download.

Two on-disk forms are understood:

* ``cifar10-jpg-{train,test}.tar.gz`` holding ``{train,test}/<class>/<n>.jpg`` (JPEG re-encodings
  of the official images, e.g. a shared read-only data folder). The archive is read in place,
  never extracted.
* the official ``cifar-10-python.tar.gz`` (downloaded into the user cache when no folder is
  given; md5-checked, written atomically). Its pickled batches are read straight from the archive
  with an unpickler that only admits numpy arrays, so nothing is extracted and no code is run.

Either way the decoded split is cached in ``cache_dir()/cifar10`` as a raw file of
``[N, 3, 32, 32]`` uint8 images, read memory-mapped, with the labels in its JSON index (see
:mod:`fastadapt.data.pool_cache`), keyed by the archive's checksum, so later runs load in well under
a second.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..progress import progress_bar
from .cache import cache_dir, default_data_dir, env_data_dir
from .download import download, file_digest
from .pool_cache import CacheContent, cached_rows

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
OFFICIAL_NAME = "cifar-10-python.tar.gz"
JPG_NAME = "cifar10-jpg-{split}.tar.gz"
SPLITS = ("train", "test")
SPLIT_SIZES = {"train": 50000, "test": 10000}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"CIFAR-10 split must be one of {', '.join(SPLITS)}, got '{split}'")


def _decode_jpg_tar(path: Path, split: str, progress: bool = True) -> tuple[Tensor, Tensor]:
    from PIL import Image

    records: list[tuple[int, str, np.ndarray]] = []
    try:
        with tarfile.open(path, "r:gz") as tar, progress_bar(enabled=progress, total=SPLIT_SIZES[split],
                                                             desc=f"decoding CIFAR-10 {split}", unit="image") as bar:
            for member in tar:
                if not member.isfile() or not member.name.lower().endswith(".jpg"):
                    continue
                parts = Path(member.name).parts
                if len(parts) < 3 or parts[-3] != split or parts[-2] not in CLASSES:
                    continue
                data = tar.extractfile(member).read()
                with Image.open(io.BytesIO(data)) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                if arr.shape != (32, 32, 3):
                    raise DataError(f"{path}: {member.name} is {arr.shape}, not a 32x32 RGB image")
                records.append((CLASSES.index(parts[-2]), parts[-1], arr))
                bar.update(1)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path} cannot be read as a CIFAR-10 JPEG archive ({exc}); replace the file") from exc
    if not records:
        raise DataError(f"{path} holds no '{split}/<class>/<n>.jpg' images; is it the right archive?")
    records.sort(key=lambda r: (r[0], r[1]))  # a fixed order, independent of the archive's
    images = torch.from_numpy(np.stack([r[2] for r in records])).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([r[0] for r in records], dtype=torch.int64)
    return images, labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The official batches are pickled dicts of numpy arrays and lists; admit nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _decode_official_tar(path: Path, split: str, progress: bool = True) -> tuple[Tensor, Tensor]:
    wanted = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as tar, progress_bar(enabled=progress, total=len(wanted),
                                                             desc=f"reading CIFAR-10 {split}", unit="batch") as bar:
            for member in tar:
                base = Path(member.name).name
                if member.isfile() and base in wanted:
                    found[base] = _NumpyOnlyUnpickler(tar.extractfile(member), encoding="bytes").load()
                    bar.update(1)
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path} cannot be read as the official CIFAR-10 archive ({exc}); delete it") from exc
    missing = [w for w in wanted if w not in found]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; is it cifar-10-python.tar.gz?")
    data = np.concatenate([np.asarray(found[w][b"data"], dtype=np.uint8) for w in wanted])
    labels = np.concatenate([np.asarray(found[w][b"labels"], dtype=np.int64) for w in wanted])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def download_official(folder: Path, progress: bool = True) -> Path:
    """Download ``cifar-10-python.tar.gz`` into ``folder`` (md5-checked, atomic)."""
    return download(OFFICIAL_URL, Path(folder) / OFFICIAL_NAME, md5=OFFICIAL_MD5, progress=progress)


def _locate(data_dir: str | os.PathLike | None, split: str, download: bool, progress: bool = True) -> tuple[Path, str]:
    if data_dir is None:  # $FASTADAPT_DATA/cifar10 is used as if given by --data-dir
        data_dir = env_data_dir("cifar10")
    folder = Path(data_dir) if data_dir is not None else default_data_dir("cifar10")
    jpg = folder / JPG_NAME.format(split=split)
    if jpg.is_file():
        return jpg, "jpg"
    official = folder / OFFICIAL_NAME
    if official.is_file():
        return official, "official"
    if data_dir is not None and not folder.is_dir():
        raise DataError(f"CIFAR-10 folder {folder} does not exist; pass --data-dir with the dataset")
    if data_dir is None and download:
        return download_official(folder, progress), "official"
    raise DataError(f"no CIFAR-10 in {folder}: expected {jpg.name} or {OFFICIAL_NAME}")


def load_cifar10(
    split: str, data_dir: str | os.PathLike | None = None, download: bool = True, progress: bool = True
) -> tuple[Tensor, Tensor]:
    """``(images [N, 3, 32, 32] uint8, labels [N] int64)`` of CIFAR-10 ``split`` ("train"/"test").

    Without ``data_dir``: ``$FASTADAPT_DATA/cifar10`` if it exists, else the official archive,
    downloaded into the cache when ``download``.

    ``progress`` shows the download and the one-time decoding (see :func:`fastadapt.progress.progress_bar`).
    """
    _check_split(split)
    archive, kind = _locate(data_dir, split, download, progress)
    digest = file_digest(archive, "sha256")

    def build() -> CacheContent:
        decode = _decode_jpg_tar if kind == "jpg" else _decode_official_tar
        images, labels = decode(archive, split, progress)
        expected = SPLIT_SIZES[split]
        if kind == "official" and len(labels) != expected:
            raise DataError(f"{archive}: {len(labels)} {split} images, expected {expected}")
        return CacheContent(tuple(images.shape[1:]), len(images), [images.numpy()], {"labels": labels.tolist()})

    stem = cache_dir() / "cifar10" / f"{kind}-{split}-{digest[:16]}"
    images, meta = cached_rows(stem, f"cifar10 {kind} {split} sha256:{digest}", build, in_memory=True)
    return images, torch.tensor(meta["labels"], dtype=torch.int64)
