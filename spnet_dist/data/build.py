"""Datasets and the torchvision implementation of the :class:`~spnet_dist.data.protocol.Loader`.

Train: ``DistributedSampler`` shards (drop_last, reshuffled per epoch from ``seed + epoch``), a
resumable batch position, and per-sample augmentation seeds, so a resumed run yields exactly the
batches (labels AND augmented pixels) an uninterrupted run would have yielded.

Eval: strided shards ``range(rank, N, world_size)`` without padding, so every validation image
is counted exactly once across ranks; the evaluation code all-reduces sums, not means.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .cifar import CifarDataset
from .digits import prepare_digits
from .folder import build_imagefolder, listing_of, read_listing, save_listing
from .protocol import ON_CORRUPT, CorruptImageError, Loader
from .transforms import build_transform, resolve_augment

DATA_FORMATS = ("imagefolder", "cifar", "digits")
DEFAULT_DIGITS_ROOT = "~/.cache/spnet_dist/digits"
BACKENDS = ("auto", "torchvision", "dali")

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Hash non-negative ints into one 64-bit seed (splitmix64 finaliser over a running sum).

    Neighbouring inputs (epoch 3 vs 4, index 10 vs 11) give unrelated seeds, and it costs well
    under a microsecond, which matters because it runs once per sample.
    """
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & _MASK64
        x ^= x >> 29
    return x


# ----------------------------------------------------------------------------- datasets

def build_datasets(data_cfg: Any, listing: Optional[dict[str, Any]] = None) -> tuple[Dataset, Dataset]:
    """Build ``(train_dataset, val_dataset)`` with their transforms from a data config.

    Args:
        data_cfg: any object with attributes ``format`` (``"imagefolder"``, ``"cifar"``,
            ``"digits"``), ``root`` (path; optional for digits), ``image_size`` and ``augment``
            (``"auto"`` or a recipe in :data:`spnet_dist.data.transforms.AUGMENTS`); normally
            ``spnet_dist.config.DataConfig``.
        listing: for ``imagefolder`` / ``digits``, a file list saved by rank 0
            (:func:`spnet_dist.data.folder.save_listing`); the folders are then not scanned.

    Raises:
        ValueError: unknown ``data.format`` / ``data.augment``, or missing ``data.root``.
        FileNotFoundError: the data is not where ``data.root`` says.
    """
    fmt = data_cfg.format
    if fmt not in DATA_FORMATS:
        raise ValueError(f"data.format must be one of {list(DATA_FORMATS)}, got {fmt!r}")
    recipe = resolve_augment(data_cfg.augment, fmt)
    train_tf = build_transform(recipe, data_cfg.image_size, train=True)
    val_tf = build_transform(recipe, data_cfg.image_size, train=False)
    root = getattr(data_cfg, "root", None)

    if fmt == "digits":
        # Rank-0-first is the caller's job; prepare_digits is atomic and idempotent regardless.
        return build_imagefolder(prepare_digits(root or DEFAULT_DIGITS_ROOT), train_tf, val_tf, listing)
    if not root:
        raise ValueError(f"data.root is required for data.format={fmt!r}")
    if fmt == "imagefolder":
        return build_imagefolder(root, train_tf, val_tf, listing)
    return CifarDataset(root, train=True, transform=train_tf), CifarDataset(root, train=False, transform=val_tf)


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


# ----------------------------------------------------------------------------- train loader

class _SeededSamples(Dataset):
    """Wraps a dataset so sample ``(epoch, index)`` is augmented with its own fixed seed.

    Random transforms draw from torch's default CPU generator; seeding it per sample from
    ``(seed, epoch, index)`` makes the augmented pixels a function of the sample alone, not of
    the worker that decodes it or of how many samples that worker decoded before. That is what
    lets a resumed run (or one with a different ``num_workers``) reproduce the same tensors.
    The generator's previous state is restored, so with ``num_workers=0`` the training
    process's own RNG stream (Gumbel noise, dropout) is left untouched.
    """

    def __init__(self, dataset: Dataset, seed: int, on_corrupt: str = "error") -> None:
        self.dataset = dataset
        self.seed = seed
        self.on_corrupt = on_corrupt

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        """``(image, label, bad)``: ``bad`` is -1, or the index of an undecodable file replaced."""
        epoch, index = key
        generator = torch.default_generator
        saved = generator.get_state()
        # Generator.manual_seed, not torch.manual_seed: the latter also re-seeds every
        # accelerator and costs ~100x more per sample.
        generator.manual_seed(mix_seed(self.seed, epoch, index))
        try:
            return load_checked(self.dataset, index, self.on_corrupt)
        finally:
            generator.set_state(saved)


def _path_of(dataset: Dataset, index: int) -> str:
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples is not None else f"sample {index}"


def load_checked(dataset: Dataset, index: int, on_corrupt: str) -> tuple[Any, Any, int]:
    """``dataset[index]`` as ``(image, label, -1)``, or per ``on_corrupt`` when it cannot be decoded.

    ``error`` raises :class:`CorruptImageError` naming the file; ``skip`` returns the next
    decodable sample (index + 1, + 2, ...) with ``bad = index`` so the loader counts and reports
    it and batches stay full. PIL raises OSError for unreadable and truncated files
    (``UnidentifiedImageError`` is one), ValueError/SyntaxError for some malformed headers.
    """
    n = len(dataset)
    for step in range(n):
        j = (index + step) % n
        try:
            image, label = dataset[j]
        except (OSError, ValueError, SyntaxError) as err:
            if on_corrupt == "error":
                path = _path_of(dataset, j)
                raise CorruptImageError(
                    f"cannot decode {path}: {err} (data.on_corrupt=error; set data.on_corrupt=skip "
                    f"to skip and count undecodable files)", [path]) from None
            continue
        return image, label, (-1 if step == 0 else index)
    raise CorruptImageError(f"no decodable image at all in {type(dataset).__name__} ({n} files)")


class _ShardFromPosition(Sampler):
    """This rank's ``DistributedSampler`` order for the current epoch, from a sample offset.

    Skipping happens on the index list, so the batches consumed before a resume are never
    loaded or decoded again. Yields ``(epoch, index)`` keys for :class:`_SeededSamples`.
    """

    def __init__(self, shard: DistributedSampler) -> None:
        self.shard = shard
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.shard.epoch
        for index in list(self.shard)[self.start:]:
            yield epoch, index

    def __len__(self) -> int:
        return max(len(self.shard) - self.start, 0)


class TrainLoader:
    """Sharded, reshuffled-per-epoch, exactly resumable training batches for one rank.

    Implements :class:`~spnet_dist.data.protocol.Loader`. Position = ``(epoch, batches_seen)``:
    iterating increments ``batches_seen``; finishing an epoch advances ``epoch`` and resets
    ``batches_seen`` to 0. Breaking out of the loop mid-epoch keeps the position, so the next
    ``__iter__`` continues where it stopped. ``set_epoch`` with a different epoch starts that
    epoch from its first batch; with the current epoch it keeps the position (so
    ``load_state_dict`` followed by the trainer's usual ``set_epoch(epoch)`` still resumes).

    Args:
        dataset: map-style dataset returning ``(image_tensor, label)``.
        micro_batch_size: samples per batch on this rank.
        rank: global rank (not the local rank: shards must differ across nodes).
        world_size: number of data-parallel ranks.
        seed: shuffling and augmentation seed, identical on every rank.
        num_workers: DataLoader worker processes (persistent when > 0).
        on_corrupt: ``"error"`` (stop, naming the file) or ``"skip"`` (replace an undecodable
            file by the next decodable one, report and count it in ``skipped``).
    """

    def __init__(self, dataset: Dataset, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, on_corrupt: str = "error") -> None:
        _check_rank(rank, world_size)
        _check_on_corrupt(on_corrupt)
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.batch_size = int(micro_batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.epoch = 0
        self.batches_seen = 0
        self.skipped: list[str] = []  # undecodable files met by this rank (on_corrupt=skip)

        # drop_last: every rank gets the same number of samples without repeating any.
        self.shard = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                        shuffle=True, seed=seed, drop_last=True)
        if len(self.shard) < self.batch_size:
            raise ValueError(
                f"train set too small: {len(dataset)} samples over {world_size} rank(s) gives "
                f"{len(self.shard)} per rank, fewer than micro_batch_size={micro_batch_size}"
            )
        self._samples = _SeededSamples(dataset, self.seed, on_corrupt)
        self._position = _ShardFromPosition(self.shard)
        # Re-seeded per epoch in __iter__: worker base seeds are then a function of
        # (seed, epoch, rank), not of how many epochs this process happened to run.
        self._generator = torch.Generator()
        self._loader = DataLoader(
            self._samples,
            batch_size=self.batch_size,
            sampler=self._position,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=self._generator,
        )

    def __len__(self) -> int:
        return len(self.shard) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        self.shard.set_epoch(epoch)
        self._position.start = self.batches_seen * self.batch_size
        self._generator.manual_seed(mix_seed(self.seed, epoch, self.rank))
        for images, labels, bad in self._loader:
            self.batches_seen += 1
            _note_skipped(self.dataset, bad, self.skipped, self.rank)
            yield images, labels
        if self.epoch == epoch:  # not moved by set_epoch/load_state_dict during iteration
            self.epoch, self.batches_seen = epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next ``__iter__``; a new epoch starts at its first batch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self.batches_seen = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """This rank's reader position; the geometry keys let a resize of the job resume."""
        return position_state(self, len(self.dataset))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position so the next ``__iter__`` skips the batches already consumed.

        With the same world size and micro-batch size the continuation is exact. If they
        changed, the position is converted through the global sample count: all ranks together
        consumed the first ``batches_seen * micro_batch_size * world_size`` entries of the
        epoch's global permutation (which depends only on seed and epoch), so the new geometry
        skips that prefix, rounded down to whole batches (a few samples may repeat, none are
        skipped).
        """
        missing = {"epoch", "batches_seen", "seed"} - set(state)
        if missing:
            raise ValueError(f"train loader state lacks {sorted(missing)}: got {sorted(state)}")
        self.seed = int(state["seed"])
        self.shard.seed = self.seed
        self._samples.seed = self.seed
        self.skipped = list(state.get("skipped", []))
        self.epoch = int(state["epoch"])
        seen = int(state["batches_seen"])
        old_world = int(state.get("world_size", self.world_size))
        old_batch = int(state.get("micro_batch_size", self.batch_size))
        if (old_world, old_batch) != (self.world_size, self.batch_size):
            seen = seen * old_batch * old_world // (self.batch_size * self.world_size)
        size = state.get("dataset_size")
        if size is not None and int(size) != len(self.dataset):
            warnings.warn(
                f"train set changed size since the checkpoint ({size} → {len(self.dataset)}): "
                f"the resumed epoch's order differs from the interrupted one",
                stacklevel=2,
            )
        self.batches_seen = min(seen, len(self))


def position_state(loader: Any, dataset_size: int) -> dict[str, Any]:
    """The position keys both train loaders save (and both accept in ``load_state_dict``)."""
    return {
        "epoch": loader.epoch,
        "batches_seen": loader.batches_seen,
        "seed": loader.seed,
        "world_size": loader.world_size,
        "micro_batch_size": loader.batch_size,
        "dataset_size": dataset_size,
        "skipped": list(loader.skipped),
    }


def build_train_loader(dataset: Dataset, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                       seed: int = 0, num_workers: int = 0, on_corrupt: str = "error") -> TrainLoader:
    """Build the training :class:`~spnet_dist.data.protocol.Loader` of one rank.

    Args: see :class:`TrainLoader`.
    """
    return TrainLoader(dataset, micro_batch_size, rank=rank, world_size=world_size,
                       seed=seed, num_workers=num_workers, on_corrupt=on_corrupt)


def _note_skipped(dataset: Dataset, bad: Tensor, skipped: list[str], rank: int) -> None:
    """Report and remember the undecodable files a batch replaced (``bad`` >= 0)."""
    for index in bad[bad >= 0].tolist():
        path = _path_of(dataset, index)
        if path not in skipped:
            log.warning("rank %d: skipping undecodable image %s", rank, path)
            skipped.append(path)


class _CheckedSamples(Dataset):
    """``dataset`` with :func:`load_checked` per sample (the eval loader's wrapper)."""

    def __init__(self, dataset: Dataset, on_corrupt: str) -> None:
        self.dataset, self.on_corrupt = dataset, on_corrupt

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return load_checked(self.dataset, index, self.on_corrupt)


# ----------------------------------------------------------------------------- eval loader

class EvalLoader:
    """This rank's strided, unpadded share of an evaluation set, in a fixed order.

    Implements :class:`~spnet_dist.data.protocol.Loader` (``set_epoch`` is a no-op and the state
    is empty: evaluation always runs a whole pass). Rank ``r`` reads indices
    ``range(r, N, world_size)``: every image exactly once across ranks, so ranks may hold
    different numbers of images (and batches; possibly zero when ``N < world_size``). Strided
    rather than contiguous so that each rank sees every class of a class-sorted folder.

    Args:
        dataset: map-style dataset returning ``(image_tensor, label)``.
        batch_size: samples per batch (the last batch may be smaller).
        rank: global rank.
        world_size: number of ranks.
        num_workers: DataLoader worker processes (persistent when > 0).
        on_corrupt: ``"error"`` or ``"skip"`` (an undecodable image is left out of the batch,
            reported and counted in ``skipped``).

    Attributes:
        indices: the dataset indices this rank reads, in order.
        num_samples: ``len(indices)``.
        dataset_size: ``len(dataset)``, the total every rank's counts must sum to.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, on_corrupt: str = "error") -> None:
        _check_rank(rank, world_size)
        _check_on_corrupt(on_corrupt)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.rank = rank
        self.skipped: list[str] = []
        self.batch_size = int(batch_size)
        self.dataset_size = len(dataset)
        # Not DistributedSampler: it pads shards to equal length by repeating images.
        self.indices = range(rank, self.dataset_size, world_size)
        self.num_samples = len(self.indices)
        self._loader = DataLoader(
            _CheckedSamples(dataset, on_corrupt),
            batch_size=self.batch_size,
            sampler=self.indices,
            drop_last=False,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels, bad in self._loader:
            if (bad >= 0).any():  # rare: drop the stand-ins of undecodable images
                _note_skipped(self.dataset, bad, self.skipped, self.rank)
                keep = bad < 0
                images, labels = images[keep], labels[keep]
                if len(labels) == 0:
                    continue
            yield images, labels

    def set_epoch(self, epoch: int) -> None:
        """No-op: the evaluation order never changes."""

    def state_dict(self) -> dict[str, Any]:
        """Empty: an evaluation pass is never resumed mid-way."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accepts the (empty) state of :meth:`state_dict`."""


def build_eval_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 0, on_corrupt: str = "error") -> EvalLoader:
    """Build the evaluation :class:`~spnet_dist.data.protocol.Loader` of one rank.

    Args: see :class:`EvalLoader`.
    """
    return EvalLoader(dataset, batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                      on_corrupt=on_corrupt)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"data.on_corrupt must be one of {list(ON_CORRUPT)}, got {on_corrupt!r}")


# ----------------------------------------------------------------------------- both backends

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
    from .dali import dali_available

    if backend not in BACKENDS:
        raise ValueError(f"data.backend must be one of {list(BACKENDS)}, got {backend!r}")
    jpeg_folders = data_format in ("imagefolder", "digits")
    if backend == "auto":
        return "dali" if data_format == "imagefolder" and dali_available() else "torchvision"
    if backend == "dali":
        if not jpeg_folders:
            raise ValueError(f"data.backend: 'dali' reads JPEG folders (imagefolder, digits); "
                             f"data.format={data_format!r} uses 'torchvision' (or 'auto')")
        if not dali_available():
            raise ValueError("data.backend: 'dali' but nvidia.dali is not installed "
                             "(pip install nvidia-dali-cuda130); use 'torchvision' or 'auto'")
    return backend


def _shared_listing(data_cfg: Any, rank: int, listing_path: Optional[Path]) -> Optional[dict[str, Any]]:
    """Rank 0 scans the JPEG folders and saves the file list; the other ranks read it.

    Listing ImageNet's 1.28M files on a network file system costs minutes per rank; reading one
    JSON file costs a second. A scan error (missing split, empty class folder, train/val class
    mismatch) is saved instead of the list, so every rank raises the same one-line error rather
    than waiting at the barrier. Without ``listing_path`` every rank scans for itself.
    """
    from .. import distributed as D

    if data_cfg.format not in ("imagefolder", "digits") or listing_path is None:
        return None

    def prepared_root() -> Path:  # the digits cache is built on first use: by rank 0 only
        if data_cfg.format == "digits":
            return prepare_digits(data_cfg.root or DEFAULT_DIGITS_ROOT)
        return Path(data_cfg.root)

    error: Optional[Exception] = None
    if rank == 0:
        try:
            train, val = build_imagefolder(prepared_root())
            save_listing(listing_of(train, val), listing_path)
        except (FileNotFoundError, ValueError) as err:
            error = err
            save_listing({"error": str(err), "type": type(err).__name__}, listing_path)
    D.barrier()
    if error is not None:
        raise error
    return read_listing(listing_path, prepared_root())  # other ranks: the finished cache, at once


def build_loaders(data_cfg: Any, micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                  device: Optional[torch.device] = None, channels_last: bool = False,
                  listing_path: Optional[str | os.PathLike] = None) -> tuple[Loader, Loader]:
    """Build this rank's ``(train_loader, val_loader)`` with the configured backend.

    The one call the trainer makes. Rank 0 prepares the data (the digits cache) and scans the
    folders; the other ranks wait at a barrier and read its saved file list (``listing_path``),
    so a bad layout stops every rank with the same one-line error before training.

    Args:
        data_cfg: ``spnet_dist.config.DataConfig`` (format, root, image_size, augment,
            num_workers, eval_batch_size, backend, dali_device, on_corrupt).
        micro_batch_size: training samples per batch on this rank.
        rank: GLOBAL rank (shards must differ across nodes).
        world_size: data-parallel ranks.
        seed: run seed (order and augmentation).
        device: this rank's compute device; ``cuda:i`` lets ``dali_device=auto`` decode on GPU i.
        channels_last: DALI GPU batches in channels-last memory (``engine.channels_last``).
        listing_path: where rank 0 saves the file list (the run directory); None = every rank scans.
    """
    backend = resolve_data_backend(getattr(data_cfg, "backend", "torchvision"), data_cfg.format)
    on_corrupt = getattr(data_cfg, "on_corrupt", "error")
    listing = _shared_listing(data_cfg, rank, Path(listing_path) if listing_path is not None else None)
    train_set, val_set = build_datasets(data_cfg, listing)
    if backend == "torchvision":
        return (build_train_loader(train_set, micro_batch_size, rank, world_size, seed,
                                   data_cfg.num_workers, on_corrupt),
                build_eval_loader(val_set, data_cfg.eval_batch_size, rank, world_size,
                                  data_cfg.num_workers, on_corrupt))

    from .dali import DaliEvalLoader, DaliRecipe, DaliTrainLoader, resolve_dali_device

    dali_device = resolve_dali_device(getattr(data_cfg, "dali_device", "auto"), device)
    recipe = resolve_augment(data_cfg.augment, data_cfg.format)
    common = dict(num_threads=max(1, data_cfg.num_workers), dali_device=dali_device, device=device,
                  channels_last=channels_last, on_corrupt=on_corrupt)
    absolute = [(os.path.abspath(path), label) for path, label in train_set.samples]
    train = DaliTrainLoader(absolute, micro_batch_size, rank, world_size, seed,
                            DaliRecipe(recipe, data_cfg.image_size, True), **common)
    absolute = [(os.path.abspath(path), label) for path, label in val_set.samples]
    val = DaliEvalLoader(absolute, data_cfg.eval_batch_size, rank, world_size,
                         DaliRecipe(recipe, data_cfg.image_size, False), **common)
    return train, val
