"""The trainer: set-up, the epoch loop, one SP-Net step, stop agreement, the run log.

* :mod:`.trainer`: :class:`Trainer` (set-up, ``fit``), :func:`main`, :func:`cli` (``spnet-train``);
* :mod:`.step`: :class:`SPNetStep`, one optimisation step on a micro-batch;
* :mod:`.epoch`: the running sums of an epoch and the throughput of a logging interval;
* :mod:`.planning`: how an attempt starts in ``run.out_dir`` (fresh, again, or resumed);
* :mod:`.signals`: stop signals, the agreement of all ranks, exit statuses;
* :mod:`.run_log`: progress lines, TensorBoard, evaluation records, the final table;
* :mod:`.reproducibility`: seeds and deterministic kernels.

``python -m spnet_dist.train`` (the module launchers run) calls :func:`cli`.
"""
from ..checkpoint import TrainState
from .signals import EXIT_BAD_CONFIG, EXIT_DIVERGED, EXIT_PREEMPTED, Preempted, TrainingDiverged
from .step import SPNetStep
from .trainer import Trainer, cli, main

__all__ = ["Trainer", "SPNetStep", "TrainState", "Preempted", "TrainingDiverged", "EXIT_BAD_CONFIG",
           "EXIT_DIVERGED", "EXIT_PREEMPTED", "main", "cli"]
