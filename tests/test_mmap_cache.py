"""The decoded-image cache: one raw uint8 file and a JSON index, read memory-mapped."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastadapt.data import images as images_module
from fastadapt.data import pool_cache
from fastadapt.data.imagefolder import imagefolder_pools
from fastadapt.data.images import list_images, load_images
from fastadapt.data.pool_cache import CacheContent, cache_files, load_cache, write_cache
from fastadapt.errors import DataError
from fastadapt.tasks.sampler import ClassPool, EpisodeSampler
from test_data import make_folder

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own, and decoding in chunks of 5 images."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FASTADAPT_CACHE", str(folder))
    monkeypatch.setattr(images_module, "DECODE_CHUNK_BYTES", 5 * 3 * 16 * 16)
    imagefolder_pools.cache_clear()
    yield folder
    imagefolder_pools.cache_clear()


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def mapped_rss(path: Path) -> int | None:
    """Resident bytes of this process's mappings of ``path`` (None when it is not mapped)."""
    rss, found, current = 0, False, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                current = line.rstrip("\n").endswith(str(path))
                found |= current
            elif current and first == "Rss:":
                rss += int(line.split()[1]) * 1024
    return rss if found else None


def reference_pools(root: Path, size: int, rgb: bool) -> dict[str, torch.Tensor]:
    """Every split decoded in memory, class by class, as the loader did before the cache file."""
    out = {}
    for split in ("train", "test"):
        paths = [p for c in sorted((root / split).iterdir()) for p in list_images(c)]
        out[split] = load_images(paths, size, "RGB" if rgb else "L", progress=False)
    return out


@linux_only
@pytest.mark.parametrize("rgb", [False, True])
def test_cache_round_trip_is_bit_equal_to_decoding_in_memory_and_memory_mapped(tmp_path, cache, rgb):
    root = make_folder(tmp_path / "ds", classes=3, per_class=7, rgb=rgb)  # 21 images: chunks of 5 and a rest
    built = imagefolder_pools(str(root), image_size=16, progress=False)
    imagefolder_pools.cache_clear()
    loaded = imagefolder_pools(str(root), image_size=16, progress=False)
    ref = reference_pools(root, 16, rgb)
    data = next(cache.glob("imagefolder-16px-*.u8"))
    for split in ("train", "test"):
        for pool in (built[split], loaded[split]):
            assert torch.equal(pool.images, ref[split])
            assert pool.counts.tolist() == [7, 7, 7] and pool.offsets.tolist() == [0, 7, 14]
            assert pool.class_names == ["class0", "class1", "class2"]
    assert mapped_rss(data) is not None  # the pools read the cache file, they do not hold a copy
    assert data.stat().st_size == 2 * 21 * (3 if rgb else 1) * 16 * 16
    index = json.loads(cache_files(data.with_suffix(""))[1].read_text())
    assert index["shape"] == [42, 3 if rgb else 1, 16, 16] and list(index["meta"]["splits"]) == ["train", "test"]
    # The same episodes as from the same images in memory.
    in_ram = ClassPool(ref["test"].clone(), loaded["test"].offsets, loaded["test"].counts, ["a", "b", "c"])
    a = EpisodeSampler(loaded["test"], 3, 2, 3).sample(torch.Generator().manual_seed(1))
    b = EpisodeSampler(in_ram, 3, 2, 3).sample(torch.Generator().manual_seed(1))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


@linux_only
def test_a_pool_larger_than_memory_samples_without_copying_it(cache):
    """A sparse cache file twice the machine's memory: a whole copy (or a float conversion) of the
    pool cannot be allocated, so drawing episodes works only if it reads just the rows it draws."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shape, classes = (3, 84, 84), 1000
    per_class = -(-2 * memory // (classes * 3 * 84 * 84))
    rows = classes * per_class
    stem = cache / "huge"
    data, index = cache_files(stem)
    cache.mkdir()
    with open(data, "wb") as f:
        f.truncate(rows * 3 * 84 * 84)  # holes read as zeros and take no disk space
    index.write_text(json.dumps({
        "format": pool_cache.FORMAT, "version": pool_cache.VERSION, "source": "sparse", "dtype": "uint8",
        "shape": [rows, *shape], "bytes": rows * 3 * 84 * 84, "meta": {},
        "probe": pool_cache._probe(np.memmap(data, dtype=np.uint8, mode="r", shape=(rows, *shape)))}))
    images, _ = load_cache(stem, "sparse")
    counts = torch.full((classes,), per_class)
    pool = ClassPool(images, torch.arange(classes) * per_class, counts, [str(c) for c in range(classes)])
    sampler = EpisodeSampler(pool, 5, 1, 3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ep = sampler.sample(gen)
    assert ep.query_x.shape == (15, *shape) and float(ep.query_x.abs().sum()) == 0.0
    assert pool.images.data_ptr() == images.data_ptr() and mapped_rss(data) < memory // 8


@linux_only
def test_sampling_brings_in_only_the_rows_it_draws(cache):
    rows, shape = 10240, (3, 32, 32)  # 30 MiB
    stem = cache / "pool"
    rng = np.random.default_rng(0)
    chunks = (rng.integers(0, 255, (1024, *shape), dtype=np.uint8) for _ in range(rows // 1024))
    images, _ = write_cache(stem, "synthetic", CacheContent(shape, rows, chunks, {}))
    pool = ClassPool(images, torch.arange(64) * 160, torch.full((64,), 160), [str(c) for c in range(64)])
    sampler, gen = EpisodeSampler(pool, 5, 1, 1), torch.Generator().manual_seed(0)
    for _ in range(5):
        sampler.sample(gen)
    # 50 rows of 3 KiB drawn, and 64 read for the index's digest: a small part of the file is mapped.
    size = cache_files(stem)[0].stat().st_size
    assert mapped_rss(cache_files(stem)[0]) < size // 4


def test_truncated_damaged_or_foreign_cache_is_detected_and_rebuilt(tmp_path, cache, capsys):
    root = make_folder(tmp_path / "ds", per_class=3)
    first = imagefolder_pools(str(root), image_size=8, progress=False)["train"].images.clone()
    data = next(cache.glob("*.u8"))
    index = cache_files(data.with_suffix(""))[1]

    def reload():
        imagefolder_pools.cache_clear()
        pools = imagefolder_pools(str(root), image_size=8, progress=False)
        assert torch.equal(pools["train"].images, first)
        return capsys.readouterr().err

    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 10)
    assert "damaged" in (err := reload()) and str(data) in err and "bytes" in err
    raw = bytearray(data.read_bytes())
    raw[:64] = bytes(255 - b for b in raw[:64])
    data.write_bytes(bytes(raw))
    assert "do not match its index" in reload()
    index.write_text('{"format": "fastadapt-uint8-rows", "vers')
    assert "index cannot be read" in reload()
    record = json.loads(index.read_text())
    index.write_text(json.dumps({**record, "source": "imagefolder elsewhere"}))
    assert "other data" in reload()
    data.unlink()
    assert "missing" in reload()
    assert reload() == ""  # rebuilt each time, and now trusted again
    assert entries(cache) == sorted([data.name, index.name])


def test_an_interrupted_build_leaves_no_trusted_cache(tmp_path, cache, monkeypatch):
    root = make_folder(tmp_path / "ds", per_class=4)  # 24 images, chunks of 5
    real, calls = images_module.load_image, []

    def fail_late(*args, **kwargs):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt  # e.g. Ctrl-C after two chunks were written
        return real(*args, **kwargs)

    monkeypatch.setattr(images_module, "load_image", fail_late)
    with pytest.raises(KeyboardInterrupt):
        imagefolder_pools(str(root), image_size=8, progress=False)
    assert entries(cache) == []  # no index, no data file, no temporary file
    monkeypatch.setattr(images_module, "load_image", real)
    pools = imagefolder_pools(str(root), image_size=8, progress=False)
    assert len(pools["train"].images) == 12 and len(entries(cache)) == 2


def test_a_short_stream_is_refused_and_leaves_nothing(cache):
    chunks = [np.zeros((3, 1, 4, 4), dtype=np.uint8)]
    with pytest.raises(DataError, match="received 3 rows, expected 4"):
        write_cache(cache / "short", "x", CacheContent((1, 4, 4), 4, chunks, {}))
    with pytest.raises(DataError, match=r"expected uint8 \[n, 1, 4, 4\]"):
        write_cache(cache / "short", "x", CacheContent((1, 4, 4), 3, [np.zeros((3, 4, 4, 1), np.uint8)], {}))
    assert entries(cache) == []
    assert load_cache(cache / "short", "x") is None


def test_the_source_folder_is_never_written(tmp_path, cache):
    root = make_folder(tmp_path / "ds", rgb=True)

    def snapshot():
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}

    before = snapshot()
    for p in [root, *root.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        imagefolder_pools(str(root), image_size=8, progress=False)
        imagefolder_pools.cache_clear()
        imagefolder_pools(str(root), image_size=8, progress=False)
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert snapshot() == before
    assert all(name.startswith("imagefolder-8px-") for name in entries(cache)) and len(entries(cache)) == 2


def test_an_in_memory_load_is_a_writable_copy_that_never_reaches_the_file(cache):
    stem = cache / "small"
    content = CacheContent((1, 2, 2), 2, [np.arange(8, dtype=np.uint8).reshape(2, 1, 2, 2)], {"labels": [0, 1]})
    written, meta = write_cache(stem, "x", content, in_memory=True)
    loaded, meta2 = load_cache(stem, "x", in_memory=True)
    assert meta == meta2 == {"labels": [0, 1]} and torch.equal(written, loaded)
    loaded.zero_()
    assert cache_files(stem)[0].read_bytes() == bytes(range(8))
    assert torch.equal(load_cache(stem, "x")[0].flatten(), torch.arange(8, dtype=torch.uint8))
