"""Stopping: SIGUSR2 / SIGTERM handlers, the agreement of all ranks on when to stop, exit statuses.

A signal only sets a flag (no I/O, no collective). At agreed step boundaries (every
``run.stop_check_every`` optimizer steps, before a checkpoint, at each epoch end) the ranks
all-reduce one small integer tensor: the stop flags and the count of non-finite losses since the
last check, so every rank stops at the same step. That check is the only host synchronisation
it adds.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["EXIT_BAD_CONFIG", "EXIT_DIVERGED", "EXIT_PREEMPTED", "Preempted", "TrainingDiverged",
           "StopSignals", "StopCheck"]

# Exit statuses of spnet-train (README "Checkpoints and resume").
EXIT_BAD_CONFIG = 2  # invalid config, unsafe change on resume, or a checkpoint refused
EXIT_DIVERGED = 3  # more than run.max_bad_steps non-finite losses; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGUSR2/SIGTERM after saving; run it again to continue


class Preempted(Exception):
    """Training stopped on SIGUSR2/SIGTERM after saving a checkpoint, on every rank.

    Args:
        signum: the signal that was received (on any rank).
        checkpoint: the checkpoint directory the next attempt resumes from.
    """

    def __init__(self, signum: int, checkpoint: Optional[Path]) -> None:
        name = signal.Signals(signum).name if signum else "signal"
        super().__init__(f"stopped by {name}; saved {checkpoint}; run the same command again to resume")
        self.signum = signum
        self.checkpoint = checkpoint


class TrainingDiverged(RuntimeError):
    """More than ``run.max_bad_steps`` steps had a non-finite loss."""


class StopSignals:
    """SIGUSR2 / SIGTERM handlers that only record the request (no I/O, no collective).

    The training loop reads :attr:`requested` at agreed step boundaries and all-reduces it, so
    every rank stops at the same step. A second SIGTERM restores the default action and
    re-raises it: the process exits at once (status 128 + 15), the last sealed checkpoint stays.
    A SIGTERM that arrives within :attr:`BURST_S` seconds of the first one is not a second
    request but the same one: at a time limit and at the end of a preemption's GraceTime, SLURM
    22.05 sends each task SIGTERM, SIGCONT, SIGTERM within 5 ms (docs/library-facts.md), and
    exiting on the second would cut short the save that the first one starts; SLURM's SIGKILL
    comes KillWait (30 s by default) later. A deliberate second kill more than BURST_S after the
    first still exits at once (and so does any SIGTERM after that).
    Installed by :meth:`install` at the start of the trainer's set-up (a stop requested while the
    run directory is planned or the data is listed is honoured at the first agreed check);
    :meth:`restore` puts back whatever handlers were there before (submitit's, for instance).
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
    BURST_S = 2.0  # 400 x the 5 ms measured between SLURM's two SIGTERMs

    def __init__(self) -> None:
        self.requested = 0  # signal number of the first request, 0 = none
        self._first_term: float | None = None  # time.monotonic() of the first SIGTERM
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM:
            now, first = time.monotonic(), self._first_term
            if first is not None and now - first < self.BURST_S:
                return  # the same stop request (SLURM's pair): let the save that it started finish
            if first is not None:  # a deliberate second request
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self._first_term = now
        if not self.requested or signum == signal.SIGTERM:
            self.requested = signum

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


class StopCheck:
    """The stop request and the device-side count of non-finite losses, agreed across ranks.

    Args:
        device: the training device (the count lives there: no host sync per step).
        world_size: ranks of the job.
        signals: the handlers whose requests are agreed on (the trainer installs them at the start
            of its set-up); None: new, not yet installed ones.
    """

    def __init__(self, device: torch.device, world_size: int, signals: Optional[StopSignals] = None) -> None:
        self.signals = StopSignals() if signals is None else signals
        self.world_size = world_size
        self._bad = torch.zeros((), dtype=torch.int64, device=device)
        self.new_bad = 0  # non-finite losses found by the last agreement (a checkpoint is not written)

    def count(self, total_loss: torch.Tensor) -> None:
        """Count a non-finite loss on the device; read at the next agreement, never per step."""
        self._bad += ~torch.isfinite(total_loss)

    def agree(self) -> int:
        """Every rank: one all-reduce of (SIGUSR2 seen, SIGTERM seen, new bad steps) and one host sync.

        Sets :attr:`new_bad` and returns the signal to stop on (SIGTERM before SIGUSR2) or 0.
        """
        requested, device = self.signals.requested, self._bad.device
        flags = torch.stack([torch.tensor(int(requested == signal.SIGUSR2), device=device),
                             torch.tensor(int(requested == signal.SIGTERM), device=device),
                             self._bad.clone()])
        if torch.distributed.is_initialized() and self.world_size > 1:
            torch.distributed.all_reduce(flags)
        usr2, term, bad = flags.tolist()
        self._bad.zero_()
        self.new_bad = bad
        return signal.SIGTERM if term else signal.SIGUSR2 if usr2 else 0
