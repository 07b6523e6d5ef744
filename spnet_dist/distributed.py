"""Process-group helpers shared by the trainer, the EMA teacher and the tools.

One entry point, :func:`init_distributed`, covers every way a job starts:

* a plain ``python`` process (laptop demo, unit tests): a 1-rank group on an in-memory store;
* ``torchrun`` and the ``deepspeed`` launcher: both export ``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
* SLURM through submitit (``launch/submit.py``): ``TorchDistributedEnvironment().export()``
  exports the same variables; the launcher leaves each task one visible GPU (``cuda:0``);
* plain ``srun python -m spnet_dist.train ...`` (no torchrun): every task reads its place from
  SLURM (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, the first host of the step's node
  list as master), see :func:`slurm_launch_env`. Without this, N tasks would each start a
  world-size-1 job on ``cuda:0`` and race for one run directory.

Every other helper works without an initialised group (it then behaves as a world of one), so
library code can call them unconditionally. The only global state is torch.distributed's own.

The collectives here exist because DeepSpeed only keeps *parameters* in sync: BatchNorm buffers
drift apart across ranks (measured, see ``docs/library-facts.md``) and the EMA teacher lives outside
the engine, yet every rank must hold a bit-identical teacher.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = [
    "DistInfo",
    "init_distributed",
    "slurm_launch_env",
    "first_host",
    "resolve_backend",
    "get_rank",
    "get_local_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "destroy",
    "deepspeed_shm_path",
    "unlink_deepspeed_shm",
    "all_reduce_mean_",
    "broadcast_",
    "average_buffers_",
    "broadcast_object",
    "RankZeroError",
    "run_on_main",
    "count_rank_mismatches",
]

_BACKENDS = ("auto", "nccl", "gloo")
# Variables a launcher (torchrun, deepspeed, submitit) exports; RANK + WORLD_SIZE decide
# whether we were launched or run as a single plain process.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        local_rank: rank on this node (selects the GPU).
        world_size: number of processes in the job.
        device: the device this rank computes on (``cuda:i`` or ``cpu``).
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def resolve_backend(backend: str = "auto") -> str:
    """Map the config's backend name to a torch.distributed backend.

    Args:
        backend: ``"auto"`` (NCCL when CUDA is available, else gloo), ``"nccl"`` or ``"gloo"``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs a CUDA device; use 'gloo' or 'auto' on CPU")
    return backend


def _select_device(local_rank: int) -> torch.device:
    """The device for this rank: ``cuda:local_rank``, or ``cuda:0`` when only one GPU is visible.

    submitit exports ``CUDA_VISIBLE_DEVICES=<local rank>``, so every task sees exactly one GPU
    (index 0) while LOCAL_RANK still counts 0..n-1 on the node.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank < n:
        return torch.device("cuda", local_rank)
    if n == 1:
        return torch.device("cuda", 0)
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} but {n} GPUs are visible: more processes than GPUs on this node"
    )


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-004,9],cpu1"`` -> ``"gpu003"``.

    Brackets hold comma-separated numbers or ranges whose zero padding is part of the name;
    several bracket groups in one name (``"r[1-2]n[05-06]"``) are expanded left to right.

    Args:
        nodelist: ``SLURM_JOB_NODELIST`` / ``SLURM_STEP_NODELIST``.
    """
    host, i = [], 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            end = nodelist.find("]", i)
            if end < 0:
                raise ValueError(f"malformed SLURM node list {nodelist!r}: '[' without ']'")
            host.append(re.split(r"[,-]", nodelist[i + 1:end])[0])
            i = end + 1
        else:
            host.append(nodelist[i])
            i += 1
    if not host:
        raise ValueError(f"malformed SLURM node list {nodelist!r}: no host name")
    return "".join(host)


def slurm_launch_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher variables for a task started by plain ``srun`` (no torchrun), or ``{}``.

    Measured on SLURM 22.05: inside an ``srun`` step every task has ``SLURM_STEP_ID``,
    ``SLURM_PROCID`` (global rank), ``SLURM_LOCALID`` and ``SLURM_NTASKS`` (the *step's* task
    count); the batch script itself has ``SLURM_PROCID=0`` and the *job's* ``SLURM_NTASKS`` but
    no ``SLURM_STEP_ID``. Returns ``{}`` when not in a step, or in a step of one task (a plain
    process). ``MASTER_ADDR`` is the first host of the step's node list (global rank 0 runs
    there); ``MASTER_PORT`` is derived from the job and step ids so that every task computes
    the same port without talking, and two jobs sharing a node differ. Both can be overridden
    by exporting them.

    Args:
        environ: the environment to read (default ``os.environ``).

    Raises:
        RuntimeError: a multi-task allocation seen from the batch script (``python`` run
            without ``srun`` would start one rank of N), or a step whose variables are
            incomplete. One line, saying what to run instead.
    """
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env:
        return {}
    if "SLURM_STEP_ID" not in env:
        ntasks = int(env.get("SLURM_NTASKS", "1"))
        if ntasks > 1:
            raise RuntimeError(
                f"SLURM job with SLURM_NTASKS={ntasks} but this process is its batch script, not one of "
                "its tasks: start the trainer with `srun python -m spnet_dist.train ...` (one task per "
                "rank), `srun torchrun ...` (one task per node) or launch/submit.py")
        return {}
    missing = [v for v in ("SLURM_LOCALID", "SLURM_NTASKS") if v not in env]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodelist is None:
        missing.append("SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
    if missing:
        raise RuntimeError(f"srun task without {', '.join(missing)}: cannot place this rank; "
                           "launch with torchrun or launch/submit.py instead")
    world = int(env["SLURM_NTASKS"])
    if world == 1:
        return {}
    job_id = int(env.get("SLURM_JOB_ID", "0"))
    step_id = int(env["SLURM_STEP_ID"]) if env["SLURM_STEP_ID"].isdigit() else 0
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + (job_id * 7 + step_id) % 40000),
    }


# Launcher variables init_distributed exported for a plain process (DeepSpeed reads them). They
# must not outlive the group: a second init in the same process (main() called twice, the next
# test) would otherwise take them for a launcher's and look for MASTER_ADDR.
_EXPORTED_FOR_PLAIN_PROCESS: list[str] = []


def init_distributed(backend: str = "auto", timeout: timedelta | None = None) -> DistInfo:
    """Initialise torch.distributed once and describe this rank. Idempotent.

    Launched jobs (torchrun, ``deepspeed``, ``accelerate launch``, submitit) are recognised by
    ``RANK`` and ``WORLD_SIZE`` in the environment and initialised with ``env://``; tasks of a
    plain ``srun`` export those variables from SLURM's first (:func:`slurm_launch_env`). A plain process gets a
    1-rank group on an in-memory ``HashStore`` (no port to pick, nothing to collide with), and
    ``RANK=0``, ``LOCAL_RANK=0``, ``WORLD_SIZE=1`` are exported because DeepSpeed's engine reads
    ``LOCAL_RANK`` from the environment.

    Args:
        backend: ``"auto"``, ``"nccl"`` or ``"gloo"`` (see :func:`resolve_backend`).
        timeout: collective timeout; ``None`` keeps torch's default.

    Returns:
        DistInfo for this process. On CUDA the current device is set to ``DistInfo.device``.
    """
    name = resolve_backend(backend)
    if dist.is_available() and dist.is_initialized():
        active = dist.get_backend()
        if backend != "auto" and name not in str(active):
            raise RuntimeError(f"process group already initialised with {active!r}, not {name!r}")
        return _current_info()

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched:
        from_slurm = slurm_launch_env()
        os.environ.update(from_slurm)  # DeepSpeed reads LOCAL_RANK etc. from the environment too
        launched = bool(from_slurm)
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if launched:
        missing = [v for v in _LAUNCH_VARS if v not in os.environ]
        if missing:
            raise RuntimeError(f"RANK/WORLD_SIZE are set but {missing} are not: incomplete launcher env")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
    else:
        rank, world_size, local_rank = 0, 1, 0
        for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            if var not in os.environ:
                os.environ[var] = value
                _EXPORTED_FOR_PLAIN_PROCESS.append(var)  # destroy() takes them back
        kwargs["store"] = dist.HashStore()

    device = _select_device(local_rank)
    if device.type == "cuda":
        # Bind before init so NCCL creates its communicator on the right GPU (device_id makes
        # the init eager and lets barrier() know its device).
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    if launched:
        kwargs["init_method"] = "env://"
    dist.init_process_group(backend=name, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _current_info() -> DistInfo:
    local_rank = get_local_rank()
    return DistInfo(get_rank(), local_rank, get_world_size(), _select_device(local_rank))


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


# --------------------------------------------------------------------------------------------
# Queries that work with or without a process group
# --------------------------------------------------------------------------------------------


def get_rank() -> int:
    """Global rank; before initialisation the launcher's ``RANK`` (0 for a plain process)."""
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", 0))


def get_local_rank() -> int:
    """Rank on this node (``LOCAL_RANK``; 0 for a plain process)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def get_world_size() -> int:
    """Number of processes; before initialisation the launcher's ``WORLD_SIZE`` (else 1)."""
    return dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on global rank 0: the rank that logs, prints and writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a group or with a single rank."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


# DeepSpeed caches process-group handles in these module globals (deepspeed.utils.groups).
_DEEPSPEED_GROUP_CACHES = ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                           "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP")


def destroy() -> None:
    """Tear the process group down (end of ``main``, between tests). Safe to call twice.

    DeepSpeed keeps handles of the groups it derived (a clone of the world group, ...) in
    module globals; after the world group is gone those handles are dead and the next
    ``deepspeed.initialize`` in this process fails with "Group ... is not registered".
    They are forgotten here so a new group gets new derived groups.
    """
    if _initialized():
        dist.destroy_process_group()
    while _EXPORTED_FOR_PLAIN_PROCESS:
        os.environ.pop(_EXPORTED_FOR_PLAIN_PROCESS.pop(), None)
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name in _DEEPSPEED_GROUP_CACHES:
            if hasattr(groups, name):
                setattr(groups, name, None)
        for name, value in vars(groups).items():
            if name.startswith("_") and name.endswith("_GROUP") and isinstance(value, dict):
                value.clear()


def deepspeed_shm_path(rank: int | None = None) -> Path:
    """Where DeepSpeed's CPU backend keeps ``rank``'s all-reduce segment (default: this rank).

    Its name is ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
    (``shm_initialize`` in DeepSpeed's ``csrc/cpu/comm/shm.cpp``); Linux keeps POSIX shared
    memory as files under ``/dev/shm``.
    """
    rank = get_rank() if rank is None else rank
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_deepspeed_shm() -> None:
    """Remove this rank's DeepSpeed shared-memory segment once every rank has mapped it.

    When all ranks share one node (``LOCAL_SIZE == WORLD_SIZE``, which the ``deepspeed``
    launcher exports), DeepSpeed's CPU backend creates one ~66 MB segment per rank for its
    low-latency all-reduce, maps every peer's, and never unlinks them: each CPU job left
    ``world_size`` x 66 MB of RAM in ``/dev/shm`` for good, and a later job on the same port
    would map the stale segments. Every rank has mapped every segment by the time
    ``deepspeed.initialize`` returns on all ranks (the backend's constructor spins until its
    peers' segments exist), so after a barrier the names are no longer needed: the mappings
    outlive the names, and the kernel frees the memory when the last process exits, however
    it exits. Collective: call on every rank (after ``deepspeed.initialize``).
    """
    barrier()
    deepspeed_shm_path().unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Collectives on lists of tensors (one collective per (device, dtype) bucket)
# --------------------------------------------------------------------------------------------


def _buckets(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Group tensors by (device, dtype), preserving order, so each bucket flattens into one
    contiguous buffer and costs one collective instead of one per tensor."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def _write_back(bucket: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    torch._foreach_copy_(list(bucket), list(_unflatten_dense_tensors(flat, bucket)))


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average floating-point tensors across ranks, in place, bit-identically on every rank.

    Per (device, dtype) bucket: flatten, one ``all_reduce(SUM)``, divide by the world size,
    copy back. Every rank ends with the same bits because

    * the SUM is the same on every rank. gloo's ring algorithm reduces each chunk on a single
      owner rank and then copies the owner's bytes to the others (reduce-scatter + all-gather);
      gloo's intra-node shared-memory path has every rank add the buffers in the same rank
      order 0..W-1 with the same code; NCCL's ring and tree compute the final sum once and
      transmit it unchanged (NCCL maintainers, NVIDIA/nccl#855). Only *which* order the sum
      uses may vary between runs or algorithms, never between ranks of one call;
    * the division is IEEE-754 correctly rounded, so identical inputs give identical outputs
      on every rank whatever the vector width.

    A broadcast from rank 0 afterwards would therefore change nothing, so none is issued; the
    3-rank test in ``tests/test_distributed.py`` uses values whose sum depends on the order.

    Args:
        tensors: floating-point tensors (any mix of dtypes/devices); modified in place.
            All ranks must pass the same shapes in the same order.
    """
    tensors = list(tensors)
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"all_reduce_mean_ averages floating-point tensors, got {t.dtype}")
    world_size = get_world_size() if _initialized() else 1
    if world_size == 1 or not tensors:
        return
    for bucket in _buckets(tensors):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)
        _write_back(bucket, flat)


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values, in place.

    Args:
        tensors: tensors of any dtype; all ranks pass the same shapes in the same order.
        src: global rank whose values win.
    """
    tensors = list(tensors)
    if not _initialized() or dist.get_world_size() == 1 or not tensors:
        return
    for bucket in _buckets(tensors):
        flat = _flatten_dense_tensors(bucket)
        dist.broadcast(flat, src=src)
        _write_back(bucket, flat)


def average_buffers_(module: torch.nn.Module) -> None:
    """Make every buffer of ``module`` identical across ranks, in place.

    Rule:
      * floating-point buffers (BatchNorm ``running_mean`` / ``running_var``) are statistics
        of each rank's data: they are averaged (:func:`all_reduce_mean_`), as timm's
        ``distribute_bn(reduce=True)`` does. Averaging per-rank running variances ignores the
        spread of the per-rank means, which is small for i.i.d. shards and is what the
        eval-time BN sees in single-GPU training anyway (a running average over batches);
      * every other buffer (``num_batches_tracked``, masks, bool flags) is a counter or a
        structural value, not a statistic: averaging an integer would round and could yield
        a value no rank ever had. All ranks run the same number of train-mode forwards, so
        these are equal already; they are broadcast from rank 0 so that this holds even when
        a rank ran an extra forward, and the result is always a value a real rank had.

    DeepSpeed never syncs buffers after its initial broadcast, so the trainer calls this before
    eval / save / export and before each EMA-teacher update.

    Args:
        module: any module (the engine's ``engine.module``, the teacher, ...).
    """
    buffers = list(module.buffers())
    all_reduce_mean_([b for b in buffers if b.is_floating_point()])
    broadcast_([b for b in buffers if not b.is_floating_point()], src=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (small picklable objects: run ids, paths).

    Args:
        obj: the value on rank ``src``; ignored on the other ranks.
        src: global rank that owns the value.
    """
    if not _initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class RankZeroError(RuntimeError):
    """A step rank 0 ran alone failed; raised on every rank when the error itself cannot travel.

    :func:`run_on_main` re-raises rank 0's own exception on every rank when it survives a pickle
    round trip with a one-line message (the usual case: OSError, ValueError, the config and
    checkpoint errors); otherwise every rank raises this, with one line naming the step, the
    exception type and its message.
    """


def _portable(err: BaseException) -> Optional[BaseException]:
    """``err`` as another rank can re-raise it (same type, same one-line message), else None."""
    if not isinstance(err, Exception) or "\n" in str(err):
        return None  # KeyboardInterrupt, SystemExit, multi-line messages: RankZeroError
    try:
        copy = pickle.loads(pickle.dumps(err))
    except Exception:  # an exception whose __init__ needs more than its args, unpicklable fields
        return None
    return copy if type(copy) is type(err) and str(copy) == str(err) else None


def run_on_main(fn: Callable[[], Any], *, what: str, is_main: Optional[bool] = None, share: bool = True) -> Any:
    """Run ``fn()`` on rank 0 alone and deliver its outcome to every rank: its result, or its error.

    Collective: every rank calls it, and the one broadcast it holds is also the barrier after
    rank 0's step (the other ranks wait in it while rank 0 works, as long as
    ``engine.timeout_min`` allows). Without it, a rank-0-only step that raises ends rank 0
    alone, and the other ranks wait in their next collective: NCCL does not notice a peer that
    died, so a job on N GPUs hangs until the process-group timeout (30 min by default). Here
    every rank raises the same error within a broadcast's time: rank 0's own exception where it
    can travel (:func:`_portable`: the same type and one-line message on every rank, so the
    trainer's exit statuses stay the same on every rank), else :class:`RankZeroError` naming
    ``what``. Rank 0 raises its original exception (with its traceback) in the first case.

    Args:
        fn: the step, without arguments (a lambda or ``functools.partial``).
        what: the step in a few words ("prepare the run directory ..."), for the error message.
        is_main: whether this process runs ``fn``; None: global rank 0. Callers that simulate
            ranks without a process group (tests of the data listing) pass it.
        share: True: every rank returns rank 0's result (broadcast; it must pickle). False: only
            the status is broadcast; rank 0 returns its result, the other ranks None.
    """
    main = get_rank() == 0 if is_main is None else is_main
    result, failure = None, None
    if main:
        try:
            result = fn()
        except BaseException as err:  # noqa: B902 - delivered to every rank, then re-raised here
            failure = err
    if not _initialized() or dist.get_world_size() == 1:
        if failure is not None:
            raise failure
        return result
    payload = None
    if main:
        if failure is None and share:
            try:
                pickle.dumps(result)  # fails here, delivered, rather than inside the broadcast on rank 0 only
            except Exception as err:
                failure = err
        if failure is None:
            payload = ("ok", result if share else None)
        else:
            line = " ".join(str(failure).split()) or "(no message)"
            payload = ("error", _portable(failure), f"rank 0 could not {what}: {type(failure).__name__}: {line}")
    payload = broadcast_object(payload)
    if payload[0] == "ok":
        return result if main else payload[1]
    _, portable, line = payload
    if main:
        if portable is not None:
            raise failure
        raise RankZeroError(line) from failure
    if portable is not None:
        portable.add_note(f"(raised on rank 0, which could not {what}; delivered to every rank)")
        raise portable
    raise RankZeroError(line)


def count_rank_mismatches(tensors: Sequence[torch.Tensor]) -> int:
    """Number of bytes, summed over ranks, in which ``tensors`` differ from rank 0's copy.

    0 means bit-identical on every rank (NaNs included: the comparison is on raw bytes). Every
    rank gets the same answer. Use it in tests and in debug checks of the teacher.

    Args:
        tensors: tensors of any dtype; all ranks pass the same shapes in the same order.
    """
    tensors = list(tensors)
    if not _initialized() or dist.get_world_size() == 1 or not tensors:
        return 0
    device = tensors[0].device
    total = torch.zeros((), dtype=torch.int64, device=device)
    for bucket in _buckets(tensors):
        mine = _flatten_dense_tensors(bucket)
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        diff = (mine.view(torch.uint8) != ref.view(torch.uint8)).sum()
        total += diff.to(device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())
