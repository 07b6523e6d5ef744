"""Names of a checkpoint: the step directories under ``RUN/checkpoints`` and the files in them.

A checkpoint is one directory ``RUN/checkpoints/<tag>/`` (``tag = step_<8-digit step>``) holding

* DeepSpeed's own files, written by ``engine.save_checkpoint`` on every rank:
  :data:`MODEL_STATES` (module, optimizer with ZeRO 0, LR scheduler; rank 0) and, with ZeRO 1/2,
  one optimizer shard per rank (:func:`optim_states_file`);
* :data:`TEACHER_FILE`: the EMA teacher's parameters and buffers (fp32, the model's full
  state-dict keys);
* :data:`STATE_FILE`: the counters, teacher ``num_updates`` / ``momentum``, the resolved config,
  package versions, world size, scheduler summary;
* :func:`rank_file` per rank: RNG states, the loader position and the running sums of the
  current epoch's loss terms;
* :data:`MARKER`: the completion marker, written last, with the size and SHA-256 of every other
  file.

``latest`` is DeepSpeed's text pointer (the tag of the newest checkpoint); ``best`` and
``final`` (:data:`ALIASES`) are relative symlinks to step directories.
"""
from __future__ import annotations

from typing import Optional

__all__ = [
    "LATEST", "MARKER", "STATE_FILE", "TEACHER_FILE", "MODEL_STATES", "OPTIM_STATES_GLOB", "ALIASES",
    "FORMAT_VERSION", "step_tag", "step_of", "rank_file", "optim_states_file", "tmp_dir_name",
    "trash_dir_name", "is_leftover",
]

LATEST = "latest"  # DeepSpeed's text pointer: the tag name of the newest checkpoint
MARKER = "complete.json"
STATE_FILE = "trainer_state.json"
TEACHER_FILE = "teacher.safetensors"
# DeepSpeed 0.19's file names (runtime/engine.py _get_ckpt_name / _get_zero_ckpt_name; no model
# parallelism, and no "bf16_" prefix because mixed precision goes through torch_autocast).
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES_GLOB = "*_optim_states.pt"
ALIASES = ("best", "final")
FORMAT_VERSION = 1
_TMP = ".tmp-"
_TRASH = ".trash-"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> Optional[int]:
    """The step of a step directory's name, or None for any other name."""
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def optim_states_file(rank: int) -> str:
    """DeepSpeed's ZeRO 1/2 optimizer shard of data-parallel rank ``rank``."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def tmp_dir_name(tag: str) -> str:
    """The directory every rank writes into before rank 0 seals and renames it to ``tag``."""
    return f"{_TMP}{tag}"


def trash_dir_name(tag: str) -> str:
    """Where an existing ``tag`` directory is moved while a new one of the same name is published."""
    return f"{_TRASH}{tag}"


def is_leftover(name: str) -> bool:
    """A temporary or trash directory name a killed save can leave behind."""
    return name.startswith((_TMP, _TRASH))
