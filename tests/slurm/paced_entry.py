"""The training entry of the SLURM signal tests: :func:`spnet_dist.training.trainer.main`, each optimizer
step of a job's FIRST attempt followed by a pause (``SPNET_TEST_STEP_PAUSE_S`` seconds, from the
submitting test's environment, which sbatch passes on); requeued attempts run at full speed.

slurmctld sends the ``--signal=USR2@N`` warning on a 30 s tick, N to N + 30 s before the time
limit, so a 2-minute job with N = 30 gets it 60 to 90 s into its first attempt; the digits run
needs about 25 s of CPU. The pause makes the first attempt outlast the warning without more
computation (the machine's cores are shared), and the fast requeued attempt then finishes: one
stop per job, whatever the machine's speed. Pausing leaves the results unchanged (the
weights are compared with an unpaced run). The entry also names the ``spnet_dist`` the job
imported, so a test can check that the job runs the tree under test.
"""
from __future__ import annotations

import os
import time
from typing import Any

import spnet_dist
from spnet_dist.training import trainer


def main(cfg) -> dict[str, Any]:
    first_attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0
    pause = float(os.environ.get("SPNET_TEST_STEP_PAUSE_S", "0")) if first_attempt else 0.0
    print(f"paced entry: spnet_dist from {spnet_dist.__file__}, {pause} s after each step", flush=True)
    if pause > 0:
        original = trainer.Trainer.train_step

        def train_step(self, images, targets):
            out = original(self, images, targets)
            time.sleep(pause)
            return out

        trainer.Trainer.train_step = train_step
    return trainer.main(cfg)
