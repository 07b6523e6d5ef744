"""Checkpoints: the snapshot format, its save / load, the one resolver + validator, resume rules.

* :mod:`.layout`: the names of a checkpoint directory and its files;
* :mod:`.store`: sealing, publishing, aliases, pruning, leftovers, and the resolver + validator
  (marker, SHA-256, every rank's part) that resume and spnet-export both go through;
* :mod:`.snapshot`: :class:`Snapshot`, one typed object for everything a checkpoint holds
  besides DeepSpeed's engine state, with :func:`save_snapshot` / :func:`load_snapshot`;
* :mod:`.weights`: the student / teacher weights of a checkpoint for export;
* :mod:`.safe_load`: DeepSpeed's ``.pt`` files read with ``torch.load(weights_only=True)``;
* :mod:`.resume`: which checkpoint a run continues from and which config changes it accepts.

Loading safety: nothing of a checkpoint is read before :func:`validate_checkpoint` matched every
file against the marker written last. Our own files are JSON and safetensors (no pickle).
DeepSpeed's ``.pt`` files, which DeepSpeed 0.19 itself would unpickle, are opened with
``weights_only=True`` and an allow-list of three DeepSpeed classes, in resume and in export alike
(:mod:`.safe_load`); a file naming any other global is refused with one line naming it.
"""
from .layout import (ALIASES, LATEST, MARKER, MODEL_STATES, STATE_FILE, TEACHER_FILE, optim_states_file,
                     rank_file, step_tag, tmp_dir_name)
from .resume import SAFE_TO_CHANGE, ResumeMismatch, ResumePlan, config_differences, plan_resume
from .safe_load import DEEPSPEED_GLOBALS
from .snapshot import (EpochSums, RankState, Snapshot, TeacherState, TrainState, capture_rng, load_snapshot,
                       package_versions, restore_rng, save_snapshot)
from .store import (CheckpointError, find_resumable, point_alias, prune, publish, read_state, remove_leftovers,
                    resolve_checkpoint, step_dirs, validate_checkpoint, write_json)
from .weights import student_weights, teacher_weights

__all__ = [
    "DEEPSPEED_GLOBALS", "ALIASES", "LATEST", "MARKER", "MODEL_STATES", "STATE_FILE", "TEACHER_FILE", "SAFE_TO_CHANGE",
    "CheckpointError", "ResumeMismatch", "ResumePlan",
    "TrainState", "EpochSums", "RankState", "TeacherState", "Snapshot",
    "step_tag", "rank_file", "optim_states_file", "tmp_dir_name",
    "publish", "point_alias", "prune", "remove_leftovers", "write_json",
    "validate_checkpoint", "step_dirs", "find_resumable", "resolve_checkpoint", "read_state",
    "save_snapshot", "load_snapshot", "capture_rng", "restore_rng", "package_versions",
    "student_weights", "teacher_weights", "config_differences", "plan_resume",
]
