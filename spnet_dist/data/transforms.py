"""Augmentation recipes, one per data family, as torchvision (v1) transform pipelines.

Every recipe draws its randomness from torch's default CPU generator only (torchvision's
Random* transforms do). The train loader relies on that: it seeds that generator per sample
from (seed, epoch, index), which makes augmentations reproducible after a resume and
independent of the number of workers. Do not add transforms that draw from Python's
``random`` (e.g. ``RandomChoice``) without changing that seeding.
"""
from __future__ import annotations

from typing import Callable

from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
HALF = (0.5, 0.5, 0.5)

AUGMENTS = ("imagenet", "cifar", "digits", "none")
# "auto" picks the recipe that matches where the images come from.
AUTO_AUGMENT = {"imagefolder": "imagenet", "cifar": "cifar", "digits": "digits"}


class ToRGB:
    """Convert any PIL image (L, P, RGBA, ...) to 3-channel RGB.

    A class rather than a lambda so the transform pickles into DataLoader worker processes.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def resolve_augment(augment: str, data_format: str) -> str:
    """Turn ``data.augment`` into a concrete recipe name.

    Args:
        augment: one of ``"auto"``, ``"imagenet"``, ``"cifar"``, ``"digits"``, ``"none"``.
        data_format: ``data.format`` (``"imagefolder"``, ``"cifar"``, ``"digits"``); only read
            when ``augment == "auto"``.

    Returns:
        A name from ``AUGMENTS``.

    Raises:
        ValueError: naming ``data.augment`` (or ``data.format`` for "auto" with an unknown format).
    """
    if augment == "auto":
        if data_format not in AUTO_AUGMENT:
            raise ValueError(
                f"data.augment='auto' needs data.format in {sorted(AUTO_AUGMENT)}, "
                f"got data.format={data_format!r}; set data.augment to one of {list(AUGMENTS)}"
            )
        return AUTO_AUGMENT[data_format]
    if augment not in AUGMENTS:
        raise ValueError(
            f"data.augment must be 'auto' or one of {list(AUGMENTS)}, got {augment!r}"
        )
    return augment


def build_transform(augment: str, image_size: int, train: bool) -> Callable[[Image.Image], object]:
    """Build the PIL → normalised ``(3, image_size, image_size)`` float tensor pipeline.

    Args:
        augment: a concrete recipe from ``AUGMENTS`` (resolve ``"auto"`` first with
            :func:`resolve_augment`).
        image_size: side of the square output.
        train: random augmentation for training; deterministic resize/crop for evaluation.

    Returns:
        A ``torchvision.transforms.Compose``.

    Raises:
        ValueError: unknown recipe (naming ``data.augment``) or non-positive ``image_size``.
    """
    if augment not in AUGMENTS:
        raise ValueError(
            f"data.augment must be one of {list(AUGMENTS)} here (resolve 'auto' with "
            f"resolve_augment first), got {augment!r}"
        )
    if int(image_size) <= 0:
        raise ValueError(f"data.image_size must be positive, got {image_size!r}")
    size = int(image_size)
    square = (size, size)  # a tuple so non-square inputs still give square outputs

    if augment == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if train:
            geometry = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        else:
            # The standard 0.875 centre-crop ratio: 256 → 224.
            geometry = [T.Resize(int(size / 0.875)), T.CenterCrop(size)]
    elif augment == "cifar":
        mean, std = CIFAR_MEAN, CIFAR_STD
        # Resize is the identity at the native 32 px; it only matters for other sizes.
        geometry = [T.Resize(square)]
        if train:
            geometry += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    elif augment == "digits":
        mean, std = HALF, HALF
        geometry = [T.Resize(square)]
        if train:
            # No flips: a mirrored 2, 3, 7 ... is not the same digit. fill=0 is the background.
            geometry += [T.RandomAffine(degrees=10, translate=(0.1, 0.1), fill=0)]
    else:  # "none"
        mean, std = HALF, HALF
        geometry = [T.Resize(square)]

    return T.Compose([ToRGB(), *geometry, T.ToTensor(), T.Normalize(mean, std)])
