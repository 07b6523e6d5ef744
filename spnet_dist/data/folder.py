"""ImageNet-layout folders: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from torchvision.datasets import ImageFolder

LISTING_VERSION = 1
SPLITS = ("train", "val")


class ImageFolderDataset(ImageFolder):
    """``torchvision.datasets.ImageFolder`` that ignores hidden directories.

    torchvision treats every sub-directory as a class, so a stray ``.ipynb_checkpoints`` or
    ``.cache`` folder would silently become an extra (empty or wrong) class and shift labels.

    Args:
        root: the split directory (``.../train``).
        transform: applied to each PIL image.
        listing: ``{"classes": [...], "files": [[relative path, label], ...]}`` as written by
            :func:`save_listing`; when given, the directory is not scanned at all (ranks other
            than 0 open ImageNet's 1.28M files this way instead of listing them again).
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None,
                 listing: Optional[dict[str, Any]] = None) -> None:
        self._listing = listing
        super().__init__(str(root), transform=transform)

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        if self._listing is None:
            return super().make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        return [(os.path.join(directory, rel), int(label)) for rel, label in self._listing["files"]]

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        if self._listing is not None:
            classes = list(self._listing["classes"])
            return classes, {name: i for i, name in enumerate(classes)}
        classes = sorted(
            entry.name for entry in os.scandir(directory)
            if entry.is_dir() and not entry.name.startswith(".")
        )
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}


def split_directory(root: str | os.PathLike, split: str) -> Path:
    """``root/split``, which must be a directory (the layout rule ``spnet_dist.data.check_data_root`` shares).

    Raises:
        FileNotFoundError: one line naming the missing directory.
    """
    root = Path(root).expanduser()
    directory = root / split
    if not directory.is_dir():
        raise FileNotFoundError(f"ImageFolder split directory not found: {directory} ({root} has no {split}/ folder; "
                                f"imagefolder needs {root}/{{{','.join(SPLITS)}}}/<class>/<image>)")
    return directory


def load_split(root: str | os.PathLike, split: str,
               transform: Optional[Callable] = None,
               listing: Optional[dict[str, Any]] = None) -> ImageFolderDataset:
    """Open one split directory with a one-line error if it is missing or empty.

    Args:
        root: the dataset root holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        transform: applied to each PIL image.
        listing: this split's saved file list (see :class:`ImageFolderDataset`); skips the scan.

    Raises:
        FileNotFoundError: the split directory does not exist, has no class folders, or a class
            folder holds no image.
    """
    directory = split_directory(root, split)
    try:
        return ImageFolderDataset(str(directory), transform=transform, listing=listing)
    except FileNotFoundError as e:
        # torchvision's message names the classes but not the directory.
        message = str(e).replace("\n", " ")
        if str(directory) not in message:
            message = f"{directory}: {message}"
        raise FileNotFoundError(message) from e


def build_imagefolder(root: str | os.PathLike,
                      train_transform: Optional[Callable] = None,
                      val_transform: Optional[Callable] = None,
                      listing: Optional[dict[str, Any]] = None,
                      ) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Open ``root/train`` and ``root/val`` and check they agree on the classes.

    Args:
        root: dataset root.
        train_transform: transform of the training split.
        val_transform: transform of the validation split.
        listing: a file list saved by :func:`save_listing` for this root; nothing is scanned.

    Returns:
        ``(train_dataset, val_dataset)`` with identical ``classes`` / ``class_to_idx``.

    Raises:
        FileNotFoundError: a split is missing or empty (see :func:`load_split`).
        ValueError: the two splits have different class folders; labels would not match.
    """
    splits = listing["splits"] if listing is not None else {}
    train = load_split(root, "train", train_transform, splits.get("train"))
    val = load_split(root, "val", val_transform, splits.get("val"))
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


# ----------------------------------------------------------------------------- shared file list

def listing_of(train: ImageFolderDataset, val: ImageFolderDataset) -> dict[str, Any]:
    """The scanned file lists of both splits, relative to each split directory (JSON-ready)."""
    def one(split: ImageFolderDataset) -> dict[str, Any]:
        return {"classes": list(split.classes),
                "files": [[os.path.relpath(path, split.root), label] for path, label in split.samples]}
    return {"version": LISTING_VERSION, "root": str(Path(train.root).parent),
            "splits": {"train": one(train), "val": one(val)}}


def save_listing(content: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a listing (or ``{"error": message}``) atomically: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)
    return path


def read_listing(path: str | os.PathLike, root: str | os.PathLike) -> dict[str, Any]:
    """Read rank 0's listing; re-raise the error rank 0 met while scanning, if any.

    Raises:
        FileNotFoundError / ValueError: the one-line error rank 0 raised (same type), so every
            rank stops with the same message instead of waiting in a collective.
    """
    content = json.loads(Path(path).read_text())
    if "error" in content:
        kind = ValueError if content.get("type") == "ValueError" else FileNotFoundError
        raise kind(content["error"])
    if content.get("version") != LISTING_VERSION or content.get("root") != str(Path(root).expanduser()):
        raise ValueError(f"{path}: file list of another data set ({content.get('root')}), "
                         f"expected {Path(root).expanduser()}")
    return content
