"""Submit spnet-train as a SLURM job through submitit (``launch/submit.py`` is its command line).

The job is the config file's run plus its ``slurm:`` section: ``nodes`` x one task per GPU,
each task calling the same :func:`spnet_dist.training.main` that ``spnet-train`` calls. The
submitted callable, :class:`TrainingJob`, is checkpointable in submitit's sense, but it saves
nothing itself: the trainer saves on the signal. One attempt goes (measured on SLURM 22.05,
docs/slurm.md)

    SLURM signals the tasks: SIGUSR2 slurm.signal_delay_s (to +30 s) before the time limit
    (``--signal=USR2@N``), SIGTERM at a preemption (start of the partition's GraceTime) or a
    ``scancel``
    -> the trainer's handlers set a flag; at a step boundary every rank agrees, saves a
       checkpoint and raises ``Preempted``; the trainer restores submitit's handlers
    -> TrainingJob: rank 0 asks SLURM what became of the job (``scontrol show job``):
       cancelled (ending, not at its time limit) -> exit, not requeued; already requeued by
       SLURM (the grace time ran out) -> exit; otherwise it hands over to submitit's own
       handler, which calls ``TrainingJob.checkpoint()`` (a ``DelayedSubmission`` of the same
       job), requeues it (``scontrol requeue``; the local executor: exit status 144) and exits.
       A preemption is never counted as a time-out. The other ranks exit with status 0 (under
       ``srun --kill-on-bad-exit=1`` a failure status would stop rank 0 mid-requeue)
    -> the requeued attempt calls ``main(cfg)`` again on the same ``run.out_dir``, which resumes
       from the newest valid checkpoint (``run.resume=auto``).

A signal that arrives while the trainer's handlers are not installed (set-up, before the loop)
goes to submitit directly: SIGUSR2 requeues the same way and the next attempt resumes from what
is on disk; SIGTERM is only logged (a preemption then ends at the grace time, when SLURM kills
and requeues the job). submitit counts a SIGUSR2 as a time-out (using up ``slurm.max_timeouts``)
once the attempt ran min(80 %, T - 10 min) of its time limit T.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .config import Config, ConfigError, SlurmConfig, add_config_arguments, load_config, validate

__all__ = ["TrainingJob", "tasks_per_node", "world_size", "validate_slurm", "submitit_folder",
           "slurm_parameters", "sbatch_script", "build_executor", "select_visible_gpu", "SlurmJobState",
           "slurm_job_state", "submit", "cli"]

DEFAULT_ENTRY = "spnet_dist.training:main"

# srun options of every job (the sbatch script's `srun` line). A task that fails ends the step at
# once (SLURM then SIGTERMs the other tasks and SIGKILLs them KillWait later) instead of leaving
# them blocked in a collective until engine.timeout_min; explicit, so the cluster's
# KillOnBadExit default does not decide it. Tasks therefore exit 0 after a saved stop.
SRUN_ARGS = ("--kill-on-bad-exit=1",)

# sbatch options the slurm section owns (or submitit writes itself); slurm.sbatch_args may not
# repeat them, so the section stays the one place that says how big and how long the job is.
_MANAGED_SBATCH = frozenset({
    "nodes", "ntasks", "ntasks-per-node", "gpus", "gpus-per-node", "gpus-per-task", "gres",
    "cpus-per-task", "mem", "mem-per-cpu", "mem-per-gpu", "partition", "account", "qos",
    "constraint", "time", "signal", "job-name", "output", "error", "open-mode", "array", "wckey",
})


# --------------------------------------------------------------------------------------------
# The slurm section
# --------------------------------------------------------------------------------------------


def tasks_per_node(s: SlurmConfig) -> int:
    """Ranks per node: one per GPU, ``slurm.tasks_per_node`` on a CPU job (default 1)."""
    if s.tasks_per_node is not None:
        return s.tasks_per_node
    return s.gpus_per_node if s.gpus_per_node > 0 else 1


def world_size(cfg: Config) -> int:
    """Number of ranks of the job: nodes x tasks per node."""
    return cfg.slurm.nodes * tasks_per_node(cfg.slurm)


def _sbatch_options(args: Sequence[str]) -> dict[str, Any]:
    """``['--exclusive', '--mail-type=END']`` -> ``{'exclusive': True, 'mail-type': 'END'}``."""
    options: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"slurm.sbatch_args: {arg!r} must be a long option '--name' or "
                              "'--name=value' (one option per list item)", "slurm.sbatch_args")
        name, sep, value = arg[2:].partition("=")
        name = name.replace("_", "-")
        if name in _MANAGED_SBATCH:
            raise ConfigError(f"slurm.sbatch_args: {arg!r} is set by the slurm section or by submitit; "
                              "use the slurm field instead", "slurm.sbatch_args")
        options[name] = value if sep else True
    return options


def validate_slurm(cfg: Config, check_paths: bool = True) -> None:
    """Check the slurm section and the run at the job's world size; raise one ConfigError.

    Args:
        cfg: the config (already loaded with :func:`spnet_dist.config.load_config`).
        check_paths: also check data paths (the cluster usually shares this filesystem).
    """
    s = cfg.slurm

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"slurm.{name}: {getattr(s, name)!r} is invalid; {rule}", f"slurm.{name}")

    need(s.nodes >= 1, "nodes", "must be >= 1")
    need(s.gpus_per_node >= 0, "gpus_per_node", "must be >= 0")
    if s.tasks_per_node is not None:
        need(s.tasks_per_node >= 1, "tasks_per_node", "must be >= 1 (or null)")
        need(s.gpus_per_node == 0 or s.tasks_per_node == s.gpus_per_node, "tasks_per_node",
             f"with GPUs the job runs one task per GPU: use null or {s.gpus_per_node} (slurm.gpus_per_node)")
    need(s.cpus_per_task >= 1, "cpus_per_task", "must be >= 1")
    if s.mem_gb is not None:
        need(s.mem_gb >= 0, "mem_gb", "must be >= 0 (0 = all memory of the node, null = partition default)")
    need(s.timeout_min >= 1, "timeout_min", "must be >= 1 minute")
    need(0 <= s.signal_delay_s < s.timeout_min * 60, "signal_delay_s",
         f"must be >= 0 and shorter than the time limit ({s.timeout_min * 60} s)")
    need(s.max_timeouts >= 0, "max_timeouts", "must be >= 0")
    need(bool(s.job_name.strip()), "job_name", "must not be empty")
    if s.cluster == "local":
        need(s.nodes == 1, "nodes", "the local executor runs on this machine only: use 1")
    _sbatch_options(s.sbatch_args)
    # The run itself, at the job's world size (the batch split depends on it).
    validate(cfg, world_size=world_size(cfg), check_paths=check_paths)


def submitit_folder(cfg: Config) -> Path:
    """Where submitit keeps scripts, pickles and logs: ``slurm.log_dir`` or ``<run.out_dir>/submitit``."""
    return Path(cfg.slurm.log_dir or Path(cfg.run.out_dir) / "submitit").expanduser().absolute()


def slurm_parameters(cfg: Config) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` arguments (sbatch names) for the slurm section."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "job_name": s.job_name,
        "nodes": s.nodes,
        "ntasks_per_node": tasks_per_node(s),
        "cpus_per_task": s.cpus_per_task,
        "time": s.timeout_min,
        # -> --signal=USR2@<s>: SIGUSR2 to the tasks of every step, not to the batch shell
        # ("B:USR2" would kill the shell, which runs srun without a trap: measured, the job fails)
        "signal_delay_s": s.signal_delay_s,
        "srun_args": list(SRUN_ARGS),
    }
    if s.gpus_per_node > 0:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb is not None:
        params["mem"] = f"{int(s.mem_gb)}GB" if s.mem_gb == int(s.mem_gb) else f"{int(s.mem_gb * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    if s.setup:
        params["setup"] = list(s.setup)
    extra = _sbatch_options(s.sbatch_args)
    if extra:
        params["additional_parameters"] = extra
    return params


def _submitit_command(folder: Path) -> str:
    # What SlurmExecutor runs in every task (its `_submitit_command_str`).
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(cfg: Config) -> str:
    """The sbatch script ``submit`` would hand to SLURM (``--dry-run``); needs no SLURM.

    Built by submitit's own writer from the same parameters the executor receives, so it is
    the submitted script (tests/slurm compares it with the file submitit writes).
    """
    from submitit.slurm.slurm import _make_sbatch_string

    folder = submitit_folder(cfg)
    return _make_sbatch_string(command=_submitit_command(folder), folder=folder, **slurm_parameters(cfg))


def build_executor(cfg: Config):
    """A submitit executor for the slurm section: ``SlurmExecutor`` or, for
    ``slurm.cluster=local``, ``LocalExecutor`` (tasks on this machine, same signals and requeue)."""
    import submitit

    s, folder = cfg.slurm, submitit_folder(cfg)
    if s.cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=s.max_timeouts)
        executor.update_parameters(timeout_min=s.timeout_min, tasks_per_node=tasks_per_node(s),
                                   gpus_per_node=s.gpus_per_node, signal_delay_s=s.signal_delay_s,
                                   nodes=1, **({"setup": list(s.setup)} if s.setup else {}))
        return executor
    executor = submitit.SlurmExecutor(folder, max_num_timeout=s.max_timeouts)
    executor.update_parameters(**slurm_parameters(cfg))
    return executor


# --------------------------------------------------------------------------------------------
# The submitted callable
# --------------------------------------------------------------------------------------------


def select_visible_gpu(local_rank: int, gpus_per_node: int, environ: Optional[dict] = None) -> Optional[str]:
    """Leave this task exactly one visible GPU: the ``local_rank``-th of those SLURM gave the node.

    ``TorchDistributedEnvironment.export()`` would set ``CUDA_VISIBLE_DEVICES=<local rank>``,
    which names the wrong GPU whenever SLURM already narrowed the list (a job given GPUs 4-7 of
    a shared node has ``CUDA_VISIBLE_DEVICES=4,5,6,7``: local rank 0 must use GPU 4, not 0).
    A list of one (``--gpus-per-task``, per-task cgroups) is already this task's GPU. Afterwards
    the task sees its GPU as ``cuda:0`` and ``init_distributed`` picks it.

    Args:
        local_rank: rank on this node.
        gpus_per_node: ``slurm.gpus_per_node`` (0: a CPU job, nothing to choose).
        environ: environment to edit (default ``os.environ``).

    Returns:
        The chosen ``CUDA_VISIBLE_DEVICES`` value, or None for a CPU job.
    """
    env = os.environ if environ is None else environ
    if gpus_per_node == 0:
        return None
    listed = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    devices = listed or [str(i) for i in range(gpus_per_node)]
    if len(devices) == 1:
        chosen = devices[0]
    elif local_rank < len(devices):
        chosen = devices[local_rank]
    else:
        raise RuntimeError(f"local rank {local_rank} but CUDA_VISIBLE_DEVICES={','.join(devices)} "
                           f"lists {len(devices)} GPUs: more tasks than GPUs on this node")
    env["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


def _resolve(entry: str) -> Callable[[Config], Any]:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


class TrainingJob:
    """The callable submitit runs in every task: export the rank, train, hand a preemption
    over to submitit. Checkpointable: ``checkpoint()`` returns a ``DelayedSubmission`` of the
    same job and saves nothing (the trainer already saved on the signal).

    Args:
        cfg: the run's config (slurm section included); pickled into the job.
        entry: ``"module:function"`` taking the config. ``spnet_dist.training:main`` for real runs;
            tests substitute a small stand-in with the same contract.
    """

    def __init__(self, cfg: Config, entry: str = DEFAULT_ENTRY) -> None:
        self.cfg = cfg
        self.entry = entry

    def __call__(self) -> Any:
        import submitit

        from . import distributed as D
        from .training.signals import Preempted

        dist_env = submitit.helpers.TorchDistributedEnvironment()
        # CUDA_VISIBLE_DEVICES is chosen here, from SLURM's list (see select_visible_gpu).
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        select_visible_gpu(dist_env.local_rank, self.cfg.slurm.gpus_per_node)
        try:
            return _resolve(self.entry)(self.cfg)
        except Preempted as stop:
            self._requeue(dist_env.rank, stop)
        finally:
            D.destroy()

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit (rank 0) to requeue: the same job, which resumes from run.out_dir."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainingJob(self.cfg, self.entry), *args, **kwargs)

    @staticmethod
    def _requeue(rank: int, stop: BaseException) -> None:
        """After the trainer saved and raised ``Preempted``: requeue (rank 0) and exit.

        Ranks other than 0 exit with status 0 through ``SystemExit``, which submitit does not
        catch, so no stale result file is left for the requeued attempt's job.result(); 0 because
        under ``srun --kill-on-bad-exit=1`` a non-zero exit would make SLURM terminate rank 0
        while it requeues.

        Rank 0 first asks SLURM what became of the job (:func:`slurm_job_state`): a job that
        is ending other than by its time limit (``scancel`` sends the same single SIGTERM as a
        preemption, and ``scontrol requeue`` would bring the cancelled job back) is not
        requeued; a job SLURM already requeued (a preemption whose GraceTime ran out during the
        save) is not requeued again. Otherwise it calls the handler submitit installed for its
        signal (USR2) exactly as a signal would: it calls :meth:`checkpoint`, requeues and exits,
        or raises if the job is out of time-outs. submitit counts the stop as a time-out by the
        attempt's elapsed time alone; a preemption (``PreemptTime`` set) is never counted.
        """
        from submitit.core.job_environment import JobEnvironment, SignalHandler

        if rank != 0:
            print(f"rank {rank}: {stop}; rank 0 requeues the job", flush=True)
            sys.exit(0)
        signum = JobEnvironment._usr_sig()
        handler = signal.getsignal(signum)
        owner = getattr(handler, "__self__", None)
        if not isinstance(owner, SignalHandler):
            raise RuntimeError(f"{stop}, but submitit's {signal.Signals(signum).name} handler is not "
                               f"installed (found {handler!r}): cannot requeue") from stop
        # `scontrol requeue` (and SLURM's own requeue or cancel) makes SLURM SIGTERM every process
        # of the job, and that can reach a `scontrol` child of this process before it returns:
        # submitit then raises CalledProcessError and never logs the requeue (seen in CI). An
        # ignored SIGTERM is inherited across exec, so the children finish; this process is
        # exiting anyway (submitit only logs SIGTERM here).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ
        job_id = os.environ.get("SLURM_JOB_ID", "")
        attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        job = slurm_job_state(job_id) if on_slurm else None
        note = "requeueing through submitit"
        if job is not None:
            action = job.action(attempt)
            if action == "ended":
                print(f"rank 0: {stop}; job {job_id} is ending (JobState={job.state}, Reason={job.reason}), "
                      "not at its time limit (cancelled?): not requeued; submit the same config again to resume",
                      flush=True)
                sys.exit(0)
            if action == "requeued":
                print(f"rank 0: {stop}; SLURM already requeued job {job_id} (JobState={job.state}, "
                      f"Restarts={job.restarts}): not requeued again", flush=True)
                sys.exit(0)
            if job.preempted:
                owner.has_timed_out = lambda: False  # submitit would judge by elapsed time alone
                note = f"preempted (PreemptTime={job.preempt_time}): {note} without using a time-out"
        print(f"rank 0: {stop}; {note}", flush=True)
        try:
            handler(signum, None)  # requeues and exits (SystemExit), or raises if out of time-outs
        except subprocess.CalledProcessError:
            # SLURM may requeue the job itself between our look and `scontrol requeue` (the end of
            # a preemption's GraceTime): the command then fails with "Job is pending execution".
            # An error here would leave an error result file that ends job.result() early.
            after = slurm_job_state(job_id) if on_slurm else None
            if after is not None and after.action(attempt) == "requeued":
                print(f"rank 0: SLURM requeued job {job_id} itself (JobState={after.state}, "
                      f"Restarts={after.restarts}): not requeued again", flush=True)
                sys.exit(0)
            raise


# --------------------------------------------------------------------------------------------
# What SLURM did to the job (read by rank 0 after a stop)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmJobState:
    """The fields of ``scontrol show job`` that decide what rank 0 does after a stop.

    Measured on SLURM 22.05 while the tasks of the stopped attempt still run (docs/slurm.md):
    a preemption's grace time shows ``RUNNING`` with ``PreemptTime`` set; ``scancel`` shows
    ``COMPLETING`` with ``Reason=None``; a time limit ``COMPLETING`` with ``Reason=TimeLimit``;
    a job SLURM (or an admin) already requeued ``COMPLETING`` or ``PENDING`` with ``Restarts``
    one higher than the attempt's ``SLURM_RESTART_COUNT``.

    Attributes:
        state: ``JobState`` as scontrol shows it (RUNNING, COMPLETING, PENDING, ...).
        reason: ``Reason`` (None, TimeLimit, ...).
        restarts: ``Restarts``, how often the job was requeued so far.
        preempt_time: ``PreemptTime``, or None when SLURM is not preempting this attempt.
    """

    state: str
    reason: str
    restarts: int
    preempt_time: Optional[str]

    # States of a job that is ending or ended for good unless someone requeues it (TIMEOUT and
    # COMPLETING with Reason=TimeLimit are requeued: the point of the requeue).
    ENDING = frozenset({"COMPLETING", "CANCELLED", "COMPLETED", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                        "DEADLINE", "BOOT_FAIL"})

    @classmethod
    def parse(cls, text: str) -> "SlurmJobState":
        def field(name: str) -> Optional[str]:
            match = re.search(rf"(?:^|\s){name}=(\S*)", text)
            return match.group(1) if match else None

        state, restarts, preempt = field("JobState"), field("Restarts"), field("PreemptTime")
        if state is None or restarts is None or not restarts.isdigit():
            raise ValueError(f"not the output of `scontrol show job`: {text[:200]!r}")
        return cls(state, field("Reason") or "None", int(restarts),
                   None if preempt in (None, "", "None", "Unknown") else preempt)

    @property
    def preempted(self) -> bool:
        return self.preempt_time is not None

    def action(self, attempt: int) -> str:
        """What rank 0 of attempt number ``attempt`` (``SLURM_RESTART_COUNT``, 0 for the first)
        does after a stop: ``"requeued"`` (SLURM or an admin did already: not again), ``"ended"``
        (cancelled or otherwise ending, not by its time limit: do not bring it back) or
        ``"requeue"`` (running, or ending at its time limit)."""
        if self.restarts > attempt or self.state == "PENDING" or self.state.startswith("REQUEUE"):
            return "requeued"
        if self.state in self.ENDING and self.reason != "TimeLimit":
            return "ended"
        return "requeue"


def slurm_job_state(job_id: str, timeout: float = 30) -> Optional[SlurmJobState]:
    """``scontrol show job <id>`` as a :class:`SlurmJobState`; None if SLURM cannot say."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                             timeout=timeout)
        return SlurmJobState.parse(out.stdout) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Submission and command line
# --------------------------------------------------------------------------------------------


def submit(cfg: Config, dry_run: bool = False, entry: str = DEFAULT_ENTRY, out=print):
    """Validate, then submit :class:`TrainingJob` (or print the sbatch script) and report.

    Args:
        cfg: the loaded config.
        dry_run: print the sbatch script (local executor: a description) and submit nothing.
        entry: the training function (see :class:`TrainingJob`).
        out: where the report goes (``print``).

    Returns:
        The submitit job, or None on a dry run.
    """
    validate_slurm(cfg)
    s = cfg.slurm
    if dry_run:
        if s.cluster == "local":
            out(f"# local executor: {tasks_per_node(s)} task(s) on this machine, time limit "
                f"{s.timeout_min} min, SIGUSR2 {s.signal_delay_s} s before it; folder {submitit_folder(cfg)}")
        else:
            out(sbatch_script(cfg))
        return None
    import submitit

    executor = build_executor(cfg)
    # A job submitted from inside another job (or a torchrun shell) must not inherit its
    # SLURM_* / RANK / MASTER_* variables: they would place the new job's ranks wrongly.
    # SLURM_CONF is kept: it says where the cluster is, not where a job runs.
    slurm_conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if slurm_conf is not None:
            os.environ["SLURM_CONF"] = slurm_conf
        try:
            job = executor.submit(TrainingJob(cfg, entry))
        finally:
            os.environ.pop("SLURM_CONF", None)
    logs = job.paths
    out(f"submitted job {job.job_id} ({s.cluster}): {s.nodes} node(s) x {tasks_per_node(s)} task(s), "
        f"run directory {Path(cfg.run.out_dir).absolute()}")
    out(f"  stdout: {logs.stdout}")
    out(f"  stderr: {logs.stderr}")
    out(f"  (task k of the job logs to {str(logs.stdout).replace('_0_log.out', '_<k>_log.out')})")
    return job


def cli(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description="Submit spnet-train as a SLURM job (submitit): nodes x one task per GPU, "
                    "requeued on preemption and time limit, resumed from run.out_dir.")
    add_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    parser.add_argument("--nodes", type=int, help="shorthand for slurm.nodes=N")
    parser.add_argument("--gpus-per-node", type=int, help="shorthand for slurm.gpus_per_node=N")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its final evaluation")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
    overrides = list(args.overrides)
    if args.nodes is not None:
        overrides.append(f"slurm.nodes={args.nodes}")
    if args.gpus_per_node is not None:
        overrides.append(f"slurm.gpus_per_node={args.gpus_per_node}")
    try:
        cfg = load_config(args.config, overrides, world_size=1)  # the job's world size is checked next
        job = submit(cfg, dry_run=args.dry_run)
    except ConfigError as err:
        parser.error(str(err))
    if job is not None and args.wait:
        record = job.results()[0]  # every task returns main()'s record; rank 0's is the one
        print({k: record[k] for k in ("epoch", "step", "top1", "gmacs") if k in record})


if __name__ == "__main__":
    cli()
