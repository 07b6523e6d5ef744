"""data.format=fashion_mnist: the idx reader, its errors, the splits, the recipe, the loaders and the test split.

Tiny synthetic idx files written here (valid and broken); the real files only in the tests
that take the ``fashion_mnist_root`` fixture (Debian's dataset-fashion-mnist).
"""
import gzip
import hashlib

import numpy as np
import pytest
import torch

from spnet_dist.config import ConfigError, load_config
from spnet_dist.data import (IdxFormatError, build_datasets, build_loaders, build_test_dataset, build_test_loader,
                             check_data_root, num_classes_of, resolve_data_backend)
from spnet_dist.data import fashion_mnist as F
from spnet_dist.data.torchvision_loader import build_train_loader
from spnet_dist.data.transforms import FASHION_MEAN, FASHION_STD

from ..conftest import REPO_ROOT
from .helpers import (assert_same_batches, fashion_cfg, fashion_images, idx_bytes, labels_of, make_fashion_mnist, take,
                      write_idx)


@pytest.fixture
def fashion(tmp_path):
    return make_fashion_mnist(tmp_path / "fmnist", n_train=40, n_test=10)


def pixel_ids(dataset):
    """Which image of the idx file each sample is (pixel (0, 1) of the synthetic images)."""
    return [int(dataset.data[i, 0, 1]) for i in range(len(dataset))]


# ----------------------------------------------------------------------------- reader

def test_reads_the_idx_files(fashion):
    images, labels = F.load_split(fashion, "train")
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(40)]
    assert np.array_equal(images, fashion_images(np.arange(40) % 10, seed=0))
    test_images, test_labels = F.load_split(fashion, "test")
    assert test_images.shape == (10, 28, 28) and test_labels.tolist() == list(range(10))


def test_dataset_items_are_grey_images_made_rgb(fashion):
    train, val = build_datasets(fashion_cfg(fashion))
    assert (len(train), len(val)) == (30, 10) and num_classes_of(train) == 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    image, label = val[0]
    assert image.shape == (3, 28, 28) and image.dtype == torch.float32 and label == val.targets[0]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey repeated
    # evaluation transform: no augmentation, the data set's mean/std
    raw = torch.from_numpy(val.data[0]).float() / 255
    assert torch.allclose(image[0], (raw - FASHION_MEAN[0]) / FASHION_STD[0], atol=1e-6)


@pytest.mark.parametrize("name, content, message", [
    ("train-images-idx3-ubyte.gz", "cut", r"not a complete gzip file"),
    ("train-labels-idx1-ubyte.gz", "garbled", r"not a complete gzip file"),
    ("train-images-idx3-ubyte.gz", "magic", r"magic number 0x00000801, expected 0x00000803"),
    ("train-images-idx3-ubyte.gz", "short", r"sizes 40x28x28 need 31360 bytes of data, the file holds 31359"),
    ("train-images-idx3-ubyte.gz", "long", r"sizes 40x28x28 need 31360 bytes of data, the file holds 31361"),
    ("train-images-idx3-ubyte.gz", "header", r"shorter than an idx3 header"),
    ("train-images-idx3-ubyte.gz", "side", r"images of 32x32 pixels, Fashion-MNIST's are 28x28"),
    ("train-labels-idx1-ubyte.gz", "count", r"39 labels for the 40 images"),
    ("train-labels-idx1-ubyte.gz", "label", r"label 10 outside 0\.\.9"),
])
def test_broken_file_is_a_one_line_error_naming_it(fashion, name, content, message):
    path = fashion / name
    good = gzip.open(path).read()
    if content == "cut":          # a download or copy that stopped half-way
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif content == "garbled":    # not gzip at all
        path.write_bytes(b"<html>404 Not Found</html>")
    elif content == "magic":
        path.write_bytes(gzip.compress((0x801).to_bytes(4, "big") + good[4:]))  # the labels' magic
    elif content == "short":
        path.write_bytes(gzip.compress(good[:-1]))
    elif content == "long":       # two files concatenated, or a wrong header
        path.write_bytes(gzip.compress(good + b"\0"))
    elif content == "header":
        path.write_bytes(gzip.compress(good[:10]))
    elif content == "side":
        write_idx(path, np.zeros((40, 32, 32), np.uint8))
    elif content == "count":
        write_idx(path, np.arange(39) % 10)
    elif content == "label":
        write_idx(path, np.arange(40) % 11)
    with pytest.raises(IdxFormatError, match=message) as err:
        build_datasets(fashion_cfg(fashion))
    text = str(err.value)
    assert text.startswith(str(path)) and "\n" not in text


def test_idx_encoding_is_the_documented_one():
    # magic 0x00000803, then 3 big-endian sizes (hand-written bytes, not the test helper's)
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
    assert raw == idx_bytes(np.array([[[1, 2, 3]], [[4, 5, 6]]]))


def test_never_downloads_and_names_the_package(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        check_data_root(fashion_cfg(missing))
    text = str(err.value)
    assert text.startswith(f"data.root: directory not found: {missing} ") and "\n" not in text
    assert "apt-get install dataset-fashion-mnist" in text and "/usr/share/datasets/fashion-mnist" in text
    missing.mkdir()
    make_fashion_mnist(missing)
    (missing / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"^data\.root: Fashion-MNIST file missing: .*t10k-labels-idx1-ubyte"
                                                r"\.gz \(install Debian's dataset-fashion-mnist"):
        check_data_root(fashion_cfg(missing))
    build_datasets(fashion_cfg(missing))  # the training files are all there: the reader needs no more
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        build_test_dataset(fashion_cfg(missing))


def test_empty_root_means_the_debian_directory(fashion, monkeypatch):
    monkeypatch.setattr(F, "DEFAULT_ROOT", str(fashion))
    assert check_data_root(fashion_cfg("")) is None
    assert len(build_datasets(fashion_cfg(""))[0]) == 30
    monkeypatch.setattr(F, "DEFAULT_ROOT", str(fashion / "absent"))
    with pytest.raises(FileNotFoundError, match=f"data.root: directory not found: {fashion / 'absent'}"):
        check_data_root(fashion_cfg(""))


def test_config_check_stops_before_any_work(tmp_path):
    base = REPO_ROOT / "configs" / "fashion" / "_base.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(base, [f"data.root={tmp_path / 'nowhere'}"], world_size=1)
    text = str(err.value)
    assert "data.root: directory not found" in text and "dataset-fashion-mnist" in text and "\n" not in text
    with pytest.raises(ConfigError, match=r"data\.backend: 'dali' .* held in memory as uint8 arrays"):
        load_config(base, ["data.backend=dali"], check_paths=False, world_size=1)
    with pytest.raises(ConfigError, match=r"model\.num_classes: the fashion_mnist data set has 10 classes"):
        load_config(base, ["model.num_classes=100"], check_paths=False, world_size=1)
    with pytest.raises(ConfigError, match=r"data\.train_subset: .*only data.format 'fashion_mnist'"):
        load_config(REPO_ROOT / "configs" / "demo.yaml", ["data.train_subset=100"], check_paths=False, world_size=1)
    for bad in ("data.val_size=0", "data.train_subset=0", "data.split_seed=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(base, [bad], check_paths=False, world_size=1)


def test_dali_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^data\.backend: 'dali' .*'fashion_mnist' is held in memory") as err:
        resolve_data_backend("dali", "fashion_mnist")
    assert "\n" not in str(err.value)
    assert resolve_data_backend("auto", "fashion_mnist") == "torchvision"


# ----------------------------------------------------------------------------- splits

def test_split_is_stratified_disjoint_and_fixed():
    labels = np.repeat(np.arange(10), 100)  # class-sorted, as a worst case
    train, val = F.split_indices(labels, val_size=200, seed=0)
    assert len(val) == 200 and np.bincount(labels[val]).tolist() == [20] * 10
    assert len(train) == 800 and set(train).isdisjoint(val) and set(train) | set(val) == set(range(1000))
    assert list(val) == sorted(val) and list(train) == sorted(train)
    again = F.split_indices(labels, val_size=200, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    other = F.split_indices(labels, val_size=200, seed=1)[1]
    assert not np.array_equal(other, val)


def test_train_subset_is_stratified_nested_and_leaves_val_alone():
    labels = np.repeat(np.arange(10), 100)
    full_train, val = F.split_indices(labels, 200, None, seed=3)
    small = F.split_indices(labels, 200, 50, seed=3)
    large = F.split_indices(labels, 200, 300, seed=3)
    assert np.array_equal(small[1], val) and np.array_equal(large[1], val)
    assert np.bincount(labels[small[0]]).tolist() == [5] * 10 and np.bincount(labels[large[0]]).tolist() == [30] * 10
    assert set(small[0]) <= set(large[0]) <= set(full_train)
    with pytest.raises(ValueError, match=r"^data\.train_subset: 801 must be in \[1, 800\]"):
        F.split_indices(labels, 200, 801)
    with pytest.raises(ValueError, match=r"^data\.val_size: 1000 must be in \[1, 999\]"):
        F.split_indices(labels, 1000)


def test_splits_do_not_depend_on_the_run_seed(fashion):
    """Every method and seed selects on the same images: the loaders' seed does not touch the split."""
    cfg = fashion_cfg(fashion, train_subset=20)
    picks = []
    for seed in (0, 1, 7):
        train_loader, val_loader = build_loaders(cfg, 4, seed=seed)
        picks.append((pixel_ids(train_loader.dataset), pixel_ids(val_loader.dataset)))
    assert picks[0] == picks[1] == picks[2]
    assert len(picks[0][0]) == 20 and len(picks[0][1]) == 10
    moved = build_datasets(fashion_cfg(fashion, train_subset=20, split_seed=5))
    assert (pixel_ids(moved[0]), pixel_ids(moved[1])) != picks[0]


# ----------------------------------------------------------------------------- recipe

@pytest.mark.parametrize("size", [28, 16, 20])
def test_training_recipe_crops_and_flips_at_any_size(fashion, size):
    train, val = build_datasets(fashion_cfg(fashion, image_size=size))
    torch.manual_seed(0)
    draws = torch.stack([train[0][0] for _ in range(12)])
    assert draws.shape == (12, 3, size, size)
    assert len({d.numpy().tobytes() for d in draws}) > 6  # random crop offsets and flips
    assert torch.equal(val[0][0], val[0][0])  # evaluation: deterministic
    background = torch.tensor((0 - FASHION_MEAN[0]) / FASHION_STD[0])
    padded = torch.isclose(draws[:, 0], background).all(dim=2).any()
    assert padded  # some crop reached the zero padding: whole rows of background


@pytest.mark.parametrize("size", [28, 16, 20])
@pytest.mark.parametrize("train", [True, False])
def test_numpy_recipe_equals_the_torchvision_pipeline(fashion, size, train):
    """GreyCropFlip: the tensors (and the RNG draws) of the torchvision transforms it replaces."""
    from torchvision import transforms as T

    from spnet_dist.data.transforms import GreyCropFlip, ToRGB, build_transform, fashion_padding

    ours = build_transform("fashion_mnist", size, train)
    assert isinstance(ours, GreyCropFlip)
    random = [T.RandomCrop(size, padding=fashion_padding(size)), T.RandomHorizontalFlip()] if train else []
    reference = T.Compose([ToRGB(), T.Resize((size, size)), *random, T.ToTensor(), T.Normalize(FASHION_MEAN, FASHION_STD)])
    dataset = F.FashionMnistDataset(*F.load_split(fashion, "train"))
    for index in range(12):
        image = dataset[index][0]
        torch.manual_seed(100 + index)
        expected = reference(image)
        after_reference = torch.rand(1)
        torch.manual_seed(100 + index)
        got = ours(image)
        assert torch.equal(got, expected)
        assert torch.equal(torch.rand(1), after_reference)  # the same number of draws
    assert fashion_padding(28) == 4 and fashion_padding(16) == 2 and fashion_padding(20) == 3


def test_test_split_is_the_official_t10k_set(fashion):
    test_set = build_test_dataset(fashion_cfg(fashion))
    assert len(test_set) == 10 and test_set.targets == list(range(10)) and test_set.split == "test"
    image, _ = test_set[3]
    assert image.shape == (3, 28, 28)
    raw = torch.from_numpy(test_set.data[3]).float() / 255
    assert torch.allclose(image[0], (raw - FASHION_MEAN[0]) / FASHION_STD[0], atol=1e-6)  # no augmentation
    shards = [build_test_loader(fashion_cfg(fashion, eval_batch_size=3), rank=r, world_size=2) for r in range(2)]
    seen = sorted(y for loader in shards for _, labels in loader for y in labels.tolist())
    assert seen == list(range(10))  # every test image exactly once over the ranks


def test_formats_without_a_test_split_give_none(tmp_path, image_folder):
    from .helpers import imagefolder_cfg, make_cifar10

    make_cifar10(tmp_path / "c10")
    assert build_test_dataset(imagefolder_cfg(tmp_path / "c10", format="cifar")) is None
    assert build_test_dataset(imagefolder_cfg(image_folder)) is None
    assert build_test_loader(imagefolder_cfg(image_folder, num_workers=0, eval_batch_size=4)) is None


# ----------------------------------------------------------------------------- loader

@pytest.mark.parametrize("consumed", [3, 7])  # mid-epoch, across the epoch boundary (7 batches per epoch)
def test_exact_mid_epoch_resume(fashion, consumed):
    train, _ = build_datasets(fashion_cfg(fashion))
    expected = take(build_train_loader(train, 4, seed=5), 12)
    interrupted = build_train_loader(train, 4, seed=5)
    head = take(interrupted, consumed)
    state = interrupted.state_dict()
    resumed = build_train_loader(train, 4, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])
    batches = head + take(resumed, 12 - consumed)
    assert_same_batches(batches, expected)  # labels and augmented pixels
    assert labels_of(batches) == labels_of(expected)


def test_two_workers_give_the_same_batches(fashion):
    train, _ = build_datasets(fashion_cfg(fashion))
    assert_same_batches(take(build_train_loader(train, 4, seed=2, num_workers=2), 5),
                        take(build_train_loader(train, 4, seed=2, num_workers=0), 5))


# ----------------------------------------------------------------------------- the real files

# sha256 of the validation indices of the default split (val_size 5000, split_seed 0): a change of
# the split algorithm would silently move every published number's model selection.
DEFAULT_VAL_SHA = "0b11e34d732f652b920a57f29529efcfa4fdbd3327363cf8df612ce1849bde93"


def test_real_files(fashion_mnist_root):
    images, labels = F.load_split(fashion_mnist_root, "train")
    assert images.shape == (60000, 28, 28) and np.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = F.load_split(fashion_mnist_root, "test")
    assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
    pixels = images / 255.0
    assert abs(pixels.mean() - FASHION_MEAN[0]) < 1e-4 and abs(pixels.std() - FASHION_STD[0]) < 1e-4
    train_idx, val_idx = F.split_indices(labels, 5000, None, 0)
    assert np.bincount(labels[val_idx]).tolist() == [500] * 10 and len(train_idx) == 55000
    digest = hashlib.sha256(val_idx.astype("<i8").tobytes()).hexdigest()
    assert digest == DEFAULT_VAL_SHA


def test_real_files_through_the_shipped_config(fashion_mnist_root):
    cfg = load_config(REPO_ROOT / "configs" / "fashion" / "_base.yaml", [f"data.root={fashion_mnist_root}"],
                      world_size=1)
    train, val = build_datasets(cfg.data)
    assert len(val) == cfg.data.val_size
    assert len(train) == (cfg.data.train_subset or 60000 - cfg.data.val_size)
    test = build_test_loader(cfg.data)
    assert test.dataset_size == 10000
    image, _ = train[0]
    assert image.shape == (3, cfg.data.image_size, cfg.data.image_size)
