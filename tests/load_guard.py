"""A ``torch.load`` that refuses to unpickle: tests install it in-process or in worker ranks.

Any call that would run with ``weights_only=False`` (passed explicitly, or left out where torch's
default would be False) raises, so a resume or export that reaches DeepSpeed's own pickle loads
fails loudly instead of silently unpickling.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


class UnsafeLoad(AssertionError):
    pass


def _would_unpickle(kwargs: dict) -> bool:
    weights_only = kwargs.get("weights_only")
    if weights_only is None:
        forced_off = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")
        weights_only = torch.serialization._default_to_weights_only(kwargs.get("pickle_module")) and not forced_off
    return not weights_only


@contextlib.contextmanager
def refuse_unsafe_torch_load() -> Iterator[list[str]]:
    """Patch ``torch.load``; yields the list of files loaded safely (to check it was reached)."""
    real = torch.load
    loaded: list[str] = []

    def guarded(f, *args, **kwargs):
        if args or _would_unpickle(kwargs):
            raise UnsafeLoad(f"torch.load({f!r}) would unpickle (weights_only={kwargs.get('weights_only')!r})")
        loaded.append(str(f))
        return real(f, **kwargs)

    torch.load = guarded
    try:
        yield loaded
    finally:
        torch.load = real
