"""The torchvision implementation of the :class:`~spnet_dist.data.protocol.Loader`: PIL decoding in DataLoader workers.

Order, shards and position come from :mod:`spnet_dist.data.sampling` (shared with the DALI
loaders). What this module adds: per-sample augmentation seeds, so a resumed run yields exactly
the batches (labels AND augmented pixels) an uninterrupted run would have yielded, whatever the
number of workers; and PIL's decoding errors handled per ``data.on_corrupt``.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from .protocol import CorruptImageError
from .sampling import (ShardedEvalLoader, ShardedTrainLoader, check_on_corrupt, corrupt_image_error, note_skipped,
                       sample_seed, worker_seed)


def path_of(dataset: Dataset, index: int) -> str:
    """The file of sample ``index`` (``samples`` of an ImageFolder), else ``"sample <index>"``."""
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
                raise corrupt_image_error([path_of(dataset, j)], str(err)) from None
            continue
        return image, label, (-1 if step == 0 else index)
    raise CorruptImageError(f"no decodable image at all in {type(dataset).__name__} ({n} files)")


def _replaced_paths(dataset: Dataset, bad: Tensor) -> list[str]:
    """The files of a batch's ``bad`` column (>= 0: the index of an undecodable file)."""
    return [path_of(dataset, index) for index in bad[bad >= 0].tolist()]


class _Collate:
    """``default_collate``; with ``channels_last`` the images are written straight into an NHWC batch.

    The batch is then in the layout the model's input wants (``DeviceProfile.channels_last``), so the
    training step never converts it: on CUDA its host-to-device copy is one contiguous memcpy. The
    one copy per sample is the one ``torch.stack`` would make; in a worker the batch goes into
    shared memory, as ``default_collate`` does, so it reaches the main process without another.
    """

    def __init__(self, channels_last: bool) -> None:
        self.channels_last = channels_last

    def __call__(self, samples: list) -> Any:
        first = samples[0][0]
        if not (self.channels_last and isinstance(first, Tensor) and first.dim() == 3):
            return default_collate(samples)
        c, h, w = first.shape
        shape, strides = (len(samples), c, h, w), (h * w * c, 1, w * c, c)  # NCHW sizes, NHWC memory
        if get_worker_info() is not None:
            storage = first.untyped_storage()._new_shared(len(samples) * first.numel() * first.element_size())
            images = first.new_empty(0).set_(storage, 0, shape, strides)
        else:
            images = torch.empty_strided(shape, strides, dtype=first.dtype)
        for i, sample in enumerate(samples):
            images[i].copy_(sample[0])
        return (images, *default_collate([sample[1:] for sample in samples]))


def _data_loader(dataset: Dataset, batch_size: int, sampler: Any, num_workers: int, drop_last: bool,
                 generator: Optional[torch.Generator] = None, pin_memory: bool = False,
                 channels_last: bool = False) -> DataLoader:
    """A DataLoader over ``sampler``'s order; workers persist across epochs (no restart per epoch).

    ``pin_memory`` and ``channels_last`` are the rank's ``DeviceProfile`` answers (page-locked
    batches for asynchronous copies to the GPU; ``Tensor.pin_memory`` keeps the NHWC strides).
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory, generator=generator,
                      collate_fn=_Collate(channels_last))


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
        generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return load_checked(self.dataset, index, self.on_corrupt)
        finally:
            generator.set_state(saved)


class _EpochKeys(Sampler):
    """``(epoch, index)`` keys of the indices left in the epoch, for :class:`_SeededSamples`.

    Skipping happens on the index list, so the batches consumed before a resume are never
    loaded or decoded again.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.indices: Sequence[int] = ()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices:
            yield self.epoch, index

    def __len__(self) -> int:
        return len(self.indices)


class TrainLoader(ShardedTrainLoader):
    """Sharded, reshuffled-per-epoch, exactly resumable training batches for one rank.

    Implements :class:`~spnet_dist.data.protocol.Loader`; order and position semantics:
    :class:`~spnet_dist.data.sampling.ShardedTrainLoader`.

    Args:
        dataset: map-style dataset returning ``(image_tensor, label)``.
        micro_batch_size: samples per batch on this rank.
        rank: global rank (not the local rank: shards must differ across nodes).
        world_size: number of data-parallel ranks.
        seed: shuffling and augmentation seed, identical on every rank.
        num_workers: DataLoader worker processes (persistent when > 0).
        on_corrupt: ``"error"`` (stop, naming the file) or ``"skip"`` (replace an undecodable
            file by the next decodable one, report and count it in ``skipped``).
        pin_memory: page-locked batches (``DeviceProfile.pin_memory_now``).
        channels_last: batches in NHWC memory (``DeviceProfile.channels_last``).
    """

    def __init__(self, dataset: Dataset, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, on_corrupt: str = "error", pin_memory: bool = False,
                 channels_last: bool = False) -> None:
        check_on_corrupt(on_corrupt)
        super().__init__(len(dataset), micro_batch_size, rank, world_size, seed)
        self.dataset = dataset
        self._samples = _SeededSamples(dataset, self.seed, on_corrupt)
        self._keys = _EpochKeys()
        # Re-seeded per epoch in __iter__: worker base seeds are then a function of
        # (seed, epoch, rank), not of how many epochs this process happened to run.
        self._generator = torch.Generator()
        self._loader = _data_loader(self._samples, self.batch_size, self._keys, num_workers, drop_last=True,
                                    generator=self._generator, pin_memory=pin_memory, channels_last=channels_last)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        self._keys.epoch = epoch
        self._keys.indices = self.epoch_indices(epoch)[self.batches_seen * self.batch_size:]
        self._generator.manual_seed(worker_seed(self.seed, epoch, self.rank))
        for images, labels, bad in self._loader:
            self.batches_seen += 1
            note_skipped(_replaced_paths(self.dataset, bad), self.skipped, self.rank)
            yield images, labels
        self.finish_epoch(epoch)

    def restore_position(self, state: dict[str, Any]) -> bool:
        same = super().restore_position(state)
        self._samples.seed = self.seed
        return same


def build_train_loader(dataset: Dataset, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                       seed: int = 0, num_workers: int = 0, on_corrupt: str = "error", pin_memory: bool = False,
                       channels_last: bool = False) -> TrainLoader:
    """Build the training :class:`~spnet_dist.data.protocol.Loader` of one rank.

    Args: see :class:`TrainLoader`.
    """
    return TrainLoader(dataset, micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                       num_workers=num_workers, on_corrupt=on_corrupt, pin_memory=pin_memory,
                       channels_last=channels_last)


class _CheckedSamples(Dataset):
    """``dataset`` with :func:`load_checked` per sample (the eval loader's wrapper)."""

    def __init__(self, dataset: Dataset, on_corrupt: str) -> None:
        self.dataset, self.on_corrupt = dataset, on_corrupt

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return load_checked(self.dataset, index, self.on_corrupt)


class EvalLoader(ShardedEvalLoader):
    """This rank's strided, unpadded share of an evaluation set, in a fixed order.

    Implements :class:`~spnet_dist.data.protocol.Loader`; shard and attributes:
    :class:`~spnet_dist.data.sampling.ShardedEvalLoader`.

    Args:
        dataset: map-style dataset returning ``(image_tensor, label)``.
        batch_size: samples per batch (the last batch may be smaller).
        rank: global rank.
        world_size: number of ranks.
        num_workers: DataLoader worker processes (persistent when > 0).
        on_corrupt: ``"error"`` or ``"skip"`` (an undecodable image is left out of the batch,
            reported and counted in ``skipped``).
        pin_memory, channels_last: as in :class:`TrainLoader`.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, on_corrupt: str = "error", pin_memory: bool = False,
                 channels_last: bool = False) -> None:
        check_on_corrupt(on_corrupt)
        super().__init__(len(dataset), batch_size, rank, world_size)
        self.dataset = dataset
        self._loader = _data_loader(_CheckedSamples(dataset, on_corrupt), self.batch_size, self.indices, num_workers,
                                    drop_last=False, pin_memory=pin_memory, channels_last=channels_last)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels, bad in self._loader:
            if (bad >= 0).any():  # rare: drop the stand-ins of undecodable images
                note_skipped(_replaced_paths(self.dataset, bad), self.skipped, self.rank)
                keep = bad < 0
                images, labels = images[keep], labels[keep]
                if len(labels) == 0:
                    continue
            yield images, labels


def build_eval_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 0, on_corrupt: str = "error", pin_memory: bool = False,
                      channels_last: bool = False) -> EvalLoader:
    """Build the evaluation :class:`~spnet_dist.data.protocol.Loader` of one rank.

    Args: see :class:`EvalLoader`.
    """
    return EvalLoader(dataset, batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                      on_corrupt=on_corrupt, pin_memory=pin_memory, channels_last=channels_last)
