"""How an attempt starts in ``run.out_dir``: fresh, again from step 0, or from a checkpoint.

Rank 0 alone decides (``spnet_dist.checkpoint.plan_resume``, reads only) and prepares the
directory; every rank gets the same :class:`RunPlan` back, or the same error (an existing run
with ``run.resume=never``, unsafe config differences, a bad explicit checkpoint, or any failure
while preparing, such as a directory rank 0 may not write): ``distributed.run_on_main`` delivers
it, so no rank waits in a collective for a rank 0 that has stopped. Decision errors are raised
before any file is written.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import distributed as D
from ..checkpoint import plan_resume, read_state, remove_leftovers
from ..config import save_config, to_dict
from ..run_dir import RunDirectory

__all__ = ["RunPlan", "plan_run_directory"]


@dataclass(frozen=True)
class RunPlan:
    """What this attempt starts from (identical on every rank).

    Attributes:
        checkpoint: the checkpoint to resume from; None: start from step 0.
        restart_step: the first step this attempt logs again (TensorBoard drops an earlier
            attempt's events from there on); None for a fresh directory.
    """

    checkpoint: Optional[Path]
    restart_step: Optional[int]


def plan_run_directory(cfg: Any, run_dir: RunDirectory, is_main: bool) -> RunPlan:
    """Decide, prepare ``run_dir`` on rank 0 (leftovers removed, metrics cut back to the
    checkpoint, the resolved config written) and return the plan on every rank.

    Collective (every rank calls it); it returns once rank 0 has prepared the directory.

    Args:
        cfg: the validated config of this attempt.
        run_dir: ``run.out_dir``.
        is_main: rank 0.
    """
    return D.run_on_main(lambda: _prepare(cfg, run_dir), is_main=is_main,
                         what=f"prepare the run directory {run_dir.root}")


def _prepare(cfg: Any, run_dir: RunDirectory) -> RunPlan:
    """Rank 0: decide how the attempt starts and prepare the directory for it."""
    plan = plan_resume(run_dir.root, cfg.run.resume, to_dict(cfg))
    saved = read_state(plan.checkpoint)["train_state"] if plan.checkpoint else {"epoch": 0, "step": 0}
    # Everything logged up to the checkpoint's step stands (its evaluation included: the
    # epoch-end checkpoint is sealed after it); later events are about to be logged again.
    restart_step = saved["step"] + 1 if plan.existing or plan.checkpoint else None
    for note in plan.notes:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    for name in remove_leftovers(run_dir.checkpoints):
        print(f"removed {run_dir.checkpoints / name} (a checkpoint save that was interrupted)", flush=True)
    # Records a resumed run will write again (evaluated after the checkpoint was sealed).
    run_dir.truncate_metrics(saved["epoch"], saved["step"])
    save_config(cfg, run_dir.config)  # the resolved config of this attempt
    if plan.checkpoint is not None:
        print(f"resuming from {plan.checkpoint}", flush=True)
    elif plan.existing:
        print(f"{run_dir.root} holds a run without a checkpoint: starting it again from step 0", flush=True)
    return RunPlan(checkpoint=plan.checkpoint, restart_step=restart_step)
