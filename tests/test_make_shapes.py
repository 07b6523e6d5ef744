"""tools/make_shapes.py: the photo-shapes ImageFolder is deterministic, complete and idempotent."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("make_shapes", Path(__file__).parents[1] / "tools" / "make_shapes.py")
make_shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shapes)


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_determinism_and_idempotence(tmp_path):
    a = make_shapes.write_shapes(tmp_path / "a", train_per_class=2, val_per_class=1, seed=3)
    b = make_shapes.write_shapes(tmp_path / "b", train_per_class=2, val_per_class=1, seed=3)
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(make_shapes.CLASSES)
    assert len(list((a / "train").rglob("*.jpg"))) == 20 and len(list((a / "val").rglob("*.jpg"))) == 10
    assert digest(a) == digest(b)  # same seed, same bytes
    mtime = (a / make_shapes.MARKER).stat().st_mtime_ns
    make_shapes.write_shapes(a, train_per_class=2, val_per_class=1, seed=3)  # complete: not rewritten
    assert (a / make_shapes.MARKER).stat().st_mtime_ns == mtime
    c = make_shapes.write_shapes(tmp_path / "a", train_per_class=2, val_per_class=1, seed=4)  # other seed: rebuilt
    assert digest(c) != digest(b)
    assert not list(tmp_path.glob(".a.tmp-*"))  # no temporary tree left behind


def test_images_differ_between_classes_and_are_rgb(tmp_path):
    import numpy as np
    from PIL import Image

    root = make_shapes.write_shapes(tmp_path / "s", train_per_class=1, val_per_class=1)
    img = Image.open(root / "train" / "circle" / "00000.jpg")
    assert img.mode == "RGB" and img.size == (make_shapes.CANVAS, make_shapes.CANVAS)
    arrays = [np.asarray(Image.open(root / "train" / c / "00000.jpg"), dtype=float) for c in make_shapes.CLASSES]
    assert all(np.abs(arrays[0] - x).mean() > 1.0 for x in arrays[1:])


def test_bad_counts_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="--train-per-class"):
        make_shapes.write_shapes(tmp_path / "x", train_per_class=0, val_per_class=1)
