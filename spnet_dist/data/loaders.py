"""The one call the trainer makes: this rank's ``(train_loader, val_loader)`` from the data config.

Picks the backend (:func:`resolve_data_backend`), lets rank 0 alone prepare and scan the data
(the other ranks read its file list), builds the data sets and hands them to the torchvision
loaders (:mod:`~spnet_dist.data.torchvision_loader`) or the DALI loaders
(:mod:`~spnet_dist.data.dali`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from .. import distributed as D
from .dali import DaliEvalLoader, DaliRecipe, DaliTrainLoader, ReaderOptions, dali_available
from .datasets import JPEG_FOLDERS, build_datasets, build_test_dataset, prepared_root
from .folder import build_imagefolder, listing_of, read_listing, save_listing
from .protocol import Loader
from .torchvision_loader import build_eval_loader, build_train_loader
from .transforms import resolve_augment

BACKENDS = ("auto", "torchvision", "dali")


def resolve_data_backend(backend: str, data_format: str) -> str:
    """``data.backend`` -> ``"torchvision"`` or ``"dali"``.

    ``auto`` picks DALI for ``imagefolder`` (ImageNet-sized JPEGs, where decoding is the
    bottleneck) when it is installed, torchvision otherwise. ``digits`` is a JPEG folder too and
    runs on DALI when asked (``data.backend=dali``), but its 1,797 16-px images cost nothing to
    decode, so ``auto`` keeps the demo on torchvision. ``cifar`` always stays on torchvision: its
    images are raw uint8 arrays already in memory, so there is no JPEG to decode, which is where
    DALI's gain lies; feeding them through ``external_source`` would add a Python copy per batch
    and buy nothing.

    Raises:
        ValueError: naming ``data.backend`` (unknown value, DALI for cifar, DALI not installed).
    """
    if backend not in BACKENDS:
        raise ValueError(f"data.backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "dali" if data_format == "imagefolder" and dali_available() else "torchvision"
    if backend == "dali":
        if data_format not in JPEG_FOLDERS:
            raise ValueError(f"data.backend: 'dali' reads JPEG folders (imagefolder, digits); data.format="
                             f"{data_format!r} is held in memory as uint8 arrays (no JPEG to decode): use "
                             f"'torchvision' (or 'auto')")
        if not dali_available():
            raise ValueError("data.backend: 'dali' but nvidia.dali is not installed "
                             "(pip install nvidia-dali-cuda130); use 'torchvision' or 'auto'")
    return backend


def _shared_listing(data_cfg: Any, rank: int, listing_path: Optional[Path]) -> Optional[dict[str, Any]]:
    """Rank 0 scans the JPEG folders and saves the file list; the other ranks read it.

    Listing ImageNet's 1.28M files on a network file system costs minutes per rank; reading one
    JSON file costs a second. Any failure of rank 0's step (a missing split, an empty class
    folder, a train/val class mismatch, but also a folder it may not read or a stale NFS handle)
    reaches every rank through ``distributed.run_on_main``, so every rank raises the same
    one-line error instead of waiting for rank 0 in a collective. Rank 0 also writes the error
    into the listing instead of the file list, where it can: ranks simulated without a process
    group (the tests) read it there. Without ``listing_path`` every rank scans for itself.
    """
    if data_cfg.format not in JPEG_FOLDERS or listing_path is None:
        return None

    def scan() -> None:  # the digits cache is built on first use: by rank 0 only
        try:
            train, val = build_imagefolder(prepared_root(data_cfg))
            save_listing(listing_of(train, val), listing_path)
        except (FileNotFoundError, ValueError) as err:  # layout errors: read_listing re-raises them
            save_listing({"error": str(err), "type": type(err).__name__}, listing_path)
            raise

    D.run_on_main(scan, is_main=rank == 0, share=False, what=f"list the images of data.root={data_cfg.root!r}")
    return read_listing(listing_path, prepared_root(data_cfg))  # other ranks: the finished cache, at once


def reader_options(data_cfg: Any) -> ReaderOptions:
    """``data.dali_dont_use_mmap`` and ``data.dali_prefetch_queue_depth`` (defaults where absent)."""
    default = ReaderOptions()
    return ReaderOptions(dont_use_mmap=getattr(data_cfg, "dali_dont_use_mmap", default.dont_use_mmap),
                         prefetch_queue_depth=getattr(data_cfg, "dali_prefetch_queue_depth",
                                                      default.prefetch_queue_depth))


def build_loaders(data_cfg: Any, micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                  device: Optional[torch.device] = None, channels_last: bool = False,
                  listing_path: Optional[str | os.PathLike] = None, pin_memory: bool = False,
                  dali_device: str = "cpu") -> tuple[Loader, Loader]:
    """Build this rank's ``(train_loader, val_loader)`` with the configured backend.

    The one call the trainer makes. Rank 0 prepares the data (the digits cache) and scans the
    folders; the other ranks wait for its status (``distributed.run_on_main``) and read its saved
    file list (``listing_path``), so any failure of the scan stops every rank with the same
    one-line error before training.

    The device-dependent arguments are the rank's ``spnet_dist.device_profile.DeviceProfile``
    answers (the trainer resolves them once); ``data_cfg.dali_device`` is not read here.

    Args:
        data_cfg: ``spnet_dist.config.DataConfig`` (format, root, image_size, augment,
            num_workers, eval_batch_size, backend, on_corrupt, and the DALI reader's
            dali_dont_use_mmap, dali_prefetch_queue_depth).
        micro_batch_size: training samples per batch on this rank.
        rank: GLOBAL rank (shards must differ across nodes).
        world_size: data-parallel ranks.
        seed: run seed (order and augmentation).
        device: this rank's compute device; DALI ``gpu`` decodes on its index.
        channels_last: batches of both loaders, both backends, in NHWC memory, the layout the
            training step feeds the model (so it never converts them).
        listing_path: where rank 0 saves the file list (the run directory); None = every rank scans.
        pin_memory: page-locked torchvision batches (CUDA only).
        dali_device: ``"gpu"`` (``mixed`` decoding on ``device``) or ``"cpu"``, already resolved.
    """
    backend = resolve_data_backend(getattr(data_cfg, "backend", "torchvision"), data_cfg.format)
    on_corrupt = getattr(data_cfg, "on_corrupt", "error")
    listing = _shared_listing(data_cfg, rank, Path(listing_path) if listing_path is not None else None)
    train_set, val_set = build_datasets(data_cfg, listing)
    if backend == "torchvision":
        layout = dict(pin_memory=pin_memory, channels_last=channels_last)
        return (build_train_loader(train_set, micro_batch_size, rank, world_size, seed,
                                   data_cfg.num_workers, on_corrupt, **layout),
                build_eval_loader(val_set, data_cfg.eval_batch_size, rank, world_size,
                                  data_cfg.num_workers, on_corrupt, **layout))

    recipe = resolve_augment(data_cfg.augment, data_cfg.format)
    common = dict(num_threads=max(1, data_cfg.num_workers), dali_device=dali_device, device=device,
                  channels_last=channels_last, on_corrupt=on_corrupt, reader=reader_options(data_cfg))
    absolute = [(os.path.abspath(path), label) for path, label in train_set.samples]
    train = DaliTrainLoader(absolute, micro_batch_size, rank, world_size, seed,
                            DaliRecipe(recipe, data_cfg.image_size, True), **common)
    absolute = [(os.path.abspath(path), label) for path, label in val_set.samples]
    val = DaliEvalLoader(absolute, data_cfg.eval_batch_size, rank, world_size,
                         DaliRecipe(recipe, data_cfg.image_size, False), **common)
    return train, val


def build_test_loader(data_cfg: Any, rank: int = 0, world_size: int = 1) -> Optional[Loader]:
    """This rank's loader over the held-out test set (:func:`build_test_dataset`), or None.

    For the formats with a test set apart from the validation split (fashion_mnist: the official
    10,000 images) an evaluation loader like ``build_loaders``' validation loader: torchvision
    backend, ``data.eval_batch_size`` per batch, ``range(rank, N, world_size)``, every image
    once. None for the other formats. Evaluate it with the same code as the validation loader.

    Args:
        data_cfg: ``spnet_dist.config.DataConfig`` (format, root, image_size, augment,
            eval_batch_size, num_workers, on_corrupt).
        rank: GLOBAL rank.
        world_size: data-parallel ranks.
    """
    test_set = build_test_dataset(data_cfg)
    if test_set is None:
        return None
    return build_eval_loader(test_set, data_cfg.eval_batch_size, rank, world_size, data_cfg.num_workers,
                             getattr(data_cfg, "on_corrupt", "error"))
