"""Fashion-MNIST read from the four official idx ``.gz`` files in a local directory; never downloads.

Zalando's Fashion-MNIST (MIT): 60,000 training and 10,000 test images, 28x28 grey, 10 classes.
Debian's ``dataset-fashion-mnist`` puts the four files in :data:`DEFAULT_ROOT`
(``apt-get install dataset-fashion-mnist``). The images are held in memory as uint8 arrays, as
:mod:`~spnet_dist.data.cifar` holds CIFAR: no JPEG to decode, so the torchvision loader serves
them and DALI is refused.

Splits (:func:`split_indices`): a **validation** split of ``data.val_size`` images is carved
from the 60,000 training images, stratified by class, with the fixed ``data.split_seed``
(independent of ``run.seed``: every method and seed selects its model on the same images); an
optional **training subset** (``data.train_subset``) of the rest, stratified with the same seed
and nested (a smaller subset is a prefix of a larger one). The official 10,000-image **test**
set is read only by :func:`build_fashion_mnist_test` (the numbers to report).

The idx format (LeCun's MNIST page): a big-endian header ``0x00 0x00 <type> <ndim>`` (type
``0x08`` = unsigned byte), then ``ndim`` big-endian uint32 sizes, then the data, row-major.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"   # where Debian's package installs the files
APT_PACKAGE = "dataset-fashion-mnist"
FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
IMAGE_SIDE = 28
UBYTE = 0x08  # idx type code of unsigned bytes (the only type the official files use)
INSTALL_HINT = f"install Debian's {APT_PACKAGE} (apt-get install {APT_PACKAGE}); this code never downloads"


class IdxFormatError(ValueError):
    """An idx file that is not what Fashion-MNIST ships (bad gzip, magic number, sizes, labels); names the file."""


def fashion_root(root: Optional[str]) -> Path:
    """``data.root``, or :data:`DEFAULT_ROOT` when it is empty."""
    return Path(root or DEFAULT_ROOT).expanduser()


def check_fashion_mnist(root: str | os.PathLike) -> None:
    """The directory and the four files are there (a few ``stat`` calls; the content is read later).

    Raises:
        FileNotFoundError: one line naming the missing directory or file and the apt package.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"directory not found: {root} (Fashion-MNIST: {INSTALL_HINT}; it puts the four "
                                f"idx files in {DEFAULT_ROOT})")
    for images, labels in FILES.values():
        for name in (images, labels):
            if not (root / name).is_file():
                raise FileNotFoundError(f"Fashion-MNIST file missing: {root / name} ({INSTALL_HINT})")


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read one gzip-compressed idx file of unsigned bytes with ``ndim`` dimensions.

    Raises:
        FileNotFoundError: the file is missing.
        IdxFormatError: not gzip, truncated or garbled compressed data, a magic number other than
            ``0x000008<ndim>``, or a payload whose length differs from the header's sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file missing: {path} ({INSTALL_HINT})")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut stream an EOFError
        raise IdxFormatError(f"{path}: not a complete gzip file ({err}); reinstall {APT_PACKAGE}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, shorter than an idx{ndim} header ({header} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    expected = (UBYTE << 8) | ndim
    if magic != expected:
        raise IdxFormatError(f"{path}: magic number 0x{magic:08x}, expected 0x{expected:08x} "
                             f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header
    if found != size:
        raise IdxFormatError(f"{path}: the header's sizes {'x'.join(map(str, dims))} need {size} bytes of data, "
                             f"the file holds {found}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of ``"train"`` or ``"test"``.

    Raises:
        FileNotFoundError / IdxFormatError: naming the file.
    """
    root = Path(root).expanduser()
    image_path, label_path = (root / name for name in FILES[split])
    images = read_idx(image_path, 3)
    labels = read_idx(label_path, 1).astype(np.int64)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise IdxFormatError(f"{image_path}: images of {images.shape[1]}x{images.shape[2]} pixels, "
                             f"Fashion-MNIST's are {IMAGE_SIDE}x{IMAGE_SIDE}")
    if len(images) != len(labels):
        raise IdxFormatError(f"{label_path}: {len(labels)} labels for the {len(images)} images of {image_path.name}")
    if len(labels) and labels.max() >= len(CLASSES):
        raise IdxFormatError(f"{label_path}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    return images, labels


def stratified_order(labels: np.ndarray, seed: Sequence[int]) -> np.ndarray:
    """All indices in a seeded round-robin over classes: any prefix is (nearly) class-balanced.

    A seeded permutation, then stably sorted by each index's rank within its class in that
    permutation: first one image of every class, then a second of every class, and so on.
    """
    order = np.random.default_rng(list(seed)).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    seen: dict[int, int] = {}
    for position, index in enumerate(order):
        label = int(labels[index])
        rank[position] = seen.get(label, 0)
        seen[label] = rank[position] + 1
    return order[np.argsort(rank, kind="stable")]


def split_indices(labels: np.ndarray, val_size: int, train_subset: Optional[int] = None,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train indices, validation indices)`` into the official training set, each sorted.

    Validation: the first ``val_size`` of :func:`stratified_order` with ``(seed, 0)``. Training:
    the others, or the first ``train_subset`` of them in :func:`stratified_order` with
    ``(seed, 1)`` (so subsets of one seed are nested). Neither depends on ``run.seed``.

    Raises:
        ValueError: naming ``data.val_size`` / ``data.train_subset`` when the images do not suffice.
    """
    n = len(labels)
    if not 1 <= val_size < n:
        raise ValueError(f"data.val_size: {val_size} must be in [1, {n - 1}] ({n} training images)")
    val = stratified_order(labels, (seed, 0))[:val_size]
    rest = np.setdiff1d(np.arange(n), val)  # sorted
    if train_subset is not None:
        if not 1 <= train_subset <= len(rest):
            raise ValueError(f"data.train_subset: {train_subset} must be in [1, {len(rest)}] ({n} training images "
                             f"minus data.val_size={val_size})")
        rest = np.sort(rest[stratified_order(labels[rest], (seed, 1))[:train_subset]])
    return rest, np.sort(val)


class FashionMnistDataset(Dataset):
    """Fashion-MNIST images held in memory (uint8), optionally a selection of them.

    Args:
        images: ``(N, 28, 28)`` uint8.
        labels: ``N`` class indices.
        indices: which of them this dataset holds (positions in the idx file); None = all.
        transform: applied to each grey (mode ``L``) PIL image.
        split: ``"train"`` / ``"val"`` / ``"test"``, for messages.

    Attributes:
        data: ``(M, 28, 28)`` uint8 of the selection; ``targets``: M ints; ``classes``: the 10
        names; ``indices``: the selected positions in the idx file (to check that two runs used
        the same images).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: Optional[np.ndarray] = None,
                 transform: Optional[Callable] = None, split: str = "train") -> None:
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.data = np.ascontiguousarray(images[self.indices])
        self.targets = [int(y) for y in labels[self.indices]]
        self.classes = list(CLASSES)
        self.transform = transform
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index], mode="L")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def build_fashion_mnist(root: str | os.PathLike, train_transform: Optional[Callable] = None,
                        val_transform: Optional[Callable] = None, val_size: int = 5000,
                        train_subset: Optional[int] = None,
                        split_seed: int = 0) -> tuple[FashionMnistDataset, FashionMnistDataset]:
    """``(train, val)``: both carved from the official training files by :func:`split_indices`.

    Raises:
        FileNotFoundError / IdxFormatError: naming the file; ValueError naming the field.
    """
    images, labels = load_split(root, "train")
    train_idx, val_idx = split_indices(labels, val_size, train_subset, split_seed)
    return (FashionMnistDataset(images, labels, train_idx, train_transform, "train"),
            FashionMnistDataset(images, labels, val_idx, val_transform, "val"))


def build_fashion_mnist_test(root: str | os.PathLike, transform: Optional[Callable] = None) -> FashionMnistDataset:
    """The official 10,000-image test set (``t10k-*``), for the reported numbers."""
    images, labels = load_split(root, "test")
    return FashionMnistDataset(images, labels, None, transform, "test")
