import numpy as np
import pytest

from spnet_dist.data import num_classes_of
from spnet_dist.data.cifar import CifarDataset, find_cifar

from .helpers import make_cifar10, make_cifar100, write_pickle


def test_cifar10_directory_itself(tmp_path):
    make_cifar10(tmp_path, per_file=4)
    train, test = CifarDataset(tmp_path, train=True), CifarDataset(tmp_path, train=False)
    assert (len(train), len(test)) == (20, 4)
    assert train.classes == [f"c{k}" for k in range(10)]  # from batches.meta
    assert train.targets[:4] == [1, 2, 3, 4]  # data_batch_1 comes first


def test_cifar10_parent_of_extracted_tarball(tmp_path):
    make_cifar10(tmp_path / "cifar-10-batches-py")
    directory, layout = find_cifar(tmp_path)
    assert directory == tmp_path / "cifar-10-batches-py" and layout.num_classes == 10
    assert len(CifarDataset(tmp_path)) == 20


@pytest.mark.parametrize("nested", [False, True])
def test_cifar100_fine_labels(tmp_path, nested):
    make_cifar100(tmp_path / "cifar-100-python" if nested else tmp_path, n_train=12, n_test=5)
    train, test = CifarDataset(tmp_path, True), CifarDataset(tmp_path, False)
    assert (len(train), len(test)) == (12, 5)
    assert train.targets == [(7 * j) % 100 for j in range(12)]
    assert num_classes_of(train) == 100 and train.classes[:2] == ["0", "1"]  # no meta file


def test_planar_rows_become_rgb_images(tmp_path):
    make_cifar10(tmp_path)
    image, label = CifarDataset(tmp_path, train=False)[3]
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (32, 32, 3)
    # helpers.cifar_rows: red plane = label, green = 100 + label, blue = 200
    assert (pixels[..., 0] == label).all() and (pixels[..., 1] == 100 + label).all()
    assert (pixels[..., 2] == 200).all()


def test_missing_file_is_named(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    CifarDataset(tmp_path, train=False)  # the test split is still complete
    with pytest.raises(FileNotFoundError, match="data_batch_3") as info:
        CifarDataset(tmp_path, train=True)
    assert str(tmp_path / "data_batch_3") in str(info.value)


def test_unrecognised_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as info:
        CifarDataset(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_malformed_pickle(tmp_path):
    make_cifar10(tmp_path)
    write_pickle(tmp_path / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"test_batch.*\(N, 3072\)"):
        CifarDataset(tmp_path, train=False)
