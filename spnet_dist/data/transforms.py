"""Augmentation recipes, one per data family, as torchvision (v1) transform pipelines (Fashion-MNIST's in numpy).

Every recipe draws its randomness from torch's default CPU generator only (torchvision's
Random* transforms do). The train loader relies on that: it seeds that generator per sample
from (seed, epoch, index), which makes augmentations reproducible after a resume and
independent of the number of workers. Do not add transforms that draw from Python's
``random`` (e.g. ``RandomChoice``) without changing that seeding.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
HALF = (0.5, 0.5, 0.5)
# Mean and std of the 60,000 Fashion-MNIST training images (pixel / 255), measured: 0.28604, 0.35302.
# One grey channel, repeated over the three input channels of the models.
FASHION_MEAN = (0.2860,) * 3
FASHION_STD = (0.3530,) * 3

AUGMENTS = ("imagenet", "cifar", "digits", "fashion_mnist", "none")
# "auto" picks the recipe that matches where the images come from.
AUTO_AUGMENT = {"imagefolder": "imagenet", "cifar": "cifar", "digits": "digits", "fashion_mnist": "fashion_mnist"}
# The normalisation each recipe ends with (export's config.json records it; timm reads it there).
NORMALISATION = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar": (CIFAR_MEAN, CIFAR_STD), "digits": (HALF, HALF),
                 "fashion_mnist": (FASHION_MEAN, FASHION_STD), "none": (HALF, HALF)}


class ToRGB:
    """Convert any PIL image (L, P, RGBA, ...) to 3-channel RGB.

    A class rather than a lambda so the transform pickles into DataLoader worker processes.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GreyCropFlip:
    """The Fashion-MNIST recipe on a grey image, in numpy: the same tensor as the torchvision pipeline.

    Equal, bit for bit and draw for draw, to ``Compose([Resize((s, s)), RandomCrop(s, padding=p),
    RandomHorizontalFlip(), ToRGB(), ToTensor(), Normalize(mean, std)])`` (``Resize`` and the
    random transforms only in training; tested), at a fraction of its cost (measured per 28-px
    image on this machine: ~50 µs instead of ~270 µs, where the network costs ~0.5 ms per
    evaluated 16-px image): the same ``torch.randint`` / ``torch.rand`` draws from the default
    generator in the same order, zero padding, and the normalisation as a 256-entry table of
    ToTensor + Normalize's float32 results. The grey channel is expanded to three at the end
    (a view; the batch collation copies it).

    Args:
        size: output side (``data.image_size``); other sizes are resized with PIL's bilinear
            filter first, as ``T.Resize`` does.
        train: random crop with ``padding`` and horizontal flip; evaluation only resizes.
        mean, std: per-channel normalisation (the three values must be equal: one grey channel).
        padding: zero padding of the random crop.
    """

    def __init__(self, size: int, train: bool, mean: Sequence[float], std: Sequence[float], padding: int) -> None:
        if len(set(mean)) != 1 or len(set(std)) != 1:
            raise ValueError(f"GreyCropFlip: one grey channel needs equal mean/std over channels, got {mean}, {std}")
        self.size, self.train, self.padding = int(size), bool(train), int(padding)
        self.mean, self.std = float(mean[0]), float(std[0])
        # (v / 255 - mean) / std of every uint8 value, with the float32 operations ToTensor and
        # Normalize apply per pixel: indexing this table gives their result, bit for bit.
        self._table = torch.arange(256).float().div_(255).sub_(self.mean).div_(self.std).numpy()

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(image, Image.Image):
            if image.mode != "L":
                image = image.convert("L")
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image)
        else:
            pixels = np.asarray(image, dtype=np.uint8)
            if pixels.shape != (self.size, self.size):
                return self(Image.fromarray(pixels, mode="L"))
        if self.train:
            s, p = self.size, self.padding
            # RandomCrop's draws: the row offset, then the column offset, each in [0, 2p].
            i = int(torch.randint(0, 2 * p + 1, size=(1,)).item())
            j = int(torch.randint(0, 2 * p + 1, size=(1,)).item())
            padded = np.zeros((s + 2 * p, s + 2 * p), dtype=np.uint8)
            padded[p:p + s, p:p + s] = pixels
            pixels = padded[i:i + s, j:j + s]
            if torch.rand(1).item() < 0.5:  # RandomHorizontalFlip's draw
                pixels = pixels[:, ::-1]
        return torch.from_numpy(self._table[pixels]).unsqueeze(0).expand(3, -1, -1)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, train={self.train}, padding={self.padding}, "
                f"mean={self.mean}, std={self.std})")


def fashion_padding(size: int) -> int:
    """Zero padding of the Fashion-MNIST random crop: 4 px at the native 28, 1/7 of the side."""
    return max(1, round(size / 7))


def resolve_augment(augment: str, data_format: str) -> str:
    """Turn ``data.augment`` into a concrete recipe name.

    Args:
        augment: ``"auto"`` or one of :data:`AUGMENTS`.
        data_format: ``data.format`` (``"imagefolder"``, ``"cifar"``, ``"digits"``, ``"fashion_mnist"``); only read
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

    Every recipe is a torchvision ``Compose`` except ``fashion_mnist``, a :class:`GreyCropFlip`
    (numpy, tested equal to its torchvision pipeline).

    Args:
        augment: a concrete recipe from ``AUGMENTS`` (resolve ``"auto"`` first with
            :func:`resolve_augment`).
        image_size: side of the square output.
        train: random augmentation for training; deterministic resize/crop for evaluation.

    Returns:
        A callable from PIL image to tensor.

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

    mean, std = NORMALISATION[augment]
    if augment == "imagenet":
        if train:
            geometry = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        else:
            # The standard 0.875 centre-crop ratio: 256 → 224.
            geometry = [T.Resize(int(size / 0.875)), T.CenterCrop(size)]
    elif augment == "cifar":
        # Resize is the identity at the native 32 px; it only matters for other sizes.
        geometry = [T.Resize(square)]
        if train:
            geometry += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    elif augment == "digits":
        geometry = [T.Resize(square)]
        if train:
            # No flips: a mirrored 2, 3, 7 ... is not the same digit. fill=0 is the background.
            geometry += [T.RandomAffine(degrees=10, translate=(0.1, 0.1), fill=0)]
    elif augment == "fashion_mnist":
        # The usual Fashion-MNIST recipe: random crop with zero padding (4 px at 28, the black
        # background) and horizontal flip (garments and shoes stay what they are, mirrored).
        # Computed in numpy on the grey image (GreyCropFlip: the same tensors as the torchvision
        # pipeline, a fifth of the cost), so the models keep their 3-channel stem.
        return GreyCropFlip(size, train, mean, std, fashion_padding(size))
    else:  # "none"
        geometry = [T.Resize(square)]

    return T.Compose([ToRGB(), *geometry, T.ToTensor(), T.Normalize(mean, std)])
