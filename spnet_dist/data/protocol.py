"""The data-loader interface the trainer relies on.

The trainer never touches a ``torch.utils.data.DataLoader`` (or a DALI iterator) directly: it
talks to a ``Loader``. Today the torchvision loaders in :mod:`spnet_dist.data.build` implement it;
the DALI pipelines (GPU ``mixed`` decode and their CPU twin) will implement the same five methods,
so swapping the backend changes no trainer code and no checkpoint format.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Loader(Protocol):
    """An epoch-aware, checkpointable source of ``(images, labels)`` batches for ONE rank.

    Contract (shared by the torchvision loaders and the future DALI loaders):

    - ``__iter__`` yields ``(images, labels)``: images ``(B, 3, H, W)`` float32, already
      normalised (mean/std of the recipe), labels ``(B,)`` int64. Every rank reads its own shard.
    - ``__len__`` is the number of batches a FULL epoch yields on this rank (not the batches left
      after a resume), so schedules can be precomputed per step.
    - ``set_epoch(epoch)`` selects the epoch whose order the next ``__iter__`` produces (train
      loaders reshuffle per epoch; eval loaders ignore it).
    - ``state_dict()`` returns a small JSON-serialisable dict with the reader position of this
      rank; ``load_state_dict(state)`` restores it so that the next ``__iter__`` yields exactly
      the batches an uninterrupted run would have yielded next. A DALI loader stores its
      ``pipe.checkpoint()`` here; the torchvision loader stores epoch / batches seen / seed.
    """

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        ...

    def __len__(self) -> int:
        ...

    def set_epoch(self, epoch: int) -> None:
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...
