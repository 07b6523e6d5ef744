"""Helpers of the SLURM job tests: waiting on progress (never on the clock), the job's attempts
as SLURM accounts them, its task processes, and the config of a 2-node digits job."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from ..submit_helpers import load_job_config, run_overrides


def steps(run: Path) -> list[int]:
    """Step numbers of the checkpoints in ``run`` (sealed or not), ascending."""
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if p.name[5:].isdigit())


def wait(what: str, ok, timeout: float = 300, every: float = 1.0, log: Path | None = None):
    """Poll ``ok()`` until it returns something true and return that; the timeout is only a
    failure guard (the assertion error shows the end of ``log``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ok()
        if value:
            return value
        time.sleep(every)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def job_config(digits_root: Path, run: Path, epochs: int, *overrides: str):
    """The digits run as a 2-node x 1-task CPU job (later overrides win)."""
    return load_job_config(*run_overrides(digits_root, run, epochs), "slurm.nodes=2", "slurm.tasks_per_node=1",
                           "slurm.cpus_per_task=1", "slurm.partition=debug", "slurm.timeout_min=30",
                           "slurm.signal_delay_s=60", "slurm.max_timeouts=3", "engine.timeout_min=1", *overrides)


def attempts(job_id: str) -> list[str]:
    """The state of each attempt of the job, oldest first, as accounting records them:
    ``REQUEUED`` (``scontrol requeue``), ``PREEMPTED`` (killed and requeued by SLURM at the end
    of a preemption's GraceTime), ``TIMEOUT``, ``CANCELLED``, ``COMPLETED``, ``FAILED``, ..."""
    out = subprocess.run(["sacct", "-j", job_id, "--duplicates", "--allocations", "--noheader", "--parsable2",
                          "--format=State"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]  # "CANCELLED by 0" -> CANCELLED


FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE"})


def final_attempts(job_id: str) -> list[str]:
    """:func:`attempts` once the job left the queue and accounting recorded its last attempt's
    end (slurmdbd can lag squeue by a second or so), else an empty list."""
    if queue_state(job_id):
        return []
    states = attempts(job_id)
    return states if states and states[-1] in FINAL_STATES else []


def queue_state(job_id: str) -> str:
    """The job's state in the queue (``PENDING``, ``RUNNING``, ``COMPLETING``, ...), '' once it left."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip()


def task_pids(job_id: str) -> dict[int, int]:
    """{global rank: pid} of this job's running submitit tasks, read from /proc (the tasks'
    environment names the job and the rank; both emulated nodes run on this machine)."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"submitit.core._submit" not in (proc / "cmdline").read_bytes():
                continue
            env = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode() and b"SLURM_PROCID" in env:
            ranks[int(env[b"SLURM_PROCID"])] = int(proc.name)
    return ranks
