"""Per-epoch state of the training loop: the running loss sums (what a mid-epoch checkpoint saves)
and the throughput of each logging interval."""
from __future__ import annotations

import time
from typing import Optional

import torch

from .. import distributed as D
from ..checkpoint import EpochSums

__all__ = ["EpochAccumulator", "IntervalMeter", "pack_epoch_sums", "reduce_epoch_means"]


def pack_epoch_sums(sums: dict[str, torch.Tensor], micro_batches: int, images: int,
                    device: torch.device) -> tuple[list[str], torch.Tensor]:
    """The epoch's loss sums and counters as one float64 tensor ON ``device`` (for one all-reduce).

    Every piece is created on ``device`` before stacking: ``torch.stack`` refuses to mix a CUDA
    loss sum with a CPU counter (the epoch-end crash every GPU run would have hit).

    Args:
        sums: per-term sums of the detached losses (tensors on the training device).
        micro_batches: micro-batches this rank ran.
        images: images this rank saw.
        device: the training device.

    Returns:
        ``(keys, packed)``: sorted term names and ``[sum_k for k in keys] + [micro_batches, images]``.
    """
    keys = sorted(sums)
    parts = [torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys]
    parts += [torch.full((), float(micro_batches), dtype=torch.float64, device=device),
              torch.full((), float(images), dtype=torch.float64, device=device)]
    return keys, torch.stack(parts)


def reduce_epoch_means(sums: dict[str, torch.Tensor], micro_batches: int, images: int, elapsed: float,
                       device: torch.device) -> dict[str, float]:
    """Epoch means of every loss term and the global images/s, averaged over ranks.

    Args:
        sums, micro_batches, images, device: see :func:`pack_epoch_sums`.
        elapsed: wall seconds of this rank's epoch.
    """
    keys, packed = pack_epoch_sums(sums, micro_batches, images, device)
    D.all_reduce_mean_([packed])
    values = packed.tolist()  # one host sync for everything
    n = max(values[-2], 1.0)
    means = {k: values[i] / n for i, k in enumerate(keys)}
    means["images_per_sec"] = values[-1] * D.get_world_size() / max(elapsed, 1e-9)
    return means


class EpochAccumulator:
    """The running sums of the current epoch on this rank: loss terms (on the device, no host
    sync per step), micro-batches, images and wall time.

    It holds the sums of the micro-batches ``[0, batch_in_epoch)`` of the epoch; a mid-epoch
    checkpoint saves them (:meth:`snapshot`) and a resume restores them (:meth:`restore`), so a
    resumed epoch's record is the uninterrupted one's.

    Args:
        device: the training device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        """A new epoch: nothing summed yet."""
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.images = 0
        self._carried = 0.0  # wall seconds of the epoch before this attempt
        self._start = time.perf_counter()

    def restore(self, saved: Optional[EpochSums]) -> None:
        """Continue the sums a checkpoint saved in the middle of an epoch (None: a new epoch)."""
        self.reset()
        if saved is not None:
            self.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in saved.terms.items()}
            self.micro_batches, self.images, self._carried = saved.micro_batches, saved.images, saved.seconds

    def begin(self) -> None:
        """Start the epoch's clock (a resumed epoch's earlier seconds are carried over)."""
        self._start = time.perf_counter() - self._carried

    def add(self, terms: dict[str, torch.Tensor], images: int) -> None:
        """Add one micro-batch's detached loss terms (device tensors; no host sync)."""
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.micro_batches += 1
        self.images += images

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def snapshot(self) -> EpochSums:
        """The sums as a checkpoint stores them (one host sync per term, at a save only)."""
        return EpochSums(terms={k: float(v) for k, v in self.sums.items()}, micro_batches=self.micro_batches,
                         images=self.images, seconds=self.elapsed())

    def reduce(self) -> dict[str, float]:
        """Epoch means over every rank (:func:`reduce_epoch_means`)."""
        return reduce_epoch_means(self.sums, self.micro_batches, self.images, self.elapsed(), self.device)


class IntervalMeter:
    """Throughput of the last logging interval: images/s, fraction of time waiting for data, ETA.

    Args:
        start: ``time.perf_counter()`` at the start of the epoch.
    """

    def __init__(self, start: float) -> None:
        self.start, self.images, self.steps, self.wait = start, 0, 0, 0.0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def add(self, images: int, stepped: bool) -> None:
        self.images += images
        self.steps += int(stepped)

    def report(self, now: float, world_size: int, steps_left: int) -> dict[str, float]:
        """The interval's figures (global images/s), then start a new interval at ``now``."""
        elapsed = max(now - self.start, 1e-9)
        speed = {"images_per_sec": self.images * world_size / elapsed, "data_wait": self.wait / elapsed,
                 "eta_s": steps_left * elapsed / max(self.steps, 1)}
        self.start, self.images, self.steps, self.wait = now, 0, 0, 0.0
        return speed
