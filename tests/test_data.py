import hashlib
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastadapt.data import build_task_source
from fastadapt.data.download import download, safe_extract_zip
from fastadapt.data.glyphs import make_glyphs
from fastadapt.data.imagefolder import imagefolder_pools
from fastadapt.data.omniglot import omniglot_pools, split_characters
from fastadapt.errors import ConfigError, DataError, UnknownNameError


def test_glyphs_are_deterministic_and_classes_differ():
    a, b = make_glyphs(6, per_class=4, seed=3), make_glyphs(6, per_class=4, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (6, 4, 1, 28, 28) and torch.equal(a, b)
    assert not torch.equal(a, make_glyphs(6, per_class=4, seed=4))
    x = a.float()
    within = (x[:, 0] - x[:, 1]).abs().mean()
    between = (x[0, 0] - x[1:, 0]).abs().mean()
    assert 0 < within < between  # instances vary, but less than classes do
    assert (x > 128).float().mean() > 0.03  # there is ink


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root, splits=("train", "test"), classes=3, per_class=4, rgb=False):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            for i in range(per_class):
                shape = (20, 30, 3) if rgb else (20, 30)
                write_png(root / split / f"class{c}" / f"{i}.png", rng.integers(0, 255, shape, dtype=np.uint8))
    return root


@pytest.mark.parametrize("rgb", [False, True])
def test_imagefolder_loads_resizes_and_caches(tmp_path, rgb):
    root = make_folder(tmp_path / "ds", rgb=rgb)
    pools = imagefolder_pools(str(root), image_size=16, progress=False)
    assert set(pools) == {"train", "test"}
    assert pools["train"].images.shape == (12, 3 if rgb else 1, 16, 16)
    assert pools["test"].class_names == ["class0", "class1", "class2"]
    imagefolder_pools.cache_clear()
    again = imagefolder_pools(str(root), image_size=16, progress=False)  # from the tensor cache
    assert torch.equal(again["train"].images, pools["train"].images)
    ep = build_task_source({"dataset": "imagefolder", "data_dir": str(root), "image_size": 16}, "test", 3, 1, 2) \
        .sample(torch.Generator().manual_seed(0))
    assert ep.support_x.shape == (3, 3 if rgb else 1, 16, 16)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        imagefolder_pools(str(tmp_path / "nope"))
    make_folder(tmp_path / "only_train", splits=("train",))
    with pytest.raises(DataError, match="test"):
        imagefolder_pools(str(tmp_path / "only_train"))
    root = make_folder(tmp_path / "corrupt")
    (root / "test" / "class1" / "2.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .*2\.png"):
        imagefolder_pools(str(root), image_size=8, progress=False)
    with pytest.raises(ConfigError, match="--data-dir"):
        build_task_source({"dataset": "imagefolder"}, "train", 2, 1, 1)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(UnknownNameError, match="known datasets: .*builtin.*omniglot"):
        build_task_source({"dataset": "mnist-typo"}, "train", 5, 1, 1)


def test_download_verifies_checksum_and_writes_atomically(tmp_path):
    src = tmp_path / "remote.bin"
    src.write_bytes(b"payload" * 100)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = tmp_path / "dl" / "file.bin"
    assert download(src.as_uri(), dest, md5, progress=False).read_bytes() == src.read_bytes()
    bad = tmp_path / "dl" / "bad.bin"
    with pytest.raises(DataError, match="checksum mismatch"):
        download(src.as_uri(), bad, "0" * 32, progress=False)
    assert not bad.exists() and [p.name for p in (tmp_path / "dl").iterdir()] == ["file.bin"]
    with pytest.raises(DataError, match="could not download"):
        download((tmp_path / "missing.zip").as_uri(), tmp_path / "x.zip", progress=False)


def test_zip_extraction_refuses_paths_outside_the_target(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("ok/file.txt", "fine")
        zf.writestr("../escape.txt", "bad")
    with pytest.raises(DataError, match="unsafe path"):
        safe_extract_zip(evil, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "ok").exists()
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("images_background/a/b.txt", "x")
    safe_extract_zip(good, tmp_path / "out")
    assert (tmp_path / "out" / "images_background" / "a" / "b.txt").read_text() == "x"
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="zip"):
        safe_extract_zip(tmp_path / "broken.zip", tmp_path / "out2")


def test_missing_omniglot_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"Omniglot not found in .*images_background"):
        omniglot_pools(str(tmp_path), download_missing=False)


def test_builtin_split_sizes_match_the_standard_split():
    assert [len(split_characters(s)) for s in ("train", "val", "test")] == [1028, 172, 423]
    assert len(set(split_characters("trainval")) & set(split_characters("test"))) == 0


@pytest.mark.shared_data
def test_omniglot_from_shared_data_matches_reference_split(shared_data):
    root = shared_data / "omniglot"
    pools = omniglot_pools(str(root), 28, download_missing=False, progress=False)
    for split, n in (("train", 4112), ("val", 688), ("test", 1692), ("trainval", 4800)):
        assert pools[split].num_classes == n
        ref = (root / "splits_vinyals" / f"{split}.txt").read_text().split()
        assert pools[split].class_names == ref
    test = pools["test"]
    assert test.images.shape == (1692 * 20, 1, 28, 28) and test.images.dtype == torch.uint8
    x = test.images[:20].float() / 255
    assert x.mean() < 0.5  # strokes bright on a dark background
    # Class k+1 is class k rotated by 90 degrees.
    assert torch.equal(torch.rot90(test.images[:20], 1, dims=(-2, -1)), test.images[20:40])
