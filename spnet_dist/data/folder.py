"""ImageNet-layout folders: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from torchvision.datasets import ImageFolder


class ImageFolderDataset(ImageFolder):
    """``torchvision.datasets.ImageFolder`` that ignores hidden directories.

    torchvision treats every sub-directory as a class, so a stray ``.ipynb_checkpoints`` or
    ``.cache`` folder would silently become an extra (empty or wrong) class and shift labels.
    """

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = sorted(
            entry.name for entry in os.scandir(directory)
            if entry.is_dir() and not entry.name.startswith(".")
        )
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}


def load_split(root: str | os.PathLike, split: str,
               transform: Optional[Callable] = None) -> ImageFolderDataset:
    """Open one split directory with a one-line error if it is missing or empty.

    Args:
        root: the dataset root holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        transform: applied to each PIL image.

    Raises:
        FileNotFoundError: the split directory does not exist, has no class folders, or a class
            folder holds no image.
    """
    directory = Path(root).expanduser() / split
    if not directory.is_dir():
        raise FileNotFoundError(
            f"ImageFolder split directory not found: {directory} "
            f"(expected {Path(root).expanduser()}/{{train,val}}/<class>/<image>)"
        )
    try:
        return ImageFolderDataset(str(directory), transform=transform)
    except FileNotFoundError as e:
        # torchvision's message names the classes but not the directory.
        message = str(e).replace("\n", " ")
        if str(directory) not in message:
            message = f"{directory}: {message}"
        raise FileNotFoundError(message) from e


def build_imagefolder(root: str | os.PathLike,
                      train_transform: Optional[Callable] = None,
                      val_transform: Optional[Callable] = None,
                      ) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Open ``root/train`` and ``root/val`` and check they agree on the classes.

    Args:
        root: dataset root.
        train_transform: transform of the training split.
        val_transform: transform of the validation split.

    Returns:
        ``(train_dataset, val_dataset)`` with identical ``classes`` / ``class_to_idx``.

    Raises:
        FileNotFoundError: a split is missing or empty (see :func:`load_split`).
        ValueError: the two splits have different class folders; labels would not match.
    """
    train = load_split(root, "train", train_transform)
    val = load_split(root, "val", val_transform)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"class folders differ between {train.root} and {val.root}: "
            f"only in train {_head(only_train)}, only in val {_head(only_val)}"
        )
    return train, val


def _head(names: list[str], n: int = 5) -> str:
    """Short printable list so a 1000-class mismatch stays a one-line error."""
    shown = ", ".join(names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}] ({len(names)})"
