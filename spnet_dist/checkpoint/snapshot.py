"""A training snapshot: what one checkpoint holds, as one typed object, and its save / load.

:class:`Snapshot` is everything a resumed attempt needs besides DeepSpeed's own engine state
(model, optimizer, LR scheduler, which ``engine.save_checkpoint`` writes): the counters, the EMA
teacher, the config it was written with and this rank's state (RNG streams, loader position,
running sums of the current epoch). The trainer builds one and calls :func:`save_snapshot`; on
resume :func:`load_snapshot` restores the engine and returns the Snapshot for the trainer to
apply. Our own files are JSON and safetensors; DeepSpeed's are loaded through
:mod:`spnet_dist.checkpoint.safe_load` (``weights_only=True``) after the checkpoint passed
:func:`~spnet_dist.checkpoint.store.validate_checkpoint`.
"""
from __future__ import annotations

import base64
import dataclasses
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .. import distributed as D
from .layout import STATE_FILE, TEACHER_FILE, rank_file, step_tag, tmp_dir_name
from .safe_load import engine_loads_safely
from .store import CheckpointError, point_alias, prune, publish, read_json, read_state, write_json

__all__ = [
    "TrainState", "EpochSums", "RankState", "TeacherState", "Snapshot", "save_snapshot", "load_snapshot",
    "capture_rng", "restore_rng", "package_versions",
]


@dataclass
class TrainState:
    """All counters in one place; checkpoints save exactly this."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches every rank consumed in the current epoch
    bad_steps: int = 0  # optimizer steps with a non-finite loss (summed over ranks)
    best_top1: Optional[float] = None  # best evaluation so far and its checkpoint
    best_tag: Optional[str] = None


@dataclass
class EpochSums:
    """One rank's running sums of the current epoch (restored mid-epoch so its record is the same)."""

    terms: dict[str, float] = field(default_factory=dict)  # loss term -> sum over micro-batches
    micro_batches: int = 0
    images: int = 0
    seconds: float = 0.0  # wall time of the epoch so far


@dataclass
class RankState:
    """What each rank saves of its own.

    Attributes:
        rng: RNG streams (:func:`capture_rng`); None after a load onto another world size (the
            ranks no longer map one to one: the trainer seeds afresh).
        loader: the training loader's ``state_dict()`` (a JSON dict).
        epoch_sums: the running sums, None at an epoch boundary.
    """

    rng: Optional[dict[str, Any]]
    loader: dict[str, Any]
    epoch_sums: Optional[EpochSums] = None


@dataclass
class TeacherState:
    """The EMA teacher: its weights (parameters + buffers, the model's keys) and counters."""

    weights: dict[str, torch.Tensor]
    momentum: float
    num_updates: int


@dataclass
class Snapshot:
    """One checkpoint's contents besides DeepSpeed's engine state.

    Attributes:
        state: the counters.
        rank: this rank's state.
        teacher: None when training without the teacher.
        config: ``config.to_dict`` of the run's config.
        world_size: ranks of the job that saved it.
        steps_per_epoch: optimizer steps per epoch of that job.
        scheduler: a summary of the LR scheduler (for people; DeepSpeed restores the scheduler).
        global_steps: DeepSpeed's step count (for people).
        num_threads: intra-op threads (CPU fp32 results depend on them).
        versions: package versions.
        optimizer_loaded: set by :func:`load_snapshot`: whether the optimizer state was restored
            (False for ZeRO 1/2 across a world-size change).
    """

    state: TrainState
    rank: RankState
    teacher: Optional[TeacherState]
    config: dict[str, Any]
    world_size: int
    steps_per_epoch: int
    scheduler: dict[str, Any] = field(default_factory=dict)
    global_steps: int = 0
    num_threads: int = field(default_factory=torch.get_num_threads)
    versions: dict[str, str] = field(default_factory=lambda: package_versions())
    optimizer_loaded: bool = True


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def save_snapshot(ckpt_dir: Path, engine: Any, snapshot: Snapshot, *, rank: int, is_main: bool,
                  keep: int, best: bool = False) -> Path:
    """Write ``ckpt_dir/step_<step>`` on every rank (all ranks call it: it has barriers).

    Every rank writes DeepSpeed's files and its own :class:`RankState` into a temporary
    directory; rank 0 adds the teacher and the state file, and after a barrier seals and
    publishes it (:func:`~spnet_dist.checkpoint.store.publish`), points ``best`` if asked and
    prunes to the newest ``keep``. An error in rank 0's steps is raised on every rank
    (:func:`~spnet_dist.distributed.run_on_main`); nothing half-written is published.

    Args:
        ckpt_dir: ``RUN/checkpoints``.
        engine: the DeepSpeed engine.
        snapshot: what to save (``snapshot.rank`` is this rank's part).
        rank: global rank.
        is_main: rank 0 (writes the shared files).
        keep: step directories to keep (``run.keep_checkpoints``).
        best: point the ``best`` alias to this checkpoint.

    Returns:
        The published directory.
    """
    tag = step_tag(snapshot.state.step)
    tmp_name = tmp_dir_name(tag)
    tmp = ckpt_dir / tmp_name
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_name, client_state={}, save_latest=False)
    write_json(tmp / rank_file(rank), dataclasses.asdict(snapshot.rank))
    # Rank 0's own steps go through run_on_main: a failure there (a full disk, a quota) reaches every
    # rank at once as the same error, where a bare `if is_main:` would end rank 0 alone and leave the
    # others waiting in the next barrier until engine.timeout_min.
    D.run_on_main(lambda: _write_shared_files(tmp, snapshot), what=f"write the shared files of checkpoint {tag}",
                  is_main=is_main, share=False)
    D.barrier()  # every rank closed its files

    def publish_and_prune() -> None:
        publish(ckpt_dir, tmp, tag, snapshot.state.step)
        if best:
            point_alias(ckpt_dir, "best", tag)
        prune(ckpt_dir, keep)

    # Also the barrier after publication: the other ranks return once rank 0 has published.
    D.run_on_main(publish_and_prune, what=f"publish checkpoint {tag}", is_main=is_main, share=False)
    return ckpt_dir / tag


def _write_shared_files(tmp: Path, snapshot: Snapshot) -> None:
    """Rank 0's part of a checkpoint: the teacher's weights and the state file."""
    teacher = snapshot.teacher
    if teacher is not None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in teacher.weights.items()}, str(tmp / TEACHER_FILE))
    write_json(tmp / STATE_FILE, {
        "train_state": dataclasses.asdict(snapshot.state),
        "teacher": None if teacher is None else {"momentum": teacher.momentum, "num_updates": teacher.num_updates},
        "config": snapshot.config,
        "versions": snapshot.versions,
        "world_size": snapshot.world_size,
        "num_threads": snapshot.num_threads,
        "steps_per_epoch": snapshot.steps_per_epoch,
        "scheduler": snapshot.scheduler,
        "global_steps": snapshot.global_steps,
    })


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def _read_rank_state(path: Path, rank: int) -> dict[str, Any]:
    return read_json(path / rank_file(rank))


def _epoch_sums(raw: Optional[dict[str, Any]]) -> Optional[EpochSums]:
    return None if raw is None else EpochSums(**raw)


def _merged_rank_state(path: Path, saved_world: int, rank: int) -> RankState:
    """This rank's state when the world size changed: ranks no longer map one to one.

    Every rank takes rank 0's loader position (the loader converts it through the global sample
    count); rank 0 carries every old rank's epoch sums and counts, the others none; no rank gets
    an RNG state (the caller seeds afresh).
    """
    parts = [_read_rank_state(path, r) for r in range(saved_world)]
    sums = None
    if parts[0]["epoch_sums"] is not None:
        old = [EpochSums(**p["epoch_sums"]) for p in parts]
        if rank == 0:
            sums = EpochSums(terms={k: sum(s.terms[k] for s in old) for k in old[0].terms},
                             micro_batches=sum(s.micro_batches for s in old),
                             images=sum(s.images for s in old), seconds=old[0].seconds)
        else:
            sums = EpochSums(terms={k: 0.0 for k in old[0].terms}, seconds=old[0].seconds)
    return RankState(rng=None, loader=parts[0]["loader"], epoch_sums=sums)


def load_snapshot(path: Path, engine: Any, *, rank: int, world_size: int, device: torch.device) -> Snapshot:
    """Restore DeepSpeed's engine state from checkpoint ``path`` and return the rest as a Snapshot.

    ``path`` must have passed :func:`~spnet_dist.checkpoint.store.validate_checkpoint`.
    DeepSpeed's ZeRO-1/2 optimizer shards are tied to the data-parallel world size (a 2-rank
    ZeRO-2 checkpoint raises on 1 rank) and its universal-checkpoint converter only knows Adam's
    ``exp_avg``/``exp_avg_sq`` (docs/library-facts.md). On a world-size change the documented
    fallback keeps weights, teacher, step and LR schedule; SGD's momentum buffer restarts from
    zero (ZeRO 0 keeps it: its optimizer state is not sharded).

    Args:
        path: the checkpoint directory.
        engine: the DeepSpeed engine to load into.
        rank: this process's global rank.
        world_size: ranks of this job.
        device: where the teacher's weights go.
    """
    path = Path(path)
    saved = read_state(path)
    same_world = saved["world_size"] == world_size
    keep_optimizer = same_world or engine.zero_optimization_stage() == 0
    with engine_loads_safely(engine):  # DeepSpeed's own loads: weights_only=True, allow-listed classes
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                              load_optimizer_states=keep_optimizer, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load it")
    teacher = None
    if saved["teacher"] is not None:
        from safetensors.torch import load_file

        teacher = TeacherState(weights=load_file(str(path / TEACHER_FILE), device=str(device)), **saved["teacher"])
    if same_world:
        mine = _read_rank_state(path, rank)
        rank_state = RankState(rng=mine["rng"], loader=mine["loader"], epoch_sums=_epoch_sums(mine["epoch_sums"]))
    else:
        rank_state = _merged_rank_state(path, saved["world_size"], rank)
    return Snapshot(state=TrainState(**saved["train_state"]), rank=rank_state, teacher=teacher,
                    config=saved["config"], world_size=saved["world_size"],
                    steps_per_epoch=saved["steps_per_epoch"], scheduler=saved.get("scheduler", {}),
                    global_steps=saved.get("global_steps", 0), num_threads=saved.get("num_threads"),
                    versions=saved.get("versions", {}), optimizer_loaded=keep_optimizer)


# --------------------------------------------------------------------------------------------
# RNG streams and versions
# --------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every RNG stream training draws from (Gumbel noise, dropout, augmentation), as JSON."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    state = {
        "python": [version, list(pystate), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch_cpu": _b64(torch.get_rng_state()),
    }
    if device.type == "cuda":
        state["torch_cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`capture_rng`."""
    version, pystate, gauss = state["python"]
    random.setstate((version, tuple(pystate), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["torch_cuda"]), device)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "deepspeed", "numpy", "spnet-dist", "nvidia-dali-cuda130", "timm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
