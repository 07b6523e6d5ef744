"""build_datasets, num_classes_of and check_data_root (the layout rules the readers apply)."""
import shutil
import types

import pytest
import torch

from spnet_dist.data import CifarDataset, build_datasets, build_eval_loader, check_data_root, num_classes_of

from .helpers import imagefolder_cfg, make_cifar10, make_cifar100


def test_digits_through_build_datasets(tmp_path):
    cfg = types.SimpleNamespace(format="digits", root=str(tmp_path / "digits"), image_size=16, augment="auto")
    train_set, val_set = build_datasets(cfg)
    assert (len(train_set), len(val_set)) == (1437, 360)
    assert num_classes_of(train_set) == 10
    images, labels = next(iter(build_eval_loader(val_set, 8)))
    assert images.shape == (8, 3, 16, 16)
    # grey source: the three channels are identical after RGB conversion and normalisation 0.5
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    assert images.min() >= -1 and images.max() <= 1


def test_unknown_format_names_the_field(image_folder):
    with pytest.raises(ValueError, match=r"data\.format"):
        build_datasets(imagefolder_cfg(image_folder, format="lmdb"))
    with pytest.raises(ValueError, match=r"data\.root"):
        build_datasets(imagefolder_cfg("", format="cifar"))
    with pytest.raises(FileNotFoundError, match="train"):
        build_datasets(imagefolder_cfg(image_folder / "nowhere"))


def test_build_datasets_cifar(tmp_path):
    make_cifar10(tmp_path)
    cfg = types.SimpleNamespace(format="cifar", root=str(tmp_path), image_size=32, augment="auto")
    train, val = build_datasets(cfg)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert num_classes_of(train) == num_classes_of(val) == 10
    # eval transform of the cifar recipe: no crop, just CIFAR mean/std normalisation
    val_image, _ = val[0]
    assert val_image[0].unique().numel() == 1  # constant red plane stays constant


# ----------------------------------------------------------------------------- check_data_root

def cfg_of(fmt, root):
    return types.SimpleNamespace(format=fmt, root=None if root is None else str(root))


def test_check_data_root_imagefolder(image_folder, tmp_path):
    assert check_data_root(cfg_of("imagefolder", image_folder)) is None
    with pytest.raises(FileNotFoundError, match=r"^data\.root: directory not found: .*nowhere$"):
        check_data_root(cfg_of("imagefolder", tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"^data\.root: required for data.format 'imagefolder'"):
        check_data_root(cfg_of("imagefolder", None))
    for f in (image_folder / "val" / "dog").iterdir():
        f.unlink()
    assert check_data_root(cfg_of("imagefolder", image_folder)) is None  # class folders: rank 0's scan
    for split in ("val", "train"):
        shutil.rmtree(image_folder / split)
        with pytest.raises(FileNotFoundError) as err:
            check_data_root(cfg_of("imagefolder", image_folder))
        message = str(err.value)
        assert message.startswith("data.root: ") and str(image_folder / split) in message and "\n" not in message
        # the reader names the same folder
        with pytest.raises(FileNotFoundError, match=f"{image_folder / split} \\("):
            build_datasets(imagefolder_cfg(image_folder))


def test_check_data_root_cifar_uses_the_readers_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^data\.root: .* holds neither CIFAR-10 nor CIFAR-100"):
        check_data_root(cfg_of("cifar", tmp_path))
    make_cifar10(tmp_path)
    assert check_data_root(cfg_of("cifar", tmp_path)) == 10
    # A CIFAR-100 folder next to CIFAR-10 files: the reader opens the folder, and so does the check.
    make_cifar100(tmp_path / "cifar-100-python")
    assert check_data_root(cfg_of("cifar", tmp_path)) == 100
    assert num_classes_of(CifarDataset(tmp_path)) == 100
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(FileNotFoundError, match=r"^data\.root: CIFAR file missing: .*cifar-100-python/test$"):
        check_data_root(cfg_of("cifar", tmp_path))


def test_check_data_root_digits_needs_no_root():
    assert check_data_root(cfg_of("digits", None)) is None
