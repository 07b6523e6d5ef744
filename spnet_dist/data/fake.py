"""Synthetic ImageNet-layout JPEG folders for tests and benchmarks (no download needed).

Images are real baseline JPEGs of varied sizes and aspect ratios around ImageNet's typical
500x375, with smooth content plus grain so they compress to ImageNet-like file sizes (a pure
noise image would be several times larger and slower to decode than a photograph).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# Aspect ratios (w/h) seen in ImageNet: mostly 4:3 landscape, some portrait and square.
ASPECTS = (4 / 3, 4 / 3, 4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3, 16 / 9)


def fake_image(rng: np.random.Generator, long_side_range: tuple[int, int] = (400, 600)) -> Image.Image:
    """One RGB image: a few colour blobs (upsampled low-res noise) with fine grain on top."""
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    long_side = int(rng.integers(long_side_range[0], long_side_range[1] + 1))
    w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-24, 25, size=(h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def make_fake_imagenet(out: str | os.PathLike, classes: int = 10, per_class: int = 20,
                       val_per_class: int | None = None, seed: int = 0,
                       long_side_range: tuple[int, int] = (400, 600), quality: int = 90) -> Path:
    """Write ``out/{train,val}/nXXXXXXXX/<i>.JPEG`` and return ``out``.

    Args:
        out: dataset root (created).
        classes: number of class folders (WordNet-like ids ``n00000000``, ``n00000001``, ...).
        per_class: training images per class.
        val_per_class: validation images per class (default: ``max(1, per_class // 5)``).
        seed: content seed; the same arguments write the same bytes.
        long_side_range: inclusive range of the longer side in pixels.
        quality: JPEG quality (ImageNet's originals are mostly 75-95).
    """
    if classes < 1 or per_class < 1:
        raise ValueError(f"need classes >= 1 and per_class >= 1, got {classes}, {per_class}")
    rng = np.random.default_rng(seed)
    out = Path(out)
    val_per_class = max(1, per_class // 5) if val_per_class is None else val_per_class
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = out / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                fake_image(rng, long_side_range).save(folder / f"{split}_{c:04d}_{i:05d}.JPEG",
                                                      format="JPEG", quality=quality)
    return out
