"""Omniglot (Lake et al., 2015) with the few-shot split of Vinyals et al. (2016).

The loader reads the two official folders ``images_background/`` and ``images_evaluation/``
(downloading and verifying the official zips when they are missing), resizes every drawing
once to ``image_size`` (28 by default), inverts it so that strokes are bright, and caches the
result as one raw ``uint8`` file in the user cache (see :mod:`fastadapt.data.pool_cache`), so
later runs start in seconds.

Classes follow Vinyals et al. and Snell et al.: each character in four rotations (0, 90, 180,
270 degrees) is a class of its own; 1028 characters train, 172 validate and 423 test
(x4 rotations: 4112 / 688 / 1692 classes). The split is built in (below), so the split files
are not needed.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import DataError
from ..tasks.sampler import ClassPool
from .cache import cache_dir, default_data_dir, env_data_dir
from .download import download, safe_extract_zip
from .images import decode_chunks, list_images
from .pool_cache import CacheContent, cached_rows

URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718", "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
DRAWINGS = 20
ROTATIONS = (0, 90, 180, 270)

# The Vinyals et al. split, as runs of characters (alphabet, first, last), in the order of the
# reference split files (train.txt, val.txt, test.txt of the Prototypical Networks code).
VINYALS_SPLIT: dict[str, list[tuple[str, int, int]]] = {
    "train": [
        ("Angelic", 1, 20), ("Grantha", 1, 43), ("N_Ko", 1, 33), ("Aurek-Besh", 1, 26),
        ("Japanese_(hiragana)", 1, 52), ("Malay_(Jawi_-_Arabic)", 1, 40), ("Asomtavruli_(Georgian)", 1, 40),
        ("Sanskrit", 1, 42), ("Ojibwe_(Canadian_Aboriginal_Syllabics)", 1, 14), ("Korean", 1, 40),
        ("Arcadian", 1, 26), ("Greek", 1, 24), ("Alphabet_of_the_Magi", 1, 20),
        ("Blackfoot_(Canadian_Aboriginal_Syllabics)", 1, 14), ("Futurama", 1, 26), ("Gurmukhi", 1, 41),
        ("Tagalog", 1, 17), ("Anglo-Saxon_Futhorc", 1, 29), ("Braille", 1, 26), ("Cyrillic", 1, 33),
        ("Burmese_(Myanmar)", 1, 34), ("Avesta", 1, 26), ("Gujarati", 1, 48), ("Ge_ez", 1, 26),
        ("Syriac_(Estrangelo)", 1, 23), ("Atlantean", 1, 26), ("Japanese_(katakana)", 1, 47),
        ("Balinese", 1, 24), ("Atemayar_Qelisayer", 1, 26), ("Glagolitic", 1, 45), ("Tifinagh", 1, 55),
        ("Latin", 1, 26), ("Inuktitut_(Canadian_Aboriginal_Syllabics)", 1, 16),
    ],
    "val": [
        ("Hebrew", 1, 22), ("Mkhedruli_(Georgian)", 1, 41), ("Armenian", 1, 41), ("Early_Aramaic", 1, 22),
        ("Bengali", 1, 46),
    ],
    "test": [
        ("Gurmukhi", 42, 45), ("Kannada", 1, 41), ("Keble", 1, 26), ("Malayalam", 1, 47), ("Manipuri", 1, 40),
        ("Mongolian", 1, 30), ("Old_Church_Slavonic_(Cyrillic)", 1, 45), ("Oriya", 1, 46), ("Syriac_(Serto)", 1, 23),
        ("Sylheti", 1, 28), ("Tengwar", 1, 25), ("Tibetan", 1, 42), ("ULOG", 1, 26),
    ],
}


def split_characters(split: str) -> list[str]:
    """``Alphabet/characterNN`` names of a split (``trainval`` = train then val)."""
    if split == "trainval":
        return split_characters("train") + split_characters("val")
    if split not in VINYALS_SPLIT:
        raise DataError(f"unknown Omniglot split '{split}'; known: train, val, trainval, test")
    return [f"{a}/character{i:02d}" for a, first, last in VINYALS_SPLIT[split] for i in range(first, last + 1)]


def _locate(data_dir: Path, download_missing: bool) -> dict[str, Path]:
    """Paths of each character folder, downloading the archives if allowed and needed."""
    missing = [b for b in MD5 if not (data_dir / b).is_dir()]
    if missing and download_missing:
        for name in missing:
            archive = download(URL.format(name), data_dir / f"{name}.zip", MD5[name])
            safe_extract_zip(archive, data_dir)
        missing = [b for b in MD5 if not (data_dir / b).is_dir()]
    if missing:
        raise DataError(
            f"Omniglot not found in {data_dir} (missing {', '.join(missing)}/); put the official "
            "images_background/ and images_evaluation/ folders there, or allow the download"
        )
    folders: dict[str, Path] = {}
    for base in MD5:
        for alphabet in sorted((data_dir / base).iterdir()):
            if alphabet.is_dir():
                for char in sorted(alphabet.iterdir()):
                    if char.is_dir():
                        folders[f"{alphabet.name}/{char.name}"] = char
    return folders


def load_characters(data_dir: str | Path | None = None, image_size: int = 28, download_missing: bool = True,
                    progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """All 1623 characters as ``uint8 [1623, 20, 1, S, S]`` (bright strokes) and their names.

    Without ``data_dir``: ``$FASTADAPT_DATA/omniglot`` if it exists, else the download folder in the
    cache (see :mod:`fastadapt.data.cache`). Decoded once, then read back from the cache file.
    """
    if data_dir is None:  # $FASTADAPT_DATA/omniglot, used as if given, else the download folder
        data_dir = env_data_dir("omniglot") or default_data_dir("omniglot")
    data_dir = Path(data_dir)
    key = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:10]

    def build() -> CacheContent:
        folders = _locate(data_dir, download_missing)
        names = split_characters("train") + split_characters("val") + split_characters("test")
        absent = [n for n in names if n not in folders]
        if absent:
            raise DataError(f"Omniglot in {data_dir} lacks {len(absent)} characters of the standard split "
                            f"(e.g. {absent[0]}); re-extract the official archives there")
        paths = []
        for n in names:
            files = list_images(folders[n])
            if len(files) != DRAWINGS:
                raise DataError(f"{folders[n]} holds {len(files)} drawings, expected {DRAWINGS}; re-extract the archives")
            paths.extend(files)
        chunks = decode_chunks(paths, image_size, "L", invert=True, desc="decoding Omniglot", progress=progress)
        return CacheContent((1, image_size, image_size), len(paths), chunks, {"characters": names})

    images, meta = cached_rows(cache_dir() / f"omniglot-{image_size}px-{key}", f"omniglot {data_dir.resolve()}", build,
                               in_memory=True)
    names = list(meta["characters"])
    return images.reshape(len(names), DRAWINGS, 1, image_size, image_size), names


@lru_cache(maxsize=2)
def omniglot_pools(data_dir: str | None = None, image_size: int = 28, download_missing: bool = True,
                   progress: bool = True) -> dict[str, ClassPool]:
    """Class pools of the Vinyals split (train, val, trainval, test), four rotations per character."""
    images, names = load_characters(data_dir, image_size, download_missing, progress)
    index = {n: i for i, n in enumerate(names)}
    pools = {}
    for split in ("train", "val", "trainval", "test"):
        chars = split_characters(split)
        base = images[torch.tensor([index[c] for c in chars])]  # [C, 20, 1, S, S]
        # rot000, rot090, rot180, rot270 per character, in the reference class order.
        rotated = torch.stack([torch.rot90(base, k=r // 90, dims=(-2, -1)) for r in ROTATIONS], dim=1)
        class_names = [f"{c}/rot{r:03d}" for c in chars for r in ROTATIONS]
        pools[split] = ClassPool.from_grouped(rotated.reshape(-1, *base.shape[1:]), class_names)
    return pools
