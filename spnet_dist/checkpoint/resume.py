"""Resume rules: which checkpoint a run continues from, and which config changes it accepts.

Rank 0 decides (:func:`plan_resume`, reads only) before any file is written; the trainer
broadcasts the decision.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Optional

from ..config import Config, load_config, to_dict
from ..run_dir import RunDirectory
from .store import CheckpointError, find_resumable, read_state, validate_checkpoint

__all__ = ["SAFE_TO_CHANGE", "ResumeMismatch", "ResumePlan", "config_differences", "plan_resume"]

# Fields that may differ between the config a checkpoint was written with and the config of the
# run that resumes it. Everything else changes what training computes and is refused (exit 2).
SAFE_TO_CHANGE = frozenset({
    "schedule.epochs",  # multistep only: the cosine schedule's length is part of its shape
    "data.root", "data.num_workers", "data.eval_batch_size",
    "data.dali_dont_use_mmap", "data.dali_prefetch_queue_depth",  # how files are read, not which bytes
    "engine.timeout_min", "engine.backend",
    "run.out_dir", "run.resume", "run.eval_every", "run.log_every", "run.max_steps", "run.progress",
    "run.tensorboard", "run.checkpoint_every", "run.keep_checkpoints", "run.max_bad_steps",
    "run.stop_check_every", "run.deterministic",
})


class ResumeMismatch(ValueError):
    """The config differs from the checkpoint's in fields that cannot change on resume."""


def _flatten(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, fields in cfg.items() for k, v in fields.items()}


def config_differences(saved: dict, current: dict) -> list[str]:
    """``field: saved -> current`` for every field that differs and is not safe to change.

    ``schedule.epochs`` is safe only for the multistep schedule (a cosine schedule's length is
    part of its shape: the resumed run would follow the saved one).

    Args:
        saved: ``config.to_dict`` of the checkpoint's config.
        current: ``config.to_dict`` of the resuming run's config.
    """
    # A field the saved config lacks was added to the schema after the checkpoint was written: it
    # had its default's meaning then (e.g. optim.lr_scaling absent = 'none'), so it compares as that.
    a, b = {**_flatten(to_dict(Config())), **_flatten(saved)}, _flatten(current)
    safe = set(SAFE_TO_CHANGE)
    if b.get("schedule.kind") == "cosine":
        safe.discard("schedule.epochs")
    out = []
    for key in sorted(set(a) | set(b)):
        if key in safe or key.startswith("slurm."):  # the job's shape, read by launch/submit.py only
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


@dataclasses.dataclass
class ResumePlan:
    """What rank 0 decided about ``run.out_dir``.

    Attributes:
        checkpoint: the checkpoint to resume from (None: start from step 0).
        existing: the directory already held a run (config.yaml): keep its files.
        notes: lines to print (skipped checkpoints).
    """

    checkpoint: Optional[Path] = None
    existing: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)


def _check_same_config(saved: dict, current: dict, source: str) -> None:
    diffs = config_differences(saved, current)
    if diffs:
        raise ResumeMismatch(
            f"run.resume: the config differs from {source} in fields that cannot change on resume: "
            f"{'; '.join(diffs)} (safe to change: {', '.join(sorted(SAFE_TO_CHANGE))}; or start a "
            "new run.out_dir)")


def plan_resume(out_dir: Path, resume: str, current: dict) -> ResumePlan:
    """Decide how a run starts in ``out_dir`` (rank 0; reads only).

    * ``never``: the directory must not hold a run (config.yaml / metrics.jsonl), as before.
    * ``auto``: resume from the newest valid checkpoint; a directory with a config.yaml but no
      checkpoint (a run that died during set-up or before its first save) starts again from
      step 0 in place. Either way the saved config must match except :data:`SAFE_TO_CHANGE`.
    * a path: that checkpoint, which must be one of this run's own (inside
      ``out_dir/checkpoints``: a resume continues this run) and be valid.

    Raises:
        FileExistsError: ``never`` and the directory holds a run.
        ResumeMismatch: unsafe config differences (the CLI exits 2).
        CheckpointError: an explicit path that is not a valid checkpoint of this run.
    """
    run = RunDirectory(out_dir)
    previous = run.holds_run()
    if resume == "never":
        if previous:
            raise FileExistsError(
                f"run.out_dir: {run.root} already holds a run ({', '.join(previous)}) and run.resume is "
                "'never'; choose another run.out_dir, remove that directory or use run.resume=auto")
        return ResumePlan()
    plan = ResumePlan(existing=bool(previous))
    ckpt_dir = run.checkpoints
    if resume == "auto":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan.checkpoint = find_resumable(run)
        plan.notes += [str(w.message) for w in caught]
    else:
        path = Path(resume).expanduser()
        if not path.is_absolute() and not path.exists():
            path = ckpt_dir / resume
        try:
            inside = path.resolve().is_relative_to(ckpt_dir.resolve())
        except OSError:
            inside = False
        if not inside:
            raise CheckpointError(
                f"run.resume: {resume} is not inside {ckpt_dir}; a resume continues this run from one "
                "of its own checkpoints")
        validate_checkpoint(path)
        plan.checkpoint = path.resolve()
    if plan.checkpoint is not None:
        _check_same_config(read_state(plan.checkpoint)["config"], current, f"checkpoint {plan.checkpoint}")
    elif run.config.is_file():
        saved = to_dict(load_config(run.config, check_paths=False))
        _check_same_config(saved, current, f"{run.config} (a run with no checkpoint yet)")
    return plan
