"""spnet_dist.submit / launch/submit.py: the slurm section, the sbatch script, GPU choice, the
checkpointable callable, and submitit's local executor requeueing a real 2-rank run."""
from __future__ import annotations

import logging
import math
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from spnet_dist import submit as S
from spnet_dist.checkpoint import config_differences
from spnet_dist.config import ConfigError, load_config, parse_args, to_dict

from .conftest import REPO_ROOT
from .submit_helpers import (DEMO, assert_same_weights, final_weights, job_environment, load_job_config,
                             run_overrides, run_reference)

SLURM_FIELDS = ["slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.cpus_per_task=10", "slurm.mem_gb=480",
                "slurm.partition=gpu", "slurm.account=proj42", "slurm.qos=high", "slurm.timeout_min=2880",
                "slurm.signal_delay_s=300", "slurm.constraint=a100&ib", "slurm.job_name=r50",
                "slurm.sbatch_args=[--exclusive, --mail-type=END]", "slurm.setup=[module load cuda/12.4]",
                "run.out_dir=/checkpoint/me/r50"]


def test_dry_run_prints_the_sbatch_script_with_every_slurm_field():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "submit.py"), "--config", str(DEMO),
                          "--dry-run", *SLURM_FIELDS], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",  # one task per GPU
                 "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=10", "#SBATCH --mem=480GB",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --qos=high",
                 "#SBATCH --time=2880", "#SBATCH --signal=USR2@300", "#SBATCH --constraint='a100&ib'",
                 "#SBATCH --job-name=r50", "#SBATCH --exclusive", "#SBATCH --mail-type=END",
                 "module load cuda/12.4", "#SBATCH --output=/checkpoint/me/r50/submitit/%j_0_log.out"):
        assert line + "\n" in script, line
    # SIGUSR2 goes to the tasks (not "B:", the batch shell); a failed task ends the step at once
    srun = re.search(r"^srun .* -u -m submitit.core._submit /checkpoint/me/r50/submitit$", script, re.M)
    assert srun and " --kill-on-bad-exit=1 " in srun.group(0)
    assert not (REPO_ROOT / "checkpoint").exists()  # a dry run creates nothing


def test_cli_shorthands_and_cpu_tasks():
    cfg = load_job_config("slurm.tasks_per_node=2", "slurm.nodes=2", "engine.global_batch_size=64")
    params = S.slurm_parameters(cfg)
    assert (params["nodes"], params["ntasks_per_node"], S.world_size(cfg)) == (2, 2, 4)
    assert "gpus_per_node" not in params  # a CPU job asks for no GPU
    lines = []
    S.submit(load_job_config("slurm.nodes=4"), dry_run=True, out=lines.append)
    assert "#SBATCH --nodes=4\n" in lines[0] and "#SBATCH --ntasks-per-node=1\n" in lines[0]


@pytest.mark.parametrize("overrides, field", [
    (["slurm.gpus_per_node=8", "slurm.tasks_per_node=4"], "slurm.tasks_per_node"),
    (["slurm.sbatch_args=[--time=10]"], "slurm.sbatch_args"),
    (["slurm.sbatch_args=[-N2]"], "slurm.sbatch_args"),
    (["slurm.signal_delay_s=600", "slurm.timeout_min=5"], "slurm.signal_delay_s"),
    (["slurm.cluster=local", "slurm.nodes=2"], "slurm.nodes"),
    (["slurm.nodes=0"], "slurm.nodes"),
    # 64 images over 3 nodes x 8 GPUs do not split: the run is checked at the job's world size
    (["slurm.nodes=3", "slurm.gpus_per_node=8"], "engine.global_batch_size"),
])
def test_bad_slurm_section_is_one_line_naming_the_field(overrides, field):
    cfg = load_job_config(*overrides)
    with pytest.raises(ConfigError) as err:
        S.validate_slurm(cfg, check_paths=False)
    assert err.value.field == field and "\n" not in str(err.value)


def test_spnet_train_accepts_and_ignores_the_slurm_section(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(f"base: {DEMO}\nslurm:\n  nodes: 8\n  gpus_per_node: 4\n  partition: gpu\n")
    cfg = parse_args(["--config", str(config), "slurm.qos=high"])
    assert (cfg.slurm.nodes, cfg.slurm.qos) == (8, "high")
    # A run resumed under a different job shape (fewer nodes after a requeue, another
    # partition) resumes: the slurm section is never a reason to refuse a checkpoint.
    plain = load_config(DEMO)
    assert config_differences(to_dict(plain), to_dict(cfg)) == []


@pytest.mark.parametrize("visible, local_rank, expected", [
    ("4,5,6,7", 0, "4"),  # SLURM gave this job GPUs 4-7 of a shared node: local rank 0 -> GPU 4
    ("4,5,6,7", 3, "7"),
    ("GPU-aa,GPU-bb", 1, "GPU-bb"),  # UUIDs
    ("2", 1, "2"),  # already narrowed per task (--gpus-per-task=1 / cgroups): keep it
    (None, 2, "2"),  # nothing listed: the node's GPUs 0..n-1
])
def test_each_task_keeps_exactly_its_own_gpu(visible, local_rank, expected):
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert S.select_visible_gpu(local_rank, 4, env) == expected
    assert env["CUDA_VISIBLE_DEVICES"] == expected


def test_gpu_choice_refuses_more_tasks_than_gpus_and_leaves_cpu_jobs_alone():
    with pytest.raises(RuntimeError, match="more tasks than GPUs"):
        S.select_visible_gpu(2, 2, {"CUDA_VISIBLE_DEVICES": "0,1"})
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert S.select_visible_gpu(1, 0, env) is None and env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_checkpoint_resubmits_the_same_job_without_saving(tmp_path):
    cfg = load_job_config(f"run.out_dir={tmp_path / 'run'}")
    job = S.TrainingJob(cfg, entry="spnet_dist.training:main")
    delayed = job.checkpoint()
    again = delayed.function
    assert isinstance(again, S.TrainingJob) and again.cfg == cfg and again.entry == job.entry
    assert (delayed.args, delayed.kwargs) == ((), {})
    assert not (tmp_path / "run").exists()  # saving is the training loop's job, not checkpoint()'s


class _Submitit:
    """submitit's SIGUSR2 handler (``SignalHandler.checkpoint_and_try_requeue``) installed as in a
    job, with a stand-in environment whose ``_requeue`` runs ``requeue_command`` and records the
    countdown it was given (3 time-outs left before this stop)."""

    def __init__(self, requeue_command: list[str], timed_out: bool = False):
        from submitit.core.job_environment import SignalHandler

        self.requeued: list[int] = []
        outer = self

        class Environment:
            global_rank = 0

            def _requeue(self, countdown):
                subprocess.check_call(requeue_command)
                outer.requeued.append(countdown)

        handler = SignalHandler.__new__(SignalHandler)  # only what checkpoint_and_try_requeue reads
        handler.env, handler._logger = Environment(), logging.getLogger("test")
        handler.has_timed_out = lambda: timed_out
        handler._delayed = type("Delayed", (), {"_timeout_countdown": 3, "function": None})()
        handler._exit = lambda: sys.exit(-1)
        self.handler = handler

    def __enter__(self):
        self.saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
        signal.signal(signal.SIGUSR2, self.handler.checkpoint_and_try_requeue)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def test_the_requeue_command_survives_the_sigterm_slurm_sends_the_job():
    """SLURM answers `scontrol requeue` by SIGTERMing every process of the job, the still running
    `scontrol` included. Here the stand-in requeue command SIGTERMs itself: it must survive."""
    kill_self = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]
    with _Submitit(kill_self) as submitit, pytest.raises(SystemExit):
        S.TrainingJob._requeue(0, RuntimeError("stopped by SIGTERM"))
    assert submitit.requeued == [3]


# `scontrol show job --oneliner` of a job whose tasks just stopped, recorded on the emulated
# SLURM 22.05 (tests/slurm) while the tasks still ran, shortened to the fields around the ones
# that matter.
_HEAD = "JobId=7 JobName=spnet UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901757 Nice=0 QOS=normal "
SCONTROL = {
    # SIGUSR2 before the time limit, or `scancel --signal=...`
    "running": _HEAD + "JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 "
                       "ExitCode=0:0 RunTime=00:00:31 PreemptEligibleTime=2026-12-06T21:56:39 PreemptTime=None",
    # a preemption's GraceTime (SIGTERM to the tasks)
    "preempted": _HEAD + "JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
                         "Reboot=0 ExitCode=0:0 PreemptEligibleTime=2026-12-06T21:56:39 "
                         "PreemptTime=2026-12-06T21:56:46",
    # `scancel` (one SIGTERM to the tasks, SIGKILL KillWait later)
    "cancelled": _HEAD + "JobState=COMPLETING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
                         "Reboot=0 ExitCode=0:15 RunTime=00:00:05 TimeLimit=00:10:00",
    # the time limit itself (two SIGTERMs to the tasks, SIGKILL KillWait later)
    "timed_out": _HEAD + "JobState=COMPLETING Reason=TimeLimit Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
                         "Reboot=0 ExitCode=0:15 RunTime=00:01:27 TimeLimit=00:01:00",
    # the end of a preemption's GraceTime: SLURM kills the job and requeues it
    "requeued_by_slurm": _HEAD + "JobState=COMPLETING Reason=None Dependency=(null) Requeue=1 Restarts=1 "
                                 "BatchFlag=1 Reboot=0 ExitCode=0:0",
    # ... and once its processes are gone
    "pending": _HEAD + "JobState=PENDING Reason=BeginTime Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 "
                       "Reboot=0 ExitCode=0:0 PreemptEligibleTime=2026-12-06T21:24:25 PreemptTime=None",
}


@pytest.mark.parametrize("case, attempt, action, preempted", [
    ("running", 0, "requeue", False),
    ("preempted", 0, "requeue", True),   # SLURM does not requeue a job that ends inside GraceTime
    ("cancelled", 0, "ended", False),    # the user wants it gone
    ("timed_out", 0, "requeue", False),  # saved after the limit, inside KillWait: still requeueable
    ("requeued_by_slurm", 0, "requeued", False),
    ("pending", 0, "requeued", False),
    ("running", 1, "requeue", False),    # the second attempt (SLURM_RESTART_COUNT=1)
    ("requeued_by_slurm", 1, "ended", False),  # the same record seen from attempt 1 is a cancel
])
def test_scontrol_job_state_decides_what_rank_0_does(case, attempt, action, preempted):
    line = SCONTROL[case].replace("Restarts=0", f"Restarts={attempt}") if case == "running" else SCONTROL[case]
    job = S.SlurmJobState.parse(line)
    assert (job.action(attempt), job.preempted) == (action, preempted)


def test_scontrol_output_that_is_not_a_job_is_refused():
    with pytest.raises(ValueError):
        S.SlurmJobState.parse("slurm_load_jobs error: Invalid job id specified")


@pytest.fixture
def on_slurm(monkeypatch):
    """Rank 0 of attempt 0 of SLURM job 7; ``states`` feeds ``scontrol show job`` one answer per
    call (the last one repeats)."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    states: list[str] = []
    asked: list[str] = []

    def job_state(job_id):
        asked.append(job_id)
        return S.SlurmJobState.parse(SCONTROL[states[min(len(asked), len(states)) - 1]])

    monkeypatch.setattr(S, "slurm_job_state", job_state)
    return states


def test_a_preemption_is_requeued_without_using_a_time_out(on_slurm, capsys):
    """submitit judges by elapsed time alone (every stop of a job with T <= 10 min is a time-out);
    SLURM's PreemptTime says it is a preemption, which must not use up slurm.max_timeouts."""
    on_slurm.append("preempted")
    with _Submitit(["true"], timed_out=True) as submitit, pytest.raises(SystemExit):
        S.TrainingJob._requeue(0, RuntimeError("stopped by SIGTERM"))
    assert submitit.requeued == [3]  # not 2
    assert "preempted (PreemptTime=2026-12-06T21:56:46)" in capsys.readouterr().out


def test_a_cancelled_job_is_not_requeued(on_slurm, capsys):
    on_slurm.append("cancelled")
    with _Submitit(["true"]) as submitit, pytest.raises(SystemExit) as exit_:
        S.TrainingJob._requeue(0, RuntimeError("stopped by SIGTERM"))
    assert exit_.value.code == 0 and submitit.requeued == []
    assert "is ending (JobState=COMPLETING, Reason=None), not at its time limit (cancelled?): not requeued" \
        in capsys.readouterr().out


def test_a_job_slurm_requeued_during_the_save_is_not_requeued_again(on_slurm, capsys):
    """The grace time ends between rank 0's look and its `scontrol requeue`, which then fails
    ("Job is pending execution"): that is a requeue, not an error (an error result file would
    end the client's job.result() while the job runs on)."""
    on_slurm.extend(["preempted", "pending"])
    with _Submitit(["false"]) as submitit, pytest.raises(SystemExit) as exit_:
        S.TrainingJob._requeue(0, RuntimeError("stopped by SIGTERM"))
    assert exit_.value.code == 0 and submitit.requeued == []
    assert "requeued job 7 itself" in capsys.readouterr().out


def test_a_failed_requeue_of_a_running_job_is_an_error(on_slurm):
    on_slurm.append("running")
    with _Submitit(["false"]), pytest.raises(subprocess.CalledProcessError):
        S.TrainingJob._requeue(0, RuntimeError("stopped by SIGUSR2"))


def test_other_ranks_exit_0_after_a_stop(on_slurm):
    """Under srun --kill-on-bad-exit=1 a non-zero exit would make SLURM stop rank 0 mid-requeue."""
    with pytest.raises(SystemExit) as exit_:
        S.TrainingJob._requeue(1, RuntimeError("stopped by SIGTERM"))
    assert exit_.value.code == 0


# --------------------------------------------------------------------------------------------
# submitit's local executor: a 2-task job that hits its time limit and requeues (acceptance 3)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_executor_job_survives_two_time_limits_with_identical_weights(digits_root, tmp_path, monkeypatch,
                                                                           capsys):
    """Each attempt gets SIGUSR2 from the local controller ``signal_delay_s`` before its time
    limit: the trainer saves, rank 0 requeues through submitit (exit 144), the controller
    restarts both tasks, ``main(cfg)`` resumes.

    The signal comes at a wall-clock time, so where it lands depends on this machine's speed,
    which varies several-fold with the load of the shared cores. The uninterrupted reference
    runs first and measures it: its set-up time (until its step-20 checkpoint appears, minus 20
    steps) and its wall time per step with evaluations and checkpoint saves included. The signal
    is placed at set-up + a quarter of the steps. The reference's set-up includes torchrun's own
    start, which a job attempt does not pay, so an attempt trains more than planned; a quarter
    gives 3-4 time limits. submitit would allow 10 starts (max_timeouts=9), but the local
    controller restarts a job at most 6 times: a machine that gets about 1.5 times slower
    between the reference and the job runs out of them (seen once at a load average of 8 on the
    2 shared cores). Nothing is asserted about time.
    """
    job_environment(monkeypatch)
    # Long enough that a third of the run (one attempt) is several seconds more than the
    # jitter of the set-up time estimated from the reference.
    epochs = 10
    steps = 44 * epochs
    reference, first_checkpoint = tmp_path / "reference", tmp_path / "reference" / "checkpoints" / "step_00000020"
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_reference, digits_root, reference, epochs)
        while not first_checkpoint.exists() and not running.done():
            time.sleep(0.05)  # it exists until the step-80 save prunes it (3 kept): seconds later
        first_at = time.monotonic() - started
        running.result()
    total = time.monotonic() - started
    assert first_at < total, "the reference never wrote its step-20 checkpoint"
    # Evaluations and periodic saves are spread over the run: counting them as set-up (the
    # earlier estimate) gave each attempt far more than a third, and once only one time limit.
    # So did a 5 s floor under the set-up estimate (measured: 3.7 s here, 2.3 s in an attempt).
    per_step = (total - first_at) / (steps - 20)
    signal_at = max(first_at - 20 * per_step, 0.0) + steps * per_step / 4
    timeout_min = max(2, math.ceil((signal_at + 45) / 60))  # >= 45 s after the signal to save and exit
    run = tmp_path / "run"
    cfg = load_job_config(*run_overrides(digits_root, run, epochs), "slurm.cluster=local",
                          "slurm.tasks_per_node=2", f"slurm.timeout_min={timeout_min}",
                          f"slurm.signal_delay_s={round(timeout_min * 60 - signal_at)}", "slurm.max_timeouts=9")
    job = S.submit(cfg)
    printed = capsys.readouterr().out
    assert f"submitted job {job.job_id}" in printed and str(job.paths.stdout) in printed
    records = job.results()  # every task returns main()'s final evaluation
    log = job.paths.stdout.read_text()  # task 0's log, appended by every attempt
    timeouts = log.count("Requeued job")
    assert timeouts >= 2, f"the job hit its time limit {timeouts} time(s), expected at least 2:\n{log[-3000:]}"
    assert log.count("Starting with JobEnvironment") == timeouts + 1  # every attempt started once
    assert [r["step"] for r in records] == [44 * epochs] * 2
    assert_same_weights(final_weights(run), final_weights(reference))
    stops = re.findall(r"stopped by SIGUSR2; saved \S*step_(\d+)", log)
    print(f"local executor: signal {signal_at:.0f} s into each attempt, {timeouts} time limits "
          f"(saved at steps {[int(n) for n in stops]}), final step {records[0]['step']}, weights identical "
          "to the uninterrupted run")
