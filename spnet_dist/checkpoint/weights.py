"""The network weights of a checkpoint, without a process group or GPU (spnet-export reads these).

Student weights are consolidated with DeepSpeed's own utility
(``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``: fp32 master shards
of every rank + buffers of rank 0; BN buffers are identical across ranks because the trainer
averages them after every step). ZeRO 0 writes no shards: the full fp32 state is the ``module``
entry of the model-state file, which is what DeepSpeed's engine itself loads for stage 0
(docs/library-facts.md). The teacher is our own safetensors file.

Callers pass a checkpoint returned by :func:`~spnet_dist.checkpoint.store.resolve_checkpoint`
(validated against its marker). DeepSpeed's files are opened with ``weights_only=True``
(:mod:`spnet_dist.checkpoint.safe_load`).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from .layout import MODEL_STATES, TEACHER_FILE
from .safe_load import consolidation_loads_safely, load
from .store import CheckpointError, read_state

__all__ = ["student_weights", "teacher_weights"]


def student_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of the student of a validated checkpoint (ZeRO 0, 1 or 2, any world size).

    Raises:
        CheckpointError: one line naming the checkpoint or file.
    """
    ckpt = Path(ckpt)
    zero_stage = int(read_state(ckpt)["config"]["engine"]["zero_stage"])
    if zero_stage == 0:
        path = ckpt / MODEL_STATES
        state = load(path)
        if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
            raise CheckpointError(f"{path}: no 'module' state dict; not a DeepSpeed model-state file")
        return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}

    chatter = io.StringIO()  # DeepSpeed prints progress bars and notes: keep errors one line
    try:
        with consolidation_loads_safely() as consolidate, \
                contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            state = consolidate(str(ckpt.parent), tag=ckpt.name)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        if isinstance(err, CheckpointError):  # a refused file: already one line naming it
            raise
        # e.g. "Expected 2 of '*_optim_states.pt' ... but found 1 files" (a rank never saved)
        raise CheckpointError(f"{ckpt}: incomplete ZeRO checkpoint ({' '.join(str(err).split())})") from None
    return dict(state)


def teacher_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The EMA teacher's fp32 weights of a validated checkpoint.

    Raises:
        CheckpointError: the run trained without a teacher, or the file cannot be read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt) / TEACHER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (the run trained without the EMA teacher)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupted safetensors file ({' '.join(str(err).split())})") from None
