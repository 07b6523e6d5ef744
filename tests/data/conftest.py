"""Fixtures shared by the data tests."""
import gc
import os
import subprocess
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


@pytest.fixture(scope="session")
def fashion_mnist_root() -> Path:
    """The real Fashion-MNIST files (Debian's dataset-fashion-mnist), installed when missing and possible.

    Skipped, with the reason, only where they can neither be found nor installed (not root, no
    apt-get); under CI (``CI`` set) that fails the test instead, as for the SLURM tests.
    """
    from . import fashion_package

    try:
        fashion_package.install()
    except (fashion_package.PackageError, subprocess.CalledProcessError) as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Fashion-MNIST tests, but {err}")
        pytest.skip(str(err))
    return fashion_package.ROOT
