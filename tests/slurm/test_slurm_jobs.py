"""spnet-train on a real SLURM (two emulated nodes n1/n2 on this machine, gloo on CPU).

* plain ``srun python -m spnet_dist.train`` places its ranks from SLURM's variables, and the
  batch script itself (no srun) refuses instead of training one rank of N;
* ``launch/submit.py``'s job on 2 nodes is preempted (SIGTERM + SIGUSR2), requeued, timed out
  (SIGUSR2), requeued, and finishes with the weights of an uninterrupted run (acceptance 4);
* a rank killed with SIGKILL ends the job instead of hanging, and the requeued job resumes
  from the last checkpoint to the same final weights (acceptance 6, second half).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spnet_dist import submit as S

from ..conftest import REPO_ROOT
from ..dist_helpers import child_env
from ..submit_helpers import DEMO, assert_same_weights, final_weights, job_environment, run_overrides
from .conftest import EPOCHS
from .jobs import job_config, steps, task_pids, wait

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multiprocess]


def _srun_env() -> dict[str, str]:
    # child_env drops RANK/MASTER_* this test process may hold; srun passes the rest on.
    return child_env({"TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")})


def test_plain_srun_reads_rank_and_world_from_slurm(slurm_cluster, digits_root, tmp_path):
    run = tmp_path / "srun"
    cmd = ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10",
           sys.executable, "-m", "spnet_dist.train", "--config", str(DEMO),
           *run_overrides(digits_root, run, 1), "run.max_steps=4", "run.checkpoint_every=0"]
    out = subprocess.run(cmd, env=_srun_env(), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    # One job of world size 2 (not two world-size-1 jobs racing for one directory).
    assert out.stdout.count("world size 2") == 1 and "world size 1" not in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4]


def test_batch_script_without_srun_refuses_a_multi_task_job(slurm_cluster, digits_root, tmp_path):
    log = tmp_path / "batch.out"
    train = " ".join([sys.executable, "-m", "spnet_dist.train", "--config", str(DEMO),
                      *run_overrides(digits_root, tmp_path / "run", 1)])
    out = subprocess.run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                          f"--output={log}", f"--wrap={train}"], env=_srun_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    assert "SLURM_NTASKS=2 but this process is its batch script" in log.read_text()
    assert not (tmp_path / "run" / "checkpoints").exists()


def _job_config(digits_root, run: Path, epochs: int):
    return job_config(digits_root, run, epochs)


def test_submitted_job_survives_preemption_and_time_out_with_identical_weights(
        slurm_cluster, digits_root, reference, tmp_path, monkeypatch, capsys):
    """The first interruption is SLURM's preemption pattern (SIGTERM, then SIGUSR2:
    ``job._interrupt()``), the second the time-limit warning alone (SIGUSR2, what
    ``--signal=USR2@N`` delivers: ``job._interrupt(timeout=True)``). submitit itself classifies a
    signal by the attempt's elapsed time (time-out only after min(0.8 T, T - 10 min)), so with
    a 30-minute limit it requeues both without using up ``max_timeouts``; the local-executor
    test covers the counted time-out. Each signal comes once the attempt has written a
    checkpoint past its resume point: the test follows progress, not the clock."""
    job_environment(monkeypatch)
    epochs = EPOCHS
    run = tmp_path / "run"
    cfg = _job_config(digits_root, run, epochs)
    job = S.submit(cfg)
    printed = capsys.readouterr().out
    assert f"submitted job {job.job_id}" in printed and str(job.paths.stdout) in printed
    # --dry-run prints exactly the script that was submitted
    assert job.paths.submission_file.read_text() == S.sbatch_script(cfg)
    log = job.paths.stdout

    def requeues() -> int:
        return log.read_text().count("Requeued job") if log.exists() else 0

    wait("the first checkpoint", lambda: steps(run), log=log)
    job._interrupt()  # preemption: scancel --signal SIGTERM, then --signal USR2
    wait("the first requeue", lambda: requeues() == 1, log=log)
    first_stop = max(steps(run))
    wait("progress after the first resume", lambda: max(steps(run)) > first_stop, log=log)
    job._interrupt(timeout=True)  # time limit: scancel --signal USR2
    wait("the second requeue", lambda: requeues() == 2, log=log)
    records = job.results()
    text = log.read_text()
    assert text.count("Starting with JobEnvironment") == 3  # three attempts of one job id
    assert [r["step"] for r in records] == [44 * epochs] * 2
    assert_same_weights(final_weights(run), final_weights(reference))
    print(f"slurm job {job.job_id}: stopped at step {first_stop} (preempted) and later (timed out), "
          f"finished at step {records[0]['step']}")


def test_killed_rank_ends_the_job_and_the_requeued_job_resumes(
        slurm_cluster, digits_root, reference, tmp_path, monkeypatch):
    job_environment(monkeypatch)
    epochs = EPOCHS
    run = tmp_path / "run"
    job = S.submit(_job_config(digits_root, run, epochs))
    log = job.paths.stdout
    wait("the first checkpoint", lambda: steps(run), log=log)
    pids = wait("both tasks", lambda: (p := task_pids(job.job_id)) and len(p) == 2 and p)
    killed_at = time.monotonic()
    subprocess.run(["kill", "-9", str(pids[1])], check=True)
    # srun --kill-on-bad-exit=1 ends the step (rank 0 gets SIGTERM, SIGKILL KillWait later), and
    # rank 0's next collective fails anyway (gloo sees the peer gone; engine.timeout_min bounds a
    # hang): the job ends FAILED instead of hanging until its time limit.
    state = wait("the job to end", lambda: (s := job.get_info(mode="force").get("State")) and
                  not s.startswith(("RUNNING", "PENDING", "REQUEU", "COMPLETING")) and s, timeout=300, every=3)
    ended_after = time.monotonic() - killed_at
    assert state.startswith("FAILED"), state
    resume_from = max(steps(run))
    assert resume_from < 44 * epochs
    # Requeue it as SLURM would after a node failure. The failed attempt left rank 0's error
    # result; the requeued attempt writes the real one.
    for stale in job.paths.folder.glob(f"{job.job_id}_*_result.pkl"):
        stale.unlink()
    job.watcher.clear()
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    # Until the controller has moved it, the job still reads FAILED, and job.results() would take
    # that final state for the answer and give up waiting for a result file.
    wait("the job to leave FAILED", lambda: (s := job.get_info(mode="force").get("State")) and
          not s.startswith("FAILED") and s, timeout=120, every=2)
    records = job.results()
    last_attempt = log.read_text().split("Starting with JobEnvironment")[-1]
    assert f"step_{resume_from:08d}" in last_attempt  # it resumed from the newest checkpoint
    assert [r["step"] for r in records] == [44 * epochs] * 2
    assert_same_weights(final_weights(run), final_weights(reference))
    print(f"killed rank 1: job ended ({state}) after {ended_after:.0f} s; requeued job resumed from step "
          f"{resume_from} and finished identical to the uninterrupted run")
