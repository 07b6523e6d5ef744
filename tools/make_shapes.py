"""Write "photo-shapes": a 10-class ImageFolder that is harder than the digits demo, built offline.

Each image is a random crop of one of scikit-learn's two bundled photographs (``china.jpg``,
``flower.jpg``: real photo clutter, shipped inside the package, no download) with one randomly
coloured, sized, placed and rotated shape blended onto it. The class is the shape. Small images,
low contrast and similar shapes (circle/ring, square/diamond, plus/cross) keep a ResNet-20 at
16 px well below 100 % after a short CPU schedule, so differences between training recipes can
exceed seed noise (the digits demo saturates near 99 %).

    python tools/make_shapes.py --out ~/.cache/spnet_dist/shapes --train-per-class 200 --val-per-class 100
    spnet-train --config configs/demo.yaml data.format=imagefolder data.root=~/.cache/spnet_dist/shapes

The output is deterministic for a given ``--seed`` and published atomically (written to a
temporary directory, then renamed), so an interrupted run never leaves a half-written set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "ring", "square", "diamond", "triangle", "plus", "cross", "hbar", "vbar", "star")
CANVAS = 32          # saved size; training reads it at data.image_size (16 px in the evidence sweeps)
MARKER = ".complete"
VERSION = 3
BACKGROUND_CONTRAST = 0.35


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(img, dtype=np.uint8) for img in load_sample_images().images]  # (427, 640, 3) each


def _shape_polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[list[tuple[float, float]]]:
    """Polygons (list of point lists) of one shape; rings and circles are handled by the caller."""
    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    w = r * 0.35  # bar half-width
    if name == "square":
        return [rot([(-r, -r), (r, -r), (r, r), (-r, r)])]
    if name == "diamond":
        return [rot([(0, -r * 1.3), (r, 0), (0, r * 1.3), (-r, 0)])]
    if name == "triangle":
        return [rot([(0, -r * 1.2), (r * 1.1, r * 0.8), (-r * 1.1, r * 0.8)])]
    if name == "plus":
        return [rot([(-r, -w), (r, -w), (r, w), (-r, w)]), rot([(-w, -r), (w, -r), (w, r), (-w, r)])]
    if name == "cross":
        return _shape_polygon("plus", cx, cy, r, angle + math.pi / 4)
    if name == "hbar":
        return [rot([(-r * 1.3, -w), (r * 1.3, -w), (r * 1.3, w), (-r * 1.3, w)])]
    if name == "vbar":
        return [rot([(-w, -r * 1.3), (w, -r * 1.3), (w, r * 1.3), (-w, r * 1.3)])]
    if name == "star":
        pts = [(r * (1.0 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5 - math.pi / 2),
                r * (1.0 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5 - math.pi / 2)) for k in range(10)]
        return [rot(pts)]
    raise ValueError(f"unknown shape {name!r}")


def render(label: int, rng: np.random.Generator, photos: list[np.ndarray]) -> Image.Image:
    """One CANVAS x CANVAS RGB image of class ``label``.

    Args:
        label: index into :data:`CLASSES`.
        rng: the image's own generator (all randomness comes from it).
        photos: background photographs (H, W, 3) uint8.
    """
    photo = photos[int(rng.integers(len(photos)))]
    crop = int(rng.integers(CANVAS, 4 * CANVAS))
    y0 = int(rng.integers(photo.shape[0] - crop))
    x0 = int(rng.integers(photo.shape[1] - crop))
    patch = photo[y0:y0 + crop, x0:x0 + crop].astype(np.float32)
    # Photo clutter at reduced contrast around a random grey level: hard, but the shape stays visible.
    grey = float(rng.uniform(60, 196))
    patch = grey + BACKGROUND_CONTRAST * (patch - patch.mean())
    background = Image.fromarray(patch.clip(0, 255).astype(np.uint8)).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)

    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    r = float(rng.uniform(6.0, 11.0))
    cx, cy = (float(rng.uniform(r + 1, CANVAS - r - 1)) for _ in range(2))
    name = CLASSES[label]
    if name in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if name == "ring":
            inner = r * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        for poly in _shape_polygon(name, cx, cy, r, float(rng.uniform(-0.35, 0.35))):
            draw.polygon(poly, fill=255)

    # A random hue, darker or brighter than the background by a random margin.
    sign = 1.0 if rng.random() < 0.5 else -1.0
    colour_rgb = (grey + sign * rng.uniform(50, 110) + rng.uniform(-40, 40, size=3)).clip(0, 255)
    colour = Image.new("RGB", (CANVAS, CANVAS), tuple(int(c) for c in colour_rgb))
    alpha = float(rng.uniform(0.75, 1.0))  # partly transparent: lower contrast on busy backgrounds
    mask = mask.point(lambda v: int(v * alpha))
    return Image.composite(colour, background, mask)


def write_shapes(out: str | os.PathLike, train_per_class: int, val_per_class: int, seed: int = 0) -> Path:
    """Write ``out/train/<class>/*.jpg`` and ``out/val/<class>/*.jpg`` unless a matching set exists.

    Args:
        out: target directory (``~`` expanded); replaced atomically.
        train_per_class: training images per class.
        val_per_class: validation images per class.
        seed: base seed; image ``i`` of split ``s`` uses ``(seed, split, label, i)``.

    Returns:
        The data set root.
    """
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"--train-per-class and --val-per-class must be >= 1, got {train_per_class}, {val_per_class}")
    target = Path(out).expanduser().absolute()
    wanted = {"version": VERSION, "seed": seed, "train_per_class": train_per_class, "val_per_class": val_per_class}
    try:
        if json.loads((target / MARKER).read_text()) == wanted:
            return target
    except (OSError, ValueError):
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    photos = _photos()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for split_idx, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
            for label, name in enumerate(CLASSES):
                (tmp / split / name).mkdir(parents=True)
                for i in range(per_class):
                    rng = np.random.default_rng([seed, split_idx, label, i])
                    render(label, rng, photos).save(tmp / split / name / f"{i:05d}.jpg", quality=95)
        (tmp / MARKER).write_text(json.dumps(wanted))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="~/.cache/spnet_dist/shapes", help="output directory")
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_shapes(a.out, a.train_per_class, a.val_per_class, a.seed))


if __name__ == "__main__":
    main()
