"""The data sets a data config names: built with their transforms, counted, and their root checked."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch.utils.data import Dataset

from .cifar import CifarDataset, check_cifar
from .digits import prepare_digits
from .fashion_mnist import build_fashion_mnist, build_fashion_mnist_test, check_fashion_mnist, fashion_root
from .folder import SPLITS, build_imagefolder, split_directory
from .transforms import build_transform, resolve_augment

DATA_FORMATS = ("imagefolder", "cifar", "digits", "fashion_mnist")
JPEG_FOLDERS = ("imagefolder", "digits")  # the formats read as root/{train,val}/<class>/<image>
DEFAULT_DIGITS_ROOT = "~/.cache/spnet_dist/digits"
# Formats with a test set apart from the validation split the trainer selects on (build_test_dataset).
WITH_TEST_SPLIT = ("fashion_mnist",)


def _check_format(data_cfg: Any) -> str:
    fmt = data_cfg.format
    if fmt not in DATA_FORMATS:
        raise ValueError(f"data.format must be one of {list(DATA_FORMATS)}, got {fmt!r}")
    return fmt


def _required_root(data_cfg: Any) -> str:
    """``data.root`` of a format that has no default place (imagefolder, cifar)."""
    root = getattr(data_cfg, "root", None)
    if not root:
        raise ValueError(f"data.root: required for data.format {data_cfg.format!r}")
    return root


def prepared_root(data_cfg: Any) -> Path:
    """Where the data of ``data_cfg`` is: ``data.root``, the digits cache (built on first use), or
    Fashion-MNIST's Debian directory when ``data.root`` is empty.

    Raises:
        ValueError: ``data.root`` missing for a format that needs it.
    """
    fmt = _check_format(data_cfg)
    if fmt == "digits":
        return prepare_digits(getattr(data_cfg, "root", None) or DEFAULT_DIGITS_ROOT)
    if fmt == "fashion_mnist":
        return fashion_root(getattr(data_cfg, "root", None))
    return Path(_required_root(data_cfg))


def build_datasets(data_cfg: Any, listing: Optional[dict[str, Any]] = None) -> tuple[Dataset, Dataset]:
    """Build ``(train_dataset, val_dataset)`` with their transforms from a data config.

    Args:
        data_cfg: any object with attributes ``format`` (``"imagefolder"``, ``"cifar"``,
            ``"digits"``, ``"fashion_mnist"``), ``root`` (path; optional for digits and
            fashion_mnist), ``image_size`` and ``augment`` (``"auto"`` or a recipe in
            :data:`spnet_dist.data.transforms.AUGMENTS`); for fashion_mnist also ``val_size``,
            ``train_subset`` and ``split_seed`` (defaults 5000, None, 0); normally
            ``spnet_dist.config.DataConfig``.
        listing: for ``imagefolder`` / ``digits``, a file list saved by rank 0
            (:func:`spnet_dist.data.folder.save_listing`); the folders are then not scanned.

    Returns:
        For fashion_mnist, the training part (or its ``data.train_subset``) and the validation
        split carved from the official training set; the official test set is
        :func:`build_test_dataset`'s. For cifar, the training and the official test set.

    Raises:
        ValueError: unknown ``data.format`` / ``data.augment``, missing ``data.root``, or a
            ``data.val_size`` / ``data.train_subset`` larger than the data.
        FileNotFoundError: the data is not where ``data.root`` says.
    """
    fmt = _check_format(data_cfg)
    recipe = resolve_augment(data_cfg.augment, fmt)
    train_tf = build_transform(recipe, data_cfg.image_size, train=True)
    val_tf = build_transform(recipe, data_cfg.image_size, train=False)
    # Rank-0-first for the digits cache is the caller's job; prepare_digits is atomic and idempotent regardless.
    root = prepared_root(data_cfg)
    if fmt in JPEG_FOLDERS:
        return build_imagefolder(root, train_tf, val_tf, listing)
    if fmt == "fashion_mnist":
        return build_fashion_mnist(root, train_tf, val_tf, **_fashion_split(data_cfg))
    return CifarDataset(root, train=True, transform=train_tf), CifarDataset(root, train=False, transform=val_tf)


def _fashion_split(data_cfg: Any) -> dict[str, Any]:
    return {"val_size": int(getattr(data_cfg, "val_size", 5000)),
            "train_subset": getattr(data_cfg, "train_subset", None),
            "split_seed": int(getattr(data_cfg, "split_seed", 0))}


def build_test_dataset(data_cfg: Any) -> Optional[Dataset]:
    """The held-out test set of formats that have one besides their validation split, else None.

    fashion_mnist: the official 10,000 ``t10k`` images with the evaluation transform, for the
    reported numbers (the validation split of :func:`build_datasets` is for model selection).
    imagefolder, digits, cifar: None (their ``val`` split is all there is; for cifar it *is*
    the official test set).

    Args:
        data_cfg: as for :func:`build_datasets`.

    Raises:
        FileNotFoundError / ValueError: as :func:`build_datasets`.
    """
    fmt = _check_format(data_cfg)
    if fmt not in WITH_TEST_SPLIT:
        return None
    recipe = resolve_augment(data_cfg.augment, fmt)
    return build_fashion_mnist_test(prepared_root(data_cfg), build_transform(recipe, data_cfg.image_size, train=False))


def check_data_root(data_cfg: Any) -> Optional[int]:
    """Check that ``data.root`` holds what ``data.format`` reads, without reading or scanning it.

    The readers' own layout rules, applied with a few ``stat`` calls so that a wrong path stops a
    run before any work starts: imagefolder needs the split folders :func:`build_imagefolder`
    opens (:func:`~spnet_dist.data.folder.split_directory`); cifar needs the layout
    :func:`~spnet_dist.data.cifar.find_cifar` detects with every file of both splits
    (:func:`~spnet_dist.data.cifar.check_cifar`); fashion_mnist needs the four idx files in
    ``data.root`` or, when it is empty, in Debian's directory
    (:func:`~spnet_dist.data.fashion_mnist.check_fashion_mnist`: the message names the path and
    the apt package). Class folders are not listed (on ImageNet that is the scan rank 0 does
    once in ``build_loaders``). The digits cache is built on first use, so it is not checked.

    Args:
        data_cfg: ``spnet_dist.config.DataConfig`` or any object with ``format`` and ``root``.

    Returns:
        The number of classes the layout itself tells (CIFAR-10 / CIFAR-100), else None.

    Raises:
        ValueError / FileNotFoundError: one line, starting with the field (``data.root: ...``).
    """
    fmt = _check_format(data_cfg)
    if fmt == "digits":
        return None
    try:
        if fmt == "fashion_mnist":
            check_fashion_mnist(prepared_root(data_cfg))
            return None
        root = _required_root(data_cfg)
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"directory not found: {root}")
        if fmt == "imagefolder":
            for split in SPLITS:
                split_directory(path, split)
            return None
        return check_cifar(path).num_classes
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.root: {err}") from None


def num_classes_of(dataset: Dataset) -> int:
    """Number of classes of a dataset built here (also through ``Subset``-style wrappers).

    Raises:
        ValueError: the dataset exposes neither ``classes`` nor ``targets``.
    """
    while True:
        if getattr(dataset, "classes", None) is not None:
            return len(dataset.classes)
        if hasattr(dataset, "dataset"):
            dataset = dataset.dataset
            continue
        targets = getattr(dataset, "targets", None)
        if targets is not None and len(targets) > 0:
            return int(max(targets)) + 1
        raise ValueError(f"cannot tell the number of classes of {type(dataset).__name__}")
