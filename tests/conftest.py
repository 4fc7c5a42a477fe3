import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Dataset caches of the test session go to a temporary folder, never the user's."""
    old = os.environ.get("FASTADAPT_CACHE")
    os.environ["FASTADAPT_CACHE"] = str(tmp_path_factory.mktemp("fastadapt-cache"))
    yield
    if old is None:
        os.environ.pop("FASTADAPT_CACHE", None)
    else:
        os.environ["FASTADAPT_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA}")
    for item in items:
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


def make_pool(classes: int = 12, per_class: int = 10, size: int = 8, channels: int = 1):
    """A tiny pool whose every image encodes its (class, index) in its first two pixels."""
    from fastadapt.tasks import ClassPool

    images = torch.zeros(classes, per_class, channels, size, size, dtype=torch.uint8)
    for c in range(classes):
        for i in range(per_class):
            images[c, i, 0, 0, 0] = c
            images[c, i, 0, 0, 1] = i
    return ClassPool.from_grouped(images)
