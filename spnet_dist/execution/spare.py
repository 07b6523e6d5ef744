"""Spare buffers kept between inference forwards for the largest short-lived tensors.

On the CPU, a tensor of tens of MB that a forward allocates afresh often comes from memory glibc
has just given back to the kernel (it trims the top of its heap when a forward frees its large
tensors, and maps anything over 32 MB separately), and the kernel zeroes every 4 KB page on first
touch: ResNet-50 at batch 32 took 12-26 thousand such page faults per forward, about 1 us each.
A :class:`Spare` keeps one such tensor per thread for the next forward. The execution schedule of
a model holds its own spares (``network.py``): nothing is kept for a model that does not use them,
and dropping the schedule or the model frees them.

Rules that keep it invisible:

* only without autograd: a recorded graph may have saved the tensor for its backward pass, which
  the next forward would overwrite;
* taken, not shared: while one forward holds it, a forward nested in it (a hook running the model
  again) gets a fresh tensor;
* never across inference mode and plain no_grad (an inference tensor cannot be written outside
  inference mode);
* never given back while anything that leaves the model still views it (the caller checks).
"""
from __future__ import annotations

import math
import threading

import torch
from torch import Tensor


class Spare:
    """One flat tensor per thread, taken for a forward and given back after it.

    A copy (``copy.deepcopy`` of a model, pickling) starts empty: the tensor is scratch memory.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> "Spare":
        return Spare()

    def __reduce__(self) -> tuple:
        return (Spare, ())

    def take(self, numel: int, like: Tensor) -> Tensor:
        """A flat tensor of at least ``numel`` elements of ``like``'s dtype and device: the spare
        one if it fits, else a new one (never zeroed). (A spare taken with autograd on is safe:
        it is only ever given back with autograd off.)"""
        spare, self._local.tensor = getattr(self._local, "tensor", None), None
        if (spare is not None and spare.numel() >= numel
                and spare.dtype == like.dtype and spare.device == like.device
                and spare.is_inference() == torch.is_inference_mode_enabled()):
            return spare
        return torch.empty(numel, dtype=like.dtype, device=like.device)

    def give(self, flat: Tensor) -> None:
        """Keep ``flat`` (from :meth:`take`) for the next forward, unless autograd is on."""
        if not torch.is_grad_enabled():
            self._local.tensor = flat

    def clear(self) -> None:
        """Drop this thread's spare tensor (frees its memory)."""
        self._local.tensor = None


def batch_view(flat: Tensor, batch: int, like: Tensor) -> Tensor:
    """The first ``batch`` samples' worth of ``flat`` as a tensor shaped and laid out like
    ``like``'s samples (NCHW or channels_last)."""
    sample_shape = like.shape[1:]
    head = flat[:batch * math.prod(sample_shape)]
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        channels, height, width = sample_shape
        return head.view(batch, height, width, channels).permute(0, 3, 1, 2)
    return head.view(batch, *sample_shape)
