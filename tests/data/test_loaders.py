"""build_loaders: the backend choice, rank 0's shared file list, one-line layout errors (both backends)."""
import pytest

from spnet_dist.data import build_loaders, resolve_data_backend
from spnet_dist.data.fake import make_fake_imagenet

from .helpers import data_cfg

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.usefixtures("no_dali_threads_left")


def test_backend_choice(tmp_path):
    assert resolve_data_backend("auto", "imagefolder") == "dali"
    assert resolve_data_backend("auto", "digits") == "torchvision"
    assert resolve_data_backend("auto", "cifar") == "torchvision"
    with pytest.raises(ValueError, match="data.backend"):
        resolve_data_backend("dali", "cifar")


def test_only_rank_0_scans_the_others_read_its_file_list(tmp_path, monkeypatch):
    from torchvision.datasets import DatasetFolder

    root = make_fake_imagenet(tmp_path / "d", classes=3, per_class=4, long_side_range=(40, 64))
    listing = tmp_path / "run" / "data_files.json"
    rank0_train, _ = build_loaders(data_cfg(root), 2, rank=0, world_size=2, listing_path=listing)
    assert listing.is_file()
    scans = []
    real = DatasetFolder.make_dataset
    monkeypatch.setattr(DatasetFolder, "make_dataset", staticmethod(lambda *a, **k: scans.append(a) or real(*a, **k)))
    (root / "train" / "n00000000" / "late.JPEG").write_bytes((root / "val" / "n00000000").glob("*").__next__().read_bytes())
    for backend in ("dali", "torchvision"):
        train, val = build_loaders(data_cfg(root, backend=backend), 2, rank=1, world_size=2, listing_path=listing)
        assert scans == []  # no directory listing on rank 1
        n = len(train.samples) if backend == "dali" else len(train.dataset)
        assert n == 12  # rank 0's list, not the folder as it is now (13 files)


def test_rank_0_scan_error_reaches_every_rank(tmp_path):
    root = make_fake_imagenet(tmp_path / "d", classes=2, per_class=1, long_side_range=(40, 64))
    (root / "val" / "n00000001").rename(root / "val" / "n00000007")
    listing = tmp_path / "run" / "data_files.json"
    with pytest.raises(ValueError, match="class folders differ"):
        build_loaders(data_cfg(root), 1, rank=0, world_size=2, listing_path=listing)
    with pytest.raises(ValueError, match="class folders differ"):  # rank 1 reads the saved error
        build_loaders(data_cfg(root), 1, rank=1, world_size=2, listing_path=listing)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_bad_layouts_are_one_line_errors_before_training(tmp_path, backend):
    root = make_fake_imagenet(tmp_path / "d", classes=2, per_class=1, long_side_range=(40, 64))
    (root / "train" / "n00000009").mkdir()  # empty class folder
    with pytest.raises(FileNotFoundError, match="n00000009") as err:
        build_loaders(data_cfg(root, backend=backend), 1)
    assert "\n" not in str(err.value)
    (root / "train" / "n00000009").rmdir()
    (root / "val" / "n00000000").rename(root / "val" / "n00000005")  # val classes differ
    with pytest.raises(ValueError, match="class folders differ") as err:
        build_loaders(data_cfg(root, backend=backend), 1)
    assert "\n" not in str(err.value)
