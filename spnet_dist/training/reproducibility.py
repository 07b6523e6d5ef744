"""Seeds and deterministic kernels (``run.seed``, ``run.deterministic``)."""
from __future__ import annotations

import os
import random
from typing import Callable

import numpy as np
import torch

__all__ = ["seed_everything", "set_deterministic"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> Callable[[], None]:
    """Switch torch to deterministic kernels (``run.deterministic``); returns an undo function.

    ``torch.use_deterministic_algorithms`` (errors on ops without a deterministic kernel),
    cuDNN autotuning off, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (needed by deterministic cuBLAS;
    must be set before the first cuBLAS call). CPU fp32 results also depend on the number of
    intra-op threads (reductions split by thread): it is recorded in each checkpoint and a
    resume with another count is warned about.
    """
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    def undo() -> None:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]

    return undo
