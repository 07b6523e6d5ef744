"""Which samples each rank reads, in which order, and where it stands: the one owner of these rules.

Both backends (:mod:`~spnet_dist.data.torchvision_loader` and :mod:`~spnet_dist.data.dali`) build
their loaders on the two bases here, so they read the same samples in the same order on the same
rank, save the same position and convert it the same way when the job's geometry changes.

- **Training order.** Epoch ``e`` on rank ``r`` is the permutation of
  ``DistributedSampler(N, world, r, shuffle=True, seed, drop_last=True)`` after ``set_epoch(e)``,
  cut to whole batches: every rank yields ``⌊⌊N/world⌋/B⌋`` full batches and the shards are
  disjoint. ``r`` is the GLOBAL rank: sharding by the local rank would repeat the same shards on
  every node.
- **Validation order.** Rank ``r`` reads ``range(r, N, world)``: every image exactly once, no
  padding, every class of a class-sorted folder on every rank.
- **Position.** ``(epoch, batches_seen)`` plus the undecodable files met, saved as JSON with the
  geometry (world size, micro-batch, data set size). Restored into another geometry, the position
  goes through the global sample count (the epoch's permutation depends only on seed and epoch).
- **Seeds.** Every seed a loader derives (per-sample augmentation, DataLoader workers, DALI
  segments) is :func:`mix_seed` of the run seed and the numbers that identify it.
"""
from __future__ import annotations

import logging
from typing import AbstractSet, Any, Iterable, Sequence

from torch.utils.data import DistributedSampler

from .protocol import ON_CORRUPT, CorruptImageError

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
POSITION_KEYS = ("epoch", "batches_seen", "seed")  # the keys a saved position must have


# ----------------------------------------------------------------------------- seeds

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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of sample ``index`` in ``epoch`` (torchvision backend, one per sample)."""
    return mix_seed(seed, epoch, index)


def worker_seed(seed: int, epoch: int, rank: int) -> int:
    """Base seed of a rank's DataLoader workers in ``epoch``: a function of the run, not the process."""
    return mix_seed(seed, epoch, rank)


def segment_seed(seed: int, rank: int, epoch: int, start: int) -> int:
    """Seed of the DALI pipeline that reads ``epoch`` from batch ``start`` on ``rank`` (31 bits: DALI's range)."""
    return mix_seed(seed, rank, epoch, start) & 0x7FFFFFFF


# ----------------------------------------------------------------------------- argument checks

def check_rank(rank: int, world_size: int) -> None:
    """Raises ValueError unless ``0 <= rank < world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def check_batch_size(name: str, value: int) -> None:
    """Raises ValueError naming ``name`` unless ``value >= 1``."""
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_on_corrupt(on_corrupt: str) -> None:
    """Raises ValueError naming ``data.on_corrupt`` unless it is one of :data:`ON_CORRUPT`."""
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"data.on_corrupt must be one of {list(ON_CORRUPT)}, got {on_corrupt!r}")


# ----------------------------------------------------------------------------- bad data

def corrupt_image_error(paths: Sequence[str], reason: str = "") -> CorruptImageError:
    """The one-line error that stops a run at undecodable files (``data.on_corrupt=error``), naming the first."""
    detail = f": {reason}" if reason else ""
    return CorruptImageError(f"cannot decode {paths[0]}{detail} (data.on_corrupt=error; set data.on_corrupt=skip "
                             f"to skip and count undecodable files)", paths)


def note_skipped(paths: Iterable[str], skipped: list[str], rank: int) -> None:
    """Report and remember undecodable files (``data.on_corrupt=skip``), each once per rank."""
    for path in paths:
        if path not in skipped:
            log.warning("rank %d: skipping undecodable image %s", rank, path)
            skipped.append(path)


# ----------------------------------------------------------------------------- position

def converted_batches_seen(batches_seen: int, old_world: int, old_batch: int, world: int, batch: int) -> int:
    """Batches per rank a new geometry skips after a resume: the samples already consumed.

    All ranks together consumed the first ``batches_seen * old_batch * old_world`` entries of the
    epoch's global permutation; the new geometry skips that prefix, rounded down to whole batches
    (a few samples may repeat, none are skipped).
    """
    return batches_seen * old_batch * old_world // (batch * world)


class ShardedTrainLoader:
    """Order, shard and resumable position of one rank's training batches (base of both backends).

    A subclass implements ``__iter__``: it reads ``epoch_indices(self.epoch)`` from batch
    ``batches_seen``, increments ``batches_seen`` per batch yielded and calls
    ``finish_epoch(epoch)`` after the last one. Position semantics: breaking out of the loop
    mid-epoch keeps the position, so the next ``__iter__`` continues where it stopped;
    ``set_epoch`` with a different epoch starts that epoch from its first batch, with the current
    epoch it keeps the position (so ``load_state_dict`` followed by the trainer's usual
    ``set_epoch(epoch)`` still resumes).

    Args:
        dataset_size: number of training samples.
        micro_batch_size: samples per batch on this rank.
        rank: GLOBAL rank (not the local rank: shards must differ across nodes).
        world_size: number of data-parallel ranks.
        seed: shuffling (and augmentation) seed, identical on every rank.

    Attributes:
        epoch, batches_seen: the position; ``skipped``: undecodable files met by this rank
            (``data.on_corrupt=skip``), saved with the position so a resume sees them too.
    """

    def __init__(self, dataset_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        check_rank(rank, world_size)
        check_batch_size("micro_batch_size", micro_batch_size)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset_size = int(dataset_size)
        self.batch_size = int(micro_batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.batches_seen = 0
        self.skipped: list[str] = []
        # Used for its permutation only: drop_last gives every rank the same number of samples
        # without repeating any.
        self._permutation = DistributedSampler(range(self.dataset_size), num_replicas=self.world_size,
                                               rank=self.rank, shuffle=True, seed=int(seed), drop_last=True)
        if len(self._permutation) < self.batch_size:
            raise ValueError(
                f"train set too small: {self.dataset_size} samples over {world_size} rank(s) gives "
                f"{len(self._permutation)} per rank, fewer than micro_batch_size={micro_batch_size}")

    @property
    def seed(self) -> int:
        return self._permutation.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._permutation.seed = int(value)

    def __len__(self) -> int:
        """Batches of a full epoch on this rank (all ranks: the same)."""
        return len(self._permutation) // self.batch_size

    def epoch_indices(self, epoch: int, bad: AbstractSet[int] = frozenset()) -> list[int]:
        """This rank's sample indices of ``epoch``, whole batches only, ``bad`` ones replaced.

        A bad index is replaced by the next spare of this rank's share (the samples beyond the
        last whole batch first, then the share from its start), so batches stay full and every
        rank keeps the same number of steps.
        """
        self._permutation.set_epoch(epoch)
        share = list(self._permutation)
        used = share[:len(self) * self.batch_size]
        if not bad:
            return used
        spares = iter([i for i in share[len(used):] + share if i not in bad])
        return [i if i not in bad else next(spares, i) for i in used]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next ``__iter__``; a new epoch starts at its first batch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.leave_epoch()
            self.epoch, self.batches_seen = int(epoch), 0

    def finish_epoch(self, epoch: int) -> None:
        """After ``__iter__`` read ``epoch`` to its end: the next one starts at its first batch."""
        if self.epoch == epoch:  # not moved by set_epoch/load_state_dict during iteration
            self.leave_epoch()
            self.epoch, self.batches_seen = epoch + 1, 0

    def leave_epoch(self) -> None:
        """Called before the position moves to another epoch: a backend frees what it reads with."""

    def release(self) -> None:
        """Free what the epoch is read with now (a DALI pipeline); the position stays exact.

        The trainer calls it when it stops drawing batches before the loader is exhausted (the
        end of its epoch's optimizer steps, ``run.max_steps``), so no reader outlives its epoch
        into the evaluation. The next ``__iter__`` continues with exactly the batches an
        uninterrupted iteration would have yielded; ``state_dict`` is unchanged by it. The
        torchvision backend keeps nothing worth freeing (persistent workers, a few batches).
        """

    def state_dict(self) -> dict[str, Any]:
        """This rank's reader position (JSON); the geometry keys let a resize of the job resume."""
        return {
            "epoch": self.epoch,
            "batches_seen": self.batches_seen,
            "seed": self.seed,
            "world_size": self.world_size,
            "micro_batch_size": self.batch_size,
            "dataset_size": self.dataset_size,
            "skipped": list(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position so the next ``__iter__`` skips the batches already consumed."""
        self.restore_position(state)

    def restore_position(self, state: dict[str, Any]) -> bool:
        """Restore epoch, seed, skipped files and batches seen; True if the geometry is unchanged.

        Same world size, micro-batch and data set size: the continuation is exact. Otherwise (a
        requeue onto fewer nodes, a state from another micro-batch, a data set that changed) the
        epoch's order is regenerated for the new geometry from the seed and the samples all ranks
        already consumed are skipped (:func:`converted_batches_seen`), with a warning.

        Raises:
            ValueError: the state lacks one of :data:`POSITION_KEYS`.
        """
        missing = set(POSITION_KEYS) - set(state)
        if missing:
            raise ValueError(f"train loader state lacks {sorted(missing)}: got {sorted(state)}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.skipped = list(state.get("skipped", []))
        seen = int(state["batches_seen"])
        old = (int(state.get("world_size", self.world_size)), int(state.get("micro_batch_size", self.batch_size)),
               int(state.get("dataset_size", self.dataset_size)))
        same = old == (self.world_size, self.batch_size, self.dataset_size)
        if not same:
            old_world, old_batch, old_size = old
            seen = converted_batches_seen(seen, old_world, old_batch, self.world_size, self.batch_size)
            log.warning(
                "data: world size / micro-batch / data set changed since the checkpoint "
                "(%d x %d over %d images -> %d x %d over %d): epoch %d's order is regenerated from "
                "seed %d for the new sharding, continuing after the %d batches per rank already consumed",
                old_world, old_batch, old_size, self.world_size, self.batch_size, self.dataset_size,
                self.epoch, self.seed, seen)
        self.batches_seen = min(seen, len(self))
        return same


class ShardedEvalLoader:
    """This rank's strided, unpadded share of an evaluation set (base of both backends).

    Rank ``r`` reads indices ``range(r, N, world_size)``: every image exactly once across ranks,
    so ranks may hold different numbers of images (and batches; possibly zero when
    ``N < world_size``); the evaluation code all-reduces sums, not means. Strided rather than
    contiguous so that each rank sees every class of a class-sorted folder. ``set_epoch`` is a
    no-op and the state is empty: evaluation always runs a whole pass.

    Args:
        dataset_size: number of evaluation samples.
        batch_size: samples per batch (the last batch may be smaller).
        rank: global rank.
        world_size: number of ranks.

    Attributes:
        indices: the dataset indices this rank reads, in order.
        num_samples: ``len(indices)``.
        dataset_size: the total every rank's counts must sum to.
        skipped: undecodable images left out by this rank (``data.on_corrupt=skip``).
    """

    def __init__(self, dataset_size: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        check_rank(rank, world_size)
        check_batch_size("batch_size", batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_size = int(batch_size)
        self.dataset_size = int(dataset_size)
        # Not DistributedSampler: it pads shards to equal length by repeating images.
        self.indices = range(self.rank, self.dataset_size, self.world_size)
        self.num_samples = len(self.indices)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """No-op: the evaluation order never changes."""

    def release(self) -> None:
        """No-op: an evaluation pass frees its reader when it ends."""

    def state_dict(self) -> dict[str, Any]:
        """Empty: an evaluation pass is never resumed mid-way."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accepts the (empty) state of :meth:`state_dict`."""
