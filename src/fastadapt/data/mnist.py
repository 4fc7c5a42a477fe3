"""MNIST (LeCun, Cortes & Burges) from its gzip'd IDX files, as uint8 tensors.

The folder (``--data-dir``, else ``$FASTADAPT_DATA/mnist``) holds ``t10k-images-idx3-ubyte.gz``
(and ``t10k-labels-idx1-ubyte.gz``) and, when available, ``train-images-idx3-ubyte.gz``. Nothing
is downloaded: put the official files there.

Splits. With the official training file present, ``train`` is its 60,000 images and ``test`` the
10,000 of ``t10k``. With only the test file (as in the shared data folder), its 10,000 images are
split deterministically by index: every fifth image (index 4, 9, 14, ...) is ``test`` (2,000
images), the others ``train`` (8,000). Interleaving keeps both halves of the official test set
(the first 5,000 images come from NIST's cleaner SD-3 writers, the last 5,000 from SD-1) in both
splits. The images of the two splits are distinct files' rows, but a writer may appear in both.
"""

from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .cache import env_data_dir

TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
#: In the test-file-only split, images whose index is ``TEST_RESIDUE`` modulo ``TEST_EVERY`` are the test split.
TEST_EVERY, TEST_RESIDUE = 5, 4


def _read_idx(path: Path, magic: int, dims: int, what: str) -> tuple[bytes, tuple[int, ...]]:
    """The payload and shape of an IDX file (gzip'd or plain) with ``dims`` dimensions."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4 + 4 * dims)
            if len(header) < 4 + 4 * dims:
                raise DataError(f"{path} is too short to be an IDX {what} file; replace it")
            found, *shape = struct.unpack(">" + "I" * (1 + dims), header)
            if found != magic:
                raise DataError(f"{path} is not an IDX {what} file (magic {found:#010x}, expected {magic:#010x})")
            size = int(np.prod(shape))
            data = f.read(size)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} cannot be read ({exc}); replace the file") from exc
    if len(data) != size:
        raise DataError(f"{path} is truncated: {len(data)} of {size} bytes of {what}s for shape {tuple(shape)}; "
                        "replace the file")
    return data, tuple(shape)


def read_idx_images(path: str | os.PathLike) -> Tensor:
    """The images of a (gzip'd or plain) IDX3 file as ``uint8 [N, 1, rows, cols]``."""
    data, (n, rows, cols) = _read_idx(Path(path), 0x00000803, 3, "image")
    array = np.frombuffer(data, dtype=np.uint8).reshape(n, 1, rows, cols)
    return torch.from_numpy(array.copy())


def mnist_folder(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        found = env_data_dir("mnist")
        if found is None:
            raise DataError(f"MNIST needs --data-dir DIR holding {TEST_IMAGES} (or set $FASTADAPT_DATA to a folder "
                            "with mnist/ in it); it is not downloaded")
        return found
    folder = Path(data_dir)
    if not (folder / TEST_IMAGES).is_file():
        raise DataError(f"no {TEST_IMAGES} in {folder}; pass --data-dir with the MNIST IDX files")
    return folder


def split_indices(n: int) -> dict[str, Tensor]:
    """The test-file-only split of ``n`` images: ``{"train": [...], "test": [...]}`` indices."""
    index = torch.arange(n)
    test = index % TEST_EVERY == TEST_RESIDUE
    return {"train": index[~test], "test": index[test]}


@lru_cache(maxsize=2)
def mnist_splits(data_dir: str | None = None) -> dict[str, tuple[Tensor, Tensor, str]]:
    """``{split: (images uint8 [N, 1, 28, 28], ids [N], id_space)}`` for ``train`` and ``test``.

    ``ids`` index the rows of the file named by ``id_space``, so that two splits drawn from the same
    file can be checked to be disjoint."""
    folder = mnist_folder(data_dir)
    test = read_idx_images(folder / TEST_IMAGES)
    if (folder / TRAIN_IMAGES).is_file():
        train = read_idx_images(folder / TRAIN_IMAGES)
        return {"train": (train, torch.arange(len(train)), TRAIN_IMAGES),
                "test": (test, torch.arange(len(test)), TEST_IMAGES)}
    idx = split_indices(len(test))
    return {split: (test[i], i, TEST_IMAGES) for split, i in idx.items()}


TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"


def read_idx_labels(path: str | os.PathLike) -> Tensor:
    """The labels of a (gzip'd or plain) IDX1 file as ``int64 [N]``."""
    data, _ = _read_idx(Path(path), 0x00000801, 1, "label")
    labels = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"{path} has labels above 9; it is not an MNIST label file")
    return labels


@lru_cache(maxsize=2)
def mnist_labelled(data_dir: str | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """``{split: (images uint8 [N, 1, 28, 28], labels int64 [N])}``: the splits of
    :func:`mnist_splits` with their digit labels (for training classifiers, e.g. optimizees)."""
    folder = mnist_folder(data_dir)
    out = {}
    for split, (images, ids, id_space) in mnist_splits(data_dir).items():
        label_file = TRAIN_LABELS if id_space == TRAIN_IMAGES else TEST_LABELS
        if not (folder / label_file).is_file():
            raise DataError(f"no {label_file} in {folder}: MNIST classification needs the label files too")
        labels = read_idx_labels(folder / label_file)
        if len(labels) <= int(ids.max()):
            raise DataError(f"{folder / label_file} has {len(labels)} labels, fewer than its images")
        out[split] = (images, labels[ids])
    return out
