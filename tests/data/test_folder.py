import shutil

import pytest

from spnet_dist.data.folder import build_imagefolder

from .helpers import make_image_folder


def test_opens_both_splits(image_folder):
    train, val = build_imagefolder(image_folder)
    assert train.classes == val.classes == ["cat", "dog", "fox"]
    assert len(train) == len(val) == 24
    assert sorted(set(train.targets)) == [0, 1, 2]


def test_hidden_directories_are_not_classes(image_folder):
    (image_folder / "train" / ".ipynb_checkpoints").mkdir()
    train, _ = build_imagefolder(image_folder)
    assert train.classes == ["cat", "dog", "fox"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_names_the_directory(image_folder, split):
    shutil.rmtree(image_folder / split)
    with pytest.raises(FileNotFoundError) as info:
        build_imagefolder(image_folder)
    message = str(info.value)
    assert str(image_folder / split) in message and "\n" not in message


def test_split_without_class_folders(image_folder):
    shutil.rmtree(image_folder / "train")
    (image_folder / "train").mkdir()
    (image_folder / "train" / "stray.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no class folders") as info:
        build_imagefolder(image_folder)
    assert str(image_folder / "train") in str(info.value)


def test_class_folder_without_images(image_folder):
    for f in (image_folder / "val" / "dog").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError) as info:
        build_imagefolder(image_folder)
    message = str(info.value)
    assert str(image_folder / "val") in message and "dog" in message and "\n" not in message


def test_val_classes_must_match_train(tmp_path):
    root = make_image_folder(tmp_path, classes=("a", "b", "c"), per_class=1, splits=("train",))
    make_image_folder(tmp_path, classes=("a", "c", "d"), per_class=1, splits=("val",))
    with pytest.raises(ValueError, match=r"only in train \[b\].*only in val \[d\]") as info:
        build_imagefolder(root)
    assert str(root / "val") in str(info.value)
