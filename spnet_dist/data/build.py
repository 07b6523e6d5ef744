"""Datasets and the torchvision implementation of the :class:`~spnet_dist.data.protocol.Loader`.

Train: ``DistributedSampler`` shards (drop_last, reshuffled per epoch from ``seed + epoch``), a
resumable batch position, and per-sample augmentation seeds, so a resumed run yields exactly the
batches (labels AND augmented pixels) an uninterrupted run would have yielded.

Eval: strided shards ``range(rank, N, world_size)`` without padding, so every validation image
is counted exactly once across ranks; the evaluation code all-reduces sums, not means.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .cifar import CifarDataset
from .digits import prepare_digits
from .folder import build_imagefolder
from .transforms import build_transform, resolve_augment

DATA_FORMATS = ("imagefolder", "cifar", "digits")
DEFAULT_DIGITS_ROOT = "~/.cache/spnet_dist/digits"

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

def build_datasets(data_cfg: Any) -> tuple[Dataset, Dataset]:
    """Build ``(train_dataset, val_dataset)`` with their transforms from a data config.

    Args:
        data_cfg: any object with attributes ``format`` (``"imagefolder"``, ``"cifar"``,
            ``"digits"``), ``root`` (path; optional for digits), ``image_size`` and ``augment``
            (``"auto"`` or a recipe in :data:`spnet_dist.data.transforms.AUGMENTS`); normally
            ``spnet_dist.config.DataConfig``.

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
        return build_imagefolder(prepare_digits(root or DEFAULT_DIGITS_ROOT), train_tf, val_tf)
    if not root:
        raise ValueError(f"data.root is required for data.format={fmt!r}")
    if fmt == "imagefolder":
        return build_imagefolder(root, train_tf, val_tf)
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

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        generator = torch.default_generator
        saved = generator.get_state()
        # Generator.manual_seed, not torch.manual_seed: the latter also re-seeds every
        # accelerator and costs ~100x more per sample.
        generator.manual_seed(mix_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)


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
    """

    def __init__(self, dataset: Dataset, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0) -> None:
        _check_rank(rank, world_size)
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

        # drop_last: every rank gets the same number of samples without repeating any.
        self.shard = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                        shuffle=True, seed=seed, drop_last=True)
        if len(self.shard) < self.batch_size:
            raise ValueError(
                f"train set too small: {len(dataset)} samples over {world_size} rank(s) gives "
                f"{len(self.shard)} per rank, fewer than micro_batch_size={micro_batch_size}"
            )
        self._samples = _SeededSamples(dataset, self.seed)
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
        for images, labels in self._loader:
            self.batches_seen += 1
            yield images, labels
        if self.epoch == epoch:  # not moved by set_epoch/load_state_dict during iteration
            self.epoch, self.batches_seen = epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next ``__iter__``; a new epoch starts at its first batch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self.batches_seen = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        """This rank's reader position; the geometry keys let a resize of the job resume."""
        return {
            "epoch": self.epoch,
            "batches_seen": self.batches_seen,
            "seed": self.seed,
            "world_size": self.world_size,
            "micro_batch_size": self.batch_size,
            "dataset_size": len(self.dataset),
        }

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


def build_train_loader(dataset: Dataset, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                       seed: int = 0, num_workers: int = 0) -> TrainLoader:
    """Build the training :class:`~spnet_dist.data.protocol.Loader` of one rank.

    Args: see :class:`TrainLoader`.
    """
    return TrainLoader(dataset, micro_batch_size, rank=rank, world_size=world_size,
                       seed=seed, num_workers=num_workers)


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

    Attributes:
        indices: the dataset indices this rank reads, in order.
        num_samples: ``len(indices)``.
        dataset_size: ``len(dataset)``, the total every rank's counts must sum to.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.dataset_size = len(dataset)
        # Not DistributedSampler: it pads shards to equal length by repeating images.
        self.indices = range(rank, self.dataset_size, world_size)
        self.num_samples = len(self.indices)
        self._loader = DataLoader(
            dataset,
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
        return iter(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """No-op: the evaluation order never changes."""

    def state_dict(self) -> dict[str, Any]:
        """Empty: an evaluation pass is never resumed mid-way."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accepts the (empty) state of :meth:`state_dict`."""


def build_eval_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 0) -> EvalLoader:
    """Build the evaluation :class:`~spnet_dist.data.protocol.Loader` of one rank.

    Args: see :class:`EvalLoader`.
    """
    return EvalLoader(dataset, batch_size, rank=rank, world_size=world_size, num_workers=num_workers)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
