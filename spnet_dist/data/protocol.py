"""The data-loader interface the trainer relies on.

The trainer never touches a ``torch.utils.data.DataLoader`` (or a DALI pipeline) directly: it
talks to a ``Loader``. The torchvision loaders in :mod:`spnet_dist.data.torchvision_loader` and the DALI
loaders in :mod:`spnet_dist.data.dali` (GPU ``mixed`` decode and its CPU twin) implement the same
six methods, so swapping the backend changes no trainer code and no checkpoint format.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from torch import Tensor

ON_CORRUPT = ("error", "skip")


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded (``data.on_corrupt=error``); ``paths`` names it."""

    def __init__(self, message: str, paths: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.paths = list(paths)


@runtime_checkable
class Loader(Protocol):
    """An epoch-aware, checkpointable source of ``(images, labels)`` batches for ONE rank.

    Contract (shared by the torchvision loaders and the DALI loaders):

    - ``__iter__`` yields ``(images, labels)``: images ``(B, 3, H, W)`` float32, already
      normalised (mean/std of the recipe), labels ``(B,)`` int64. Every rank reads its own shard.
      Training batches are always full and every rank yields the same number per epoch. A DALI
      GPU loader yields them on the rank's GPU (channels-last memory when asked), others on CPU.
    - ``__len__`` is the number of batches a FULL epoch yields on this rank (not the batches left
      after a resume), so schedules can be precomputed per step.
    - ``set_epoch(epoch)`` selects the epoch whose order the next ``__iter__`` produces (train
      loaders reshuffle per epoch; eval loaders ignore it).
    - ``release()`` frees what the current epoch is read with (a DALI pipeline, its pinned host
      and GPU memory) when the caller stops drawing batches before the end; the position is kept
      exactly and the next ``__iter__`` rebuilds the reader from it.
    - ``state_dict()`` returns a small JSON-serialisable dict with the reader position of this
      rank; ``load_state_dict(state)`` restores it so that the next ``__iter__`` yields exactly
      the batches an uninterrupted run would have yielded next. Both store epoch / batches seen /
      seed / geometry; the DALI loader adds its ``pipe.checkpoint()`` (base64), so either backend
      can resume from the other's state (exactly in order, and in pixels with the same backend).
    """

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        ...

    def __len__(self) -> int:
        ...

    def set_epoch(self, epoch: int) -> None:
        ...

    def release(self) -> None:
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...
