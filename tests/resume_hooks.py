"""Interruptions planted at exact points of a real training run (tests only).

The same hooks serve in-process tests and worker processes (tests/workers/resume_job.py): a real
signal sent to this process after optimizer step N or at the start of an evaluation, a real
SIGSTOP (a rank that hangs) or a real SIGKILL in the middle of a checkpoint write.
"""
from __future__ import annotations

import os
import signal
from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import pytest

from spnet_dist import checkpoint as C
from spnet_dist import training
from spnet_dist.checkpoint import store


@contextmanager
def interruptions(signal_step: Optional[int] = None, signum: int = signal.SIGUSR2,
                  eval_epoch: Optional[int] = None, kill_in_save_step: Optional[int] = None,
                  stop_self_step: Optional[int] = None, rank: Optional[int] = None) -> Iterator[None]:
    """Patch the trainer so this process receives a signal at the given point.

    Args:
        signal_step: send ``signum`` to this process right after optimizer step N.
        signum: the signal (SIGUSR2 like SLURM's warning, or SIGTERM).
        eval_epoch: send ``signum`` when the evaluation after epoch N starts.
        kill_in_save_step: SIGKILL this process while the checkpoint of step N is being sealed
            (DeepSpeed's files and ours are written, the marker is not).
        stop_self_step: SIGSTOP this process after optimizer step N (a hung rank).
        rank: only act on this global rank (None: every rank).
    """
    mine = rank is None or int(os.environ.get("RANK", 0)) == rank
    with ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        original_step, original_eval, original_hash = training.Trainer.train_step, training.Trainer.evaluate, store._sha256

        def train_step(self, images, targets):
            terms, stepped = original_step(self, images, targets)
            if stepped and mine:
                if self.state.step == signal_step:
                    os.kill(os.getpid(), signum)
                if self.state.step == stop_self_step:
                    os.kill(os.getpid(), signal.SIGSTOP)
            return terms, stepped

        def evaluate(self, *args, **kwargs):
            if mine and self.state.epoch == eval_epoch:
                os.kill(os.getpid(), signum)
            return original_eval(self, *args, **kwargs)

        def sha256(path):
            if mine and C.step_tag(kill_in_save_step) in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return original_hash(path)

        mp.setattr(training.Trainer, "train_step", train_step)
        mp.setattr(training.Trainer, "evaluate", evaluate)
        if kill_in_save_step is not None:
            mp.setattr(store, "_sha256", sha256)
        yield
