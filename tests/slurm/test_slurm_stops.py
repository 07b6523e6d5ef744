"""Stops SLURM itself makes, on the emulated cluster (no ``scancel --signal``, no submitit
``_interrupt``): a real time limit, a real preemption, and a user's ``scancel``.

What reaches the processes is measured in docs/library-facts.md ("SLURM 22.05: signals at a
stop"); the launcher's answer is in docs/slurm.md. Each job is the 2-node digits run of the
other job tests; its first attempt is paced (``paced_entry``) so that it is still training when
the stop comes, and requeued attempts run at full speed. Every test follows the job's progress
and SLURM's accounting, never the clock (timeouts are failure guards only).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from spnet_dist import submit as S

from ..conftest import REPO_ROOT
from ..submit_helpers import assert_same_weights, final_weights, job_environment
from . import cluster
from .conftest import EPOCHS
from .jobs import final_attempts, job_config, queue_state, steps, task_pids, wait

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multiprocess]
PACED = "tests.slurm.paced_entry:main"
STEPS = 44 * EPOCHS


@pytest.fixture
def submit(slurm_cluster, digits_root, monkeypatch):
    """``submit(run, pause_s, *overrides)``: the digits job with a paced first attempt; every job
    it submitted is cancelled when the test ends (a failed test leaves nothing running)."""
    job_environment(monkeypatch)
    submitted = []

    def make(run: Path, pause_s: float, *overrides: str):
        monkeypatch.setenv("SPNET_TEST_STEP_PAUSE_S", str(pause_s))
        job = S.submit(job_config(digits_root, run, EPOCHS, *overrides), entry=PACED)
        submitted.append(job.job_id)
        return job

    yield make
    if submitted:
        subprocess.run(["scancel", *submitted], capture_output=True)


def _finish(job, timeout: float = 900) -> tuple[list[str], str]:
    """Wait until the job ended for good (the timeout is a failure guard): the states of its
    attempts and rank 0's log."""
    states = wait(f"job {job.job_id} to end", lambda: final_attempts(job.job_id), timeout=timeout, every=3,
                  log=job.paths.stdout)
    return states, job.paths.stdout.read_text()


def _stops(log: str) -> list[tuple[str, int]]:
    """(signal, step) of every 'stopped by SIG...; saved .../step_N' line of rank 0's log."""
    return [(sig, int(step)) for sig, step in re.findall(r"rank 0: stopped by (SIG\w+); saved \S*step_(\d+)", log)]


def _check_resumed_and_identical(job, log: str, run: Path, reference: Path, stop_step: int):
    last_attempt = log.split("Starting with JobEnvironment")[-1]
    assert f"step_{stop_step:08d}" in last_attempt  # the requeued attempt resumed from the stop's checkpoint
    assert [r["step"] for r in job.results()] == [STEPS] * 2
    assert_same_weights(final_weights(run), final_weights(reference))


def test_real_time_limit_saves_and_requeues_once_before_the_limit(submit, reference, tmp_path):
    """``--time=2`` and ``--signal=USR2@30``: slurmctld sends SIGUSR2 on its 30 s tick, 30 to
    60 s before the limit. The trainer saves at its next stop check, rank 0 requeues
    (``scontrol requeue``), and the attempt is over long before SLURM's time-limit SIGTERMs."""
    run = tmp_path / "run"
    job = submit(run, 1.0, "slurm.timeout_min=2", "slurm.signal_delay_s=30", "slurm.max_timeouts=1")
    states, log = _finish(job)
    assert f"spnet_dist from {REPO_ROOT / 'spnet_dist'}" in log  # the job ran the tree under test
    stops = _stops(log)
    assert [sig for sig, _ in stops] == ["SIGUSR2"], log[-3000:]  # one stop: the paced first attempt
    # One requeue, by the launcher, before the limit (an attempt SLURM ended would be TIMEOUT);
    # a real time limit with T = 2 min is a time-out for submitit (T - 10 min < 0): it is counted.
    assert states == ["REQUEUED", "COMPLETED"], log[-3000:]
    assert log.count("Requeued job") == 1 and "(0 remaining timeouts)" in log
    assert "this job is timed-out" in log and "DUE TO TIME LIMIT" not in log
    _check_resumed_and_identical(job, log, run, reference, stops[0][1])


def _preempt(job_id: str) -> str:
    """Submit a job to the high-priority partition that needs every CPU of both nodes: SLURM
    preempts the job in the low-priority partition to start it. Returns its job id."""
    return subprocess.run(["sbatch", "--parsable", f"--partition={cluster.HIGH}", "--nodes=2", "--exclusive",
                           "--time=1", "--output=/dev/null", f"--comment=preempts {job_id}", "--wrap=true"],
                          capture_output=True, text=True, check=True).stdout.strip().split(";")[0]


def test_preemption_saves_and_requeues_once_without_using_a_time_out(submit, reference, tmp_path):
    """A job in the ``low`` partition (``PreemptMode=REQUEUE``, ``GraceTime``) is preempted by
    a job in ``high``. SLURM sends SIGTERM to the tasks only (no SIGUSR2): the trainer saves,
    rank 0 requeues within the grace time, once; a job that ends by itself inside the grace time
    is not requeued by SLURM (measured), so the launcher must. The preemption is not a time-out:
    ``max_timeouts=0`` with ``timeout_min=10``, where submitit's own rule (elapsed >= T - 10 min)
    would count any signal as one and give up."""
    run = tmp_path / "run"
    job = submit(run, 0.3, f"slurm.partition={cluster.LOW}", "slurm.timeout_min=10", "slurm.max_timeouts=0")
    wait("the first checkpoint", lambda: steps(run), log=job.paths.stdout)
    high = _preempt(job.job_id)
    states, log = _finish(job)
    stops = _stops(log)
    assert [sig for sig, _ in stops] == ["SIGTERM"], log[-3000:]
    # Requeued once, by the launcher (PREEMPTED would mean SLURM killed it at the end of GraceTime).
    assert states == ["REQUEUED", "COMPLETED"], log[-3000:]
    assert wait("the preempting job's end", lambda: final_attempts(high)) == ["COMPLETED"]
    assert log.count("Requeued job") == 1 and "this job is preempted" in log
    _check_resumed_and_identical(job, log, run, reference, stops[0][1])


def test_cancelled_job_saves_and_stays_cancelled(submit, tmp_path):
    """``scancel`` sends each task one SIGTERM and SIGKILLs it KillWait later: the trainer saves,
    and the launcher must not requeue a job its user cancelled (``scontrol requeue`` would
    bring it back)."""
    run = tmp_path / "run"
    job = submit(run, 0.3)
    log_path = job.paths.stdout
    wait("the first checkpoint", lambda: steps(run), log=log_path)
    wait("both tasks", lambda: len(task_pids(job.job_id)) == 2)
    subprocess.run(["scancel", job.job_id], check=True)
    wait("the cancelled job's tasks to exit", lambda: not task_pids(job.job_id), log=log_path)
    # Requeued, it would now be PENDING (until it runs again); cancelled, it leaves the queue.
    wait(f"job {job.job_id} to leave RUNNING/COMPLETING",
         lambda: queue_state(job.job_id) not in ("RUNNING", "COMPLETING"), timeout=120, log=log_path)
    log = log_path.read_text()
    assert [sig for sig, _ in _stops(log)] == ["SIGTERM"], log[-3000:]  # saved inside KillWait
    assert queue_state(job.job_id) == "", log[-3000:]
    assert wait("accounting", lambda: final_attempts(job.job_id)) == ["CANCELLED"]
    assert "Requeued job" not in log and "cancelled?): not requeued" in log
    assert max(steps(run)) < STEPS
