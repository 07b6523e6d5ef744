"""CIFAR-10 / CIFAR-100 read from the official "python version" pickles in a local directory.

Security note: the files are read with ``pickle.load``, which can execute code from a crafted
file. They are only ever loaded from the directory the user configured as ``data.root`` (their own
copy of the dataset, in the official format) and are never downloaded by this code, so this is
the same trust decision as running the user's own config.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


@dataclass(frozen=True)
class CifarLayout:
    """File names and pickle keys of one CIFAR variant."""

    dirname: str            # name of the directory inside the official tarball
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes
    num_classes: int


CIFAR10 = CifarLayout(
    dirname="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key=b"labels",
    meta_file="batches.meta",
    names_key=b"label_names",
    num_classes=10,
)
CIFAR100 = CifarLayout(
    dirname="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key=b"fine_labels",
    meta_file="meta",
    names_key=b"fine_label_names",
    num_classes=100,
)


def find_cifar(root: str | os.PathLike) -> tuple[Path, CifarLayout]:
    """Locate the pickle directory under ``root`` and tell which CIFAR it is.

    Args:
        root: either the pickle directory itself or the directory that contains
            ``cifar-10-batches-py`` / ``cifar-100-python`` (where the tarball was extracted).

    Raises:
        FileNotFoundError: naming ``root`` when neither layout is recognised.
    """
    root = Path(root).expanduser()
    for layout in (CIFAR10, CIFAR100):
        if (root / layout.dirname).is_dir():
            return root / layout.dirname, layout
    # The directory itself: tell the variants apart by their test file, which both always ship.
    if (root / CIFAR10.test_files[0]).is_file() or (root / CIFAR10.train_files[0]).is_file():
        return root, CIFAR10
    if (root / CIFAR100.test_files[0]).is_file() or (root / CIFAR100.train_files[0]).is_file():
        return root, CIFAR100
    raise FileNotFoundError(
        f"{root} holds neither CIFAR-10 nor CIFAR-100 python-pickle data: expected {CIFAR10.dirname}/ or "
        f"{CIFAR100.dirname}/ there, or the files data_batch_1..5 + test_batch (CIFAR-10) / "
        f"train + test (CIFAR-100) directly in it (this code never downloads)"
    )


def check_cifar(root: str | os.PathLike) -> CifarLayout:
    """:func:`find_cifar`, then every file of both splits present (what training opens).

    Raises:
        FileNotFoundError: naming ``root`` (no layout recognised) or the first missing file.
    """
    directory, layout = find_cifar(root)
    for name in layout.train_files + layout.test_files:
        _require_file(directory / name)
    return layout


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file missing: {path}")


def _load_pickle(path: Path) -> dict:
    _require_file(path)
    with open(path, "rb") as f:
        # encoding="bytes": the official files were pickled by Python 2; keys come back as bytes.
        return pickle.load(f, encoding="bytes")


class CifarDataset(Dataset):
    """One split of CIFAR-10 or CIFAR-100 held in memory as uint8 HWC images.

    Args:
        root: see :func:`find_cifar`.
        train: the training files (``data_batch_*`` / ``train``) or the test files.
        transform: applied to each RGB PIL image.

    Attributes:
        data: ``(N, 32, 32, 3)`` uint8.
        targets: ``N`` ints (fine labels for CIFAR-100).
        classes: class names (from the meta file, else ``"0".."K-1"``).
        layout: which variant was found.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True,
                 transform: Optional[Callable] = None) -> None:
        self.directory, self.layout = find_cifar(root)
        self.train = train
        self.transform = transform
        files = self.layout.train_files if train else self.layout.test_files
        chunks, targets = [], []
        for name in files:
            path = self.directory / name
            entry = _load_pickle(path)
            if b"data" not in entry or self.layout.label_key not in entry:
                raise ValueError(
                    f"{path}: expected keys b'data' and {self.layout.label_key!r}, "
                    f"found {sorted(entry)[:6]}"
                )
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            labels = list(entry[self.layout.label_key])
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
                raise ValueError(
                    f"{path}: expected data of shape (N, 3072) with N labels, got "
                    f"{data.shape} and {len(labels)} labels"
                )
            chunks.append(data)
            targets.extend(int(y) for y in labels)
        # Rows are channel-planar: 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
        self.data = np.concatenate(chunks).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        self.targets = targets
        bad = [y for y in targets if not 0 <= y < self.layout.num_classes]
        if bad:
            raise ValueError(f"{self.directory}: label {bad[0]} outside 0..{self.layout.num_classes - 1}")
        self.classes = self._class_names()

    def _class_names(self) -> list[str]:
        meta = self.directory / self.layout.meta_file
        if meta.is_file():
            names = _load_pickle(meta).get(self.layout.names_key)
            if names is not None and len(names) == self.layout.num_classes:
                return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        return [str(i) for i in range(self.layout.num_classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index])  # (32, 32, 3) uint8 → RGB
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
