"""Builders of tiny on-disk data sets (ImageNet-layout JPEG folders, CIFAR pickles) for the tests."""
from __future__ import annotations

import pickle
import types
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 8,
                      size=(20, 24), splits=("train", "val"), seed: int = 0) -> Path:
    """Write ``root/<split>/<class>/<i>.jpg`` with random RGB pixels; return ``root``."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for name in classes:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.jpg", quality=90)
    return root


def cifar_rows(labels) -> np.ndarray:
    """(N, 3072) uint8 rows whose red plane holds the label, green 100 + label, blue 200."""
    n = len(labels)
    rows = np.empty((n, 3, 1024), dtype=np.uint8)
    rows[:, 0] = np.asarray(labels, dtype=np.uint8)[:, None]
    rows[:, 1] = 100 + np.asarray(labels, dtype=np.uint8)[:, None] % 50
    rows[:, 2] = 200
    return rows.reshape(n, 3072)


def write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(directory: Path, per_file: int = 4) -> Path:
    """Fake CIFAR-10 pickle dir: data_batch_1..5 + test_batch + batches.meta."""
    for i in range(1, 6):
        labels = [(i + j) % 10 for j in range(per_file)]
        write_pickle(directory / f"data_batch_{i}", {b"data": cifar_rows(labels), b"labels": labels})
    labels = list(range(per_file))
    write_pickle(directory / "test_batch", {b"data": cifar_rows(labels), b"labels": labels})
    names = [f"c{k}".encode() for k in range(10)]
    write_pickle(directory / "batches.meta", {b"label_names": names})
    return directory


def make_cifar100(directory: Path, n_train: int = 12, n_test: int = 5) -> Path:
    """Fake CIFAR-100 pickle dir: train + test (fine and coarse labels), no meta file."""
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [(7 * j) % 100 for j in range(n)]
        write_pickle(directory / name, {b"data": cifar_rows(fine), b"fine_labels": fine,
                                        b"coarse_labels": [f // 5 for f in fine]})
    return directory


class IndexDataset(Dataset):
    """Sample i is a (3, 4, 4) image filled with i plus a torch-random draw, and label i.

    The random part shows whether augmentation randomness is reproduced.
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((3, 4, 4), float(i)) + torch.rand(3, 4, 4), i



# ----------------------------------------------------------------------------- loaders

def take(loader, n):
    """The next n batches of a loader (crossing into the next epoch when one ends)."""
    out = []
    while len(out) < n:
        out.extend(islice(iter(loader), n - len(out)))
    return out


def labels_of(batches):
    return [b[1].tolist() for b in batches]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def imagefolder_cfg(root, **kw):
    """The fields of ``DataConfig`` that ``build_datasets`` reads."""
    return types.SimpleNamespace(**{"format": "imagefolder", "root": str(root), "image_size": 16,
                                    "augment": "auto", **kw})


def data_cfg(root, **kw):
    """The fields of ``DataConfig`` that ``build_loaders`` reads (DALI on the CPU by default)."""
    return imagefolder_cfg(root, **{"num_workers": 1, "eval_batch_size": 4, "backend": "dali",
                                    "dali_device": "cpu", "on_corrupt": "error", **kw})


# ----------------------------------------------------------------------------- Fashion-MNIST idx files

def idx_bytes(array: np.ndarray, magic=None) -> bytes:
    """The idx encoding of a uint8 array: magic ``0x000008<ndim>`` (or ``magic``), sizes, data."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, magic=None) -> Path:
    """``idx_bytes`` gzip-compressed into ``path`` (what Zalando ships)."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(array, magic))
    return path


def fashion_images(labels, seed: int = 0) -> np.ndarray:
    """(N, 28, 28) uint8: pixel (0, 0) holds the label, (0, 1) the image's number, the rest random."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.asarray(labels, dtype=np.uint8)
    images[:, 0, 1] = np.arange(len(labels)) % 256
    return images


def make_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 10) -> Path:
    """A tiny Fashion-MNIST directory: the four idx .gz files, labels cycling 0..9."""
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        labels = np.arange(n) % 10
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", fashion_images(labels, seed))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def fashion_cfg(root, **kw):
    """The fields of ``DataConfig`` that ``build_datasets`` / ``build_test_loader`` read for fashion_mnist."""
    return types.SimpleNamespace(**{"format": "fashion_mnist", "root": str(root), "image_size": 28, "augment": "auto",
                                    "val_size": 10, "train_subset": None, "split_seed": 0, "num_workers": 0,
                                    "eval_batch_size": 4, "backend": "auto", "on_corrupt": "error", **kw})
