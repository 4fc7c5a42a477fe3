"""FASTADAPT_DATA: where the real datasets are, for the loaders and for the tests."""


import pytest

import fastadapt.data.cifar10 as C10
from fastadapt.data import build_task_source
from fastadapt.data.cache import default_data_dir
from fastadapt.data.omniglot import load_characters
from fastadapt.errors import DataError

from conftest import SHARED_DATA, find_shared_data
from test_progress import _cifar_jpg_archive


def test_tests_find_the_data_through_the_variable_then_beside_the_checkout(tmp_path):
    checkout = tmp_path / "somewhere" / "fastadapt"
    assert find_shared_data({"FASTADAPT_DATA": str(tmp_path / "data")}, checkout) == tmp_path / "data"
    assert find_shared_data({}, checkout) == tmp_path / "somewhere" / "shared" / "data"
    assert find_shared_data({"FASTADAPT_DATA": ""}, checkout) == tmp_path / "somewhere" / "shared" / "data"
    assert SHARED_DATA == find_shared_data()


def _omniglot_folder_in_error(**kwargs) -> str:
    with pytest.raises(DataError, match="Omniglot not found in") as info:
        load_characters(download_missing=False, progress=False, **kwargs)
    return str(info.value).split("Omniglot not found in ", 1)[1].split(" (missing", 1)[0]


def test_omniglot_folder_order_data_dir_then_variable_then_download_folder(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    given = tmp_path / "given"
    monkeypatch.setenv("FASTADAPT_DATA", str(root))
    assert _omniglot_folder_in_error(data_dir=given) == str(given)
    assert _omniglot_folder_in_error() == str(root / "omniglot")
    monkeypatch.setenv("FASTADAPT_DATA", str(tmp_path / "elsewhere"))  # no omniglot/ there
    assert _omniglot_folder_in_error() == str(default_data_dir("omniglot"))
    monkeypatch.delenv("FASTADAPT_DATA")
    assert _omniglot_folder_in_error() == str(default_data_dir("omniglot"))
    # the registered dataset (as `fastadapt train --dataset omniglot` without --data-dir) too
    monkeypatch.setenv("FASTADAPT_DATA", str(root))
    with pytest.raises(DataError, match=f"Omniglot not found in {root / 'omniglot'}"):
        build_task_source({"dataset": "omniglot", "download": False, "progress": False}, "train", 5, 1, 1)


def test_cifar10_is_read_from_the_variable_before_downloading(tmp_path, monkeypatch):
    def no_download(folder, progress=True):
        raise AssertionError(f"download attempted into {folder}")

    monkeypatch.setattr(C10, "download_official", no_download)
    _cifar_jpg_archive(tmp_path / "data" / "cifar10" / "cifar10-jpg-test.tar.gz", per_class=1)
    _cifar_jpg_archive(tmp_path / "given" / "cifar10-jpg-test.tar.gz", per_class=2)
    monkeypatch.setenv("FASTADAPT_DATA", str(tmp_path / "data"))
    assert len(C10.load_cifar10("test", progress=False)[1]) == 10  # $FASTADAPT_DATA/cifar10
    assert len(C10.load_cifar10("test", tmp_path / "given", progress=False)[1]) == 20  # --data-dir wins
    monkeypatch.setenv("FASTADAPT_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(AssertionError, match="download attempted"):
        C10.load_cifar10("test", progress=False)
