import os
from pathlib import Path

import pytest
import torch

CHECKOUT = Path(__file__).resolve().parents[1]


def find_shared_data(environ=os.environ, checkout: Path = CHECKOUT) -> Path:
    """The root of the real datasets (``omniglot/``, ``mnist/``, ``cifar10/``): ``$FASTADAPT_DATA``
    if set, else ``../shared/data`` beside the checkout."""
    root = environ.get("FASTADAPT_DATA")
    if root:
        return Path(root).expanduser()
    return checkout.parent / "shared" / "data"


SHARED_DATA = find_shared_data()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Dataset caches of the test session go to a temporary folder, never the user's; the loaders
    do not see the user's $FASTADAPT_DATA (tests that need real data get it from ``shared_data``)."""
    old = {k: os.environ.get(k) for k in ("FASTADAPT_CACHE", "FASTADAPT_DATA")}
    os.environ["FASTADAPT_CACHE"] = str(tmp_path_factory.mktemp("fastadapt-cache"))
    os.environ.pop("FASTADAPT_DATA", None)
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA} (set FASTADAPT_DATA to its root)")
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
