"""Fixtures shared by the data tests."""
import gc
from pathlib import Path

import pytest

from .helpers import make_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs")


@pytest.fixture
def no_dali_threads_left():
    """Loaders dropped mid-epoch keep a pipeline until collected: collect them, so no later
    test forks DataLoader workers while DALI threads hold locks."""
    yield
    gc.collect()
