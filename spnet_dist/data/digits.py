"""A real, tiny, offline data set: scikit-learn's bundled handwritten digits as JPEG folders.

``sklearn.datasets.load_digits()`` ships inside scikit-learn (no download): 1,797 8x8 grey
images of the digits 0-9 with values 0..16. :func:`prepare_digits` writes them once into the
ImageNet layout (``train/<digit>/*.jpg``, ``val/<digit>/*.jpg``) so the demo config exercises the
exact same folder → decode → augment path as ImageNet.

The cache is published atomically: everything (including the ``.complete`` marker) is written
into a temporary directory next to the target, then renamed into place with ``os.replace``. A
reader therefore either sees no cache or a complete one, never a half-written one, and a
concurrent second writer discards its copy when it finds a complete cache already there.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

try:  # POSIX only; without it we still publish atomically, just without waiting for each other.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# Bump when the written files change (size, quality, naming) so old caches get rebuilt.
DIGITS_CACHE_VERSION = 1
MARKER = ".complete"
SAVED_SIZE = 32      # 8x8 upscaled before JPEG so block artifacts stay small relative to strokes
JPEG_QUALITY = 95


def prepare_digits(cache_dir: str | os.PathLike, seed: int = 0, val_fraction: float = 0.2) -> Path:
    """Make sure ``cache_dir`` holds the digits as ``train/`` + ``val/`` JPEG folders.

    Idempotent and safe to call from several processes: a complete cache built with the same
    ``seed`` / ``val_fraction`` is returned immediately; otherwise it is (re)built in a temporary
    directory and atomically moved into place. Callers should still prepare on rank 0 first
    (so other ranks just wait and then hit the fast path).

    Args:
        cache_dir: where the folder tree goes (``~`` expanded).
        seed: seed of the stratified train/val split.
        val_fraction: share of each class that goes to ``val/`` (scikit-learn rounds the
            validation count up: 360 of 1,797 at 0.2).

    Returns:
        The dataset root, to pass to :func:`spnet_dist.data.folder.build_imagefolder`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    target = Path(cache_dir).expanduser().absolute()
    wanted = {"version": DIGITS_CACHE_VERSION, "seed": int(seed), "val_fraction": float(val_fraction)}
    if is_complete(target, wanted):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock") as locked:
        if is_complete(target, wanted):  # another process built it while we waited
            return target
        if locked:  # no lock holder is writing, so leftovers are from crashed runs
            _remove_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            counts = _write_digits(tmp, int(seed), float(val_fraction))
            # The marker is written last: its presence in the renamed tree means "complete".
            (tmp / MARKER).write_text(json.dumps({**wanted, "counts": counts}, sort_keys=True))
            _publish(tmp, target, wanted)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op when it was moved into place
    return target


def is_complete(target: Path, wanted: dict) -> bool:
    """True if ``target`` holds a finished cache whose marker matches ``wanted``."""
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (all(marker.get(k) == v for k, v in wanted.items())
            and (target / "train").is_dir() and (target / "val").is_dir())


def _write_digits(out: Path, seed: int, val_fraction: float) -> dict[str, int]:
    """Write the stratified split as grey JPEGs under ``out``; return the split sizes."""
    # Imported here: scikit-learn is only needed the first time the cache is built.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 → 0..255; background stays 0 (black), ink is bright, as in MNIST.
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    labels = digits.target
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, random_state=seed, stratify=labels
    )
    counts = {}
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in sorted(int(j) for j in indices):
            class_dir = out / split / str(int(labels[i]))
            class_dir.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[i]).resize((SAVED_SIZE, SAVED_SIZE), Image.Resampling.BILINEAR)
            # File name = index in load_digits(), so the same seed gives the very same files.
            image.save(class_dir / f"{i:04d}.jpg", format="JPEG", quality=JPEG_QUALITY)
        counts[split] = len(indices)
    return counts


def _publish(tmp: Path, target: Path, wanted: dict) -> None:
    """Atomically move the finished tree ``tmp`` to ``target`` unless a complete one is there."""
    if is_complete(target, wanted):
        return  # someone else won the race; the caller deletes our copy
    if target.exists():
        # Stale (wrong seed/version, or not ours): move it aside first, since rename(2) cannot
        # replace a non-empty directory, then delete it once the new tree is in place.
        stale = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        os.replace(target, stale)
    else:
        stale = None
    try:
        os.replace(tmp, target)
    except OSError:
        # A writer that could not lock created the target between our check and the rename.
        if not is_complete(target, wanted):
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    """Delete temp/old trees of ``target`` left by interrupted runs (only called under the lock)."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False when locking is unsupported.

    The lock only saves duplicate work and lets us clean leftovers; correctness comes from the
    atomic rename, so file systems without flock (some Lustre/NFS mounts) still work.
    """
    if fcntl is None:
        yield False
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
