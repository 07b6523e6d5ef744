"""Checkpoints: atomic, self-describing, exactly resumable; auto-resume rules.

A checkpoint is one directory ``RUN/checkpoints/<tag>/`` (``tag = step_<8-digit step>``) holding

* DeepSpeed's own files, written by ``engine.save_checkpoint`` on every rank (model states with
  optimizer / LR-scheduler state on rank 0, ZeRO optimizer shards per rank);
* ``teacher.safetensors``: the EMA teacher's parameters and buffers (fp32, the model's full
  state-dict keys);
* ``trainer_state.json``: ``TrainState``, teacher ``num_updates`` / ``momentum``, the resolved
  config, package versions, world size, scheduler summary;
* ``rank_<5-digit rank>.json`` per rank: RNG states (python, numpy, torch CPU, CUDA) and the
  loader position (a JSON dict: the DALI loader puts its pipeline checkpoint in it, base64),
  plus the running sums of the current epoch's loss terms;
* ``complete.json``: the completion marker, written last, with the size and SHA-256 of every
  other file.

Visibility: everything is written into ``RUN/checkpoints/.tmp-<tag>/``, fsynced, hashed into the
marker, then renamed to ``<tag>`` (one atomic rename) and only then DeepSpeed's ``latest`` text
pointer is replaced (temporary file + rename). A crash at any point leaves either the previous
checkpoints untouched plus a ``.tmp-*`` leftover (removed at the next start), or the new complete
one. ``best`` and ``final`` are relative symlinks to step directories, replaced atomically; pruning
keeps the newest ``run.keep_checkpoints`` step directories and everything an alias points to.

Loading safety: our own files are JSON and safetensors (no pickle). DeepSpeed's ``*.pt`` files are
pickles that DeepSpeed 0.19 opens with ``torch.load(weights_only=False)``; they are therefore only
loaded from the run's own ``checkpoints/`` directory, after their checksums matched the marker.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

__all__ = [
    "CHECKPOINTS", "LATEST", "MARKER", "STATE_FILE", "TEACHER_FILE", "ALIASES", "SAFE_TO_CHANGE",
    "EXIT_PREEMPTED", "EXIT_DIVERGED",
    "CheckpointError", "ResumeMismatch", "Preempted", "TrainingDiverged",
    "step_tag", "rank_file", "resolve_checkpoint", "find_resumable", "validate_checkpoint",
    "read_state", "read_rank_state", "write_json", "publish", "point_alias", "prune",
    "remove_leftovers", "config_differences", "plan_resume", "capture_rng", "restore_rng",
    "package_versions", "set_deterministic", "StopSignals",
]

CHECKPOINTS = "checkpoints"  # DeepSpeed's save_dir inside the run directory
LATEST = "latest"  # DeepSpeed's text pointer: the tag name of the newest checkpoint
MARKER = "complete.json"
STATE_FILE = "trainer_state.json"
TEACHER_FILE = "teacher.safetensors"
ALIASES = ("best", "final")
_TMP = ".tmp-"
_TRASH = ".trash-"
FORMAT_VERSION = 1

# Exit statuses of spnet-train (README "Checkpoints and resume").
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGUSR2/SIGTERM after saving; run it again to continue
EXIT_DIVERGED = 3  # more than run.max_bad_steps non-finite losses; the last good checkpoint is kept

# Fields that may differ between the config a checkpoint was written with and the config of the
# run that resumes it. Everything else changes what training computes and is refused (exit 2).
SAFE_TO_CHANGE = frozenset({
    "schedule.epochs",  # multistep only: the cosine schedule's length is part of its shape
    "data.root", "data.num_workers", "data.eval_batch_size",
    "engine.timeout_min", "engine.backend",
    "run.out_dir", "run.resume", "run.eval_every", "run.log_every", "run.max_steps", "run.progress",
    "run.tensorboard", "run.checkpoint_every", "run.keep_checkpoints", "run.max_bad_steps",
    "run.stop_check_every", "run.deterministic",
})


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt (one-line message naming it)."""


class ResumeMismatch(ValueError):
    """The config differs from the checkpoint's in fields that cannot change on resume."""


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


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def _step_of(name: str) -> Optional[int]:
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


# --------------------------------------------------------------------------------------------
# Files: JSON, fsync, hashing
# --------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON and fsync it (the caller's directory rename publishes it)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _replace_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


# --------------------------------------------------------------------------------------------
# Publishing a checkpoint (rank 0, after every rank wrote its part and passed a barrier)
# --------------------------------------------------------------------------------------------


def publish(ckpt_dir: Path, tmp: Path, tag: str, step: int) -> Path:
    """Seal ``tmp`` (fsync + checksums into the marker), rename it to ``tag``, point ``latest``.

    Called on rank 0 only, after a barrier: every rank has closed the files it wrote.

    Args:
        ckpt_dir: ``RUN/checkpoints``.
        tmp: the temporary directory every rank wrote into.
        tag: the final name (``step_<8 digits>``); an existing directory of that name (left by
            an earlier attempt that stopped at the same step) is replaced.
        step: optimizer step, recorded in the marker.
    """
    files = {}
    for path in _files(tmp):
        _fsync_path(path)
        files[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    write_json(tmp / MARKER, {"format": FORMAT_VERSION, "tag": tag, "step": step, "files": files})
    for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_path(sub)
    final = ckpt_dir / tag
    if final.exists():
        trash = ckpt_dir / f"{_TRASH}{tag}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(ckpt_dir)
    _replace_text(ckpt_dir / LATEST, tag)  # last: DeepSpeed's pointer only ever names a sealed tag
    return final


def point_alias(ckpt_dir: Path, alias: str, tag: str) -> None:
    """Make ``ckpt_dir/alias`` a relative symlink to ``tag``, replaced atomically."""
    link = ckpt_dir / alias
    tmp = ckpt_dir / f".{alias}.tmp{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(tag, tmp)
    os.replace(tmp, link)
    _fsync_path(ckpt_dir)


def _alias_targets(ckpt_dir: Path) -> set[str]:
    keep = set()
    for alias in ALIASES:
        link = ckpt_dir / alias
        if link.is_symlink():
            keep.add(os.readlink(link))
    latest = ckpt_dir / LATEST
    if latest.is_file():
        keep.add(latest.read_text().strip())
    return keep


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` step directories; never one an alias or ``latest`` names.

    Returns the removed tags.
    """
    steps = sorted((s, p) for p in ckpt_dir.iterdir() if p.is_dir() and not p.is_symlink()
                   and (s := _step_of(p.name)) is not None)
    protected = _alias_targets(ckpt_dir)
    removed = []
    for _, path in steps[:max(len(steps) - keep, 0)]:
        if path.name not in protected:
            shutil.rmtree(path)
            removed.append(path.name)
    return removed


def remove_leftovers(ckpt_dir: Path) -> list[str]:
    """Remove ``.tmp-*`` / ``.trash-*`` directories a killed save left behind (rank 0, at start)."""
    removed = []
    if ckpt_dir.is_dir():
        for path in ckpt_dir.iterdir():
            if path.name.startswith((_TMP, _TRASH)) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


def tmp_dir_name(tag: str) -> str:
    return f"{_TMP}{tag}"


# --------------------------------------------------------------------------------------------
# Validation and resolution
# --------------------------------------------------------------------------------------------


def validate_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a sealed checkpoint whose files all match
    the sizes and SHA-256 sums of its completion marker.

    Args:
        path: a checkpoint directory (or an alias symlink to one).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path}: incomplete (no {MARKER}; the save was interrupted)")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} ({err})") from None
    for required in (STATE_FILE,):
        if required not in files:
            raise CheckpointError(f"checkpoint {path}: {required} missing from {MARKER}")
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        size = file.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, {meta['size']} expected "
                                  "(truncated or overwritten)")
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} fails its SHA-256 check (corrupt)")


def _candidates(ckpt_dir: Path) -> list[Path]:
    """Step directories, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(s, p) for p in ckpt_dir.iterdir()
             if p.is_dir() and not p.is_symlink() and (s := _step_of(p.name)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def find_resumable(run_dir: Path, warn: bool = True) -> Optional[Path]:
    """The newest valid checkpoint of a run, or None. Each newer invalid one is named in a warning.

    Args:
        run_dir: the run directory (``run.out_dir``).
        warn: emit a warning per skipped checkpoint.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    latest = ckpt_dir / LATEST
    pointed = latest.read_text().strip() if latest.is_file() else None
    for path in _candidates(ckpt_dir):
        try:
            validate_checkpoint(path)
        except CheckpointError as err:
            if warn:
                warnings.warn(f"skipping {err}; trying the previous checkpoint", stacklevel=2)
            continue
        if warn and pointed is not None and pointed != path.name and _step_of(pointed) is not None \
                and _step_of(pointed) > _step_of(path.name):
            warnings.warn(f"{latest} names {pointed}, which is not a valid checkpoint; using {path.name}",
                          stacklevel=2)
        return path
    return None


def resolve_checkpoint(run_dir: str | os.PathLike, tag: str = "latest") -> Path:
    """The validated, complete checkpoint directory ``tag`` of a run.

    ``tag="latest"`` is the newest valid checkpoint (a partial or corrupt newer one is skipped
    with a warning naming it); ``"best"``, ``"final"`` or ``"step_00001234"`` name one directory,
    which must be valid.

    Args:
        run_dir: the run directory (``run.out_dir``).
        tag: ``"latest"``, an alias or a step tag.

    Raises:
        CheckpointError: one line naming the run directory or the checkpoint and what is wrong.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no {CHECKPOINTS}/ directory (not a run directory, or no "
                              "checkpoint was written yet)")
    if tag == "latest":
        found = find_resumable(run_dir)
        if found is None:
            raise CheckpointError(f"{ckpt_dir}: no complete checkpoint")
        return found
    path = ckpt_dir / tag
    validate_checkpoint(path)
    return path.resolve() if path.is_symlink() else path


def read_state(path: Path) -> dict[str, Any]:
    """The trainer_state.json of a checkpoint."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def read_rank_state(path: Path, rank: int) -> Optional[dict[str, Any]]:
    """Rank ``rank``'s per-rank state, or None if that rank did not exist in the saved job."""
    file = Path(path) / rank_file(rank)
    return json.loads(file.read_text()) if file.is_file() else None


# --------------------------------------------------------------------------------------------
# Resume planning (rank 0 decides before any file is written)
# --------------------------------------------------------------------------------------------


def _flatten(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, fields in cfg.items() for k, v in fields.items()}


def config_differences(saved: dict, current: dict) -> list[str]:
    """``field: saved -> current`` for every field that differs and is not safe to change.

    ``schedule.epochs`` is safe only for the multistep schedule (a cosine schedule's length is
    part of its shape: the resumed run would follow the saved one).

    Args:
        saved: ``config.to_dict`` of the checkpoint's config.
        current: ``config.to_dict`` of the resuming run's config.
    """
    a, b = _flatten(saved), _flatten(current)
    safe = set(SAFE_TO_CHANGE)
    if b.get("schedule.kind") == "cosine":
        safe.discard("schedule.epochs")
    out = []
    for key in sorted(set(a) | set(b)):
        if key in safe or key.startswith("slurm."):  # the job's shape, read by launch/submit.py only
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


@dataclasses.dataclass
class ResumePlan:
    """What rank 0 decided about ``run.out_dir``.

    Attributes:
        checkpoint: the checkpoint to resume from (None: start from step 0).
        existing: the directory already held a run (config.yaml): keep its files.
        notes: lines to print (skipped checkpoints, removed leftovers).
    """

    checkpoint: Optional[Path] = None
    existing: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)


def _check_same_config(saved: dict, current: dict, source: str) -> None:
    diffs = config_differences(saved, current)
    if diffs:
        raise ResumeMismatch(
            f"run.resume: the config differs from {source} in fields that cannot change on resume: "
            f"{'; '.join(diffs)} (safe to change: {', '.join(sorted(SAFE_TO_CHANGE))}; or start a "
            "new run.out_dir)")


def plan_resume(out_dir: Path, resume: str, current: dict) -> ResumePlan:
    """Decide how a run starts in ``out_dir`` (rank 0; reads only).

    * ``never``: the directory must not hold a run (config.yaml / metrics.jsonl), as before.
    * ``auto``: resume from the newest valid checkpoint; a directory with a config.yaml but no
      checkpoint (a run that died during set-up or before its first save) starts again from
      step 0 in place. Either way the saved config must match except :data:`SAFE_TO_CHANGE`.
    * a path: that checkpoint, which must lie in ``out_dir/checkpoints`` (DeepSpeed's files are
      pickles: they are only loaded from the run's own directory) and be valid.

    Raises:
        FileExistsError: ``never`` and the directory holds a run.
        ResumeMismatch: unsafe config differences (the CLI exits 2).
        CheckpointError: an explicit path that is not a valid checkpoint of this run.
    """
    from .config import load_config, to_dict  # local: config imports nothing of ours

    out_dir = Path(out_dir)
    previous = [n for n in ("config.yaml", "metrics.jsonl") if (out_dir / n).exists()]
    if resume == "never":
        if previous:
            raise FileExistsError(
                f"run.out_dir: {out_dir} already holds a run ({', '.join(previous)}) and run.resume is "
                "'never'; choose another run.out_dir, remove that directory or use run.resume=auto")
        return ResumePlan()
    plan = ResumePlan(existing=bool(previous))
    ckpt_dir = out_dir / CHECKPOINTS
    if resume == "auto":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan.checkpoint = find_resumable(out_dir)
        plan.notes += [str(w.message) for w in caught]
    else:
        path = Path(resume).expanduser()
        if not path.is_absolute() and not path.exists():
            path = ckpt_dir / resume
        try:
            inside = path.resolve().is_relative_to(ckpt_dir.resolve())
        except OSError:
            inside = False
        if not inside:
            raise CheckpointError(
                f"run.resume: {resume} is not inside {ckpt_dir}; DeepSpeed's checkpoint files are "
                "pickles and are only loaded from the run's own checkpoints/ directory")
        validate_checkpoint(path)
        plan.checkpoint = path.resolve()
    if plan.checkpoint is not None:
        saved = read_state(plan.checkpoint)["config"]
        _check_same_config(saved, current, f"checkpoint {plan.checkpoint}")
    elif (out_dir / "config.yaml").is_file():
        saved = to_dict(load_config(out_dir / "config.yaml", check_paths=False))
        _check_same_config(saved, current, f"{out_dir / 'config.yaml'} (a run with no checkpoint yet)")
    return plan


def truncate_metrics(path: Path, epoch: int, step: int) -> int:
    """Keep only the evaluation records a checkpoint at (``epoch``, ``step``) already contains.

    A run stopped between writing a record and sealing the checkpoint after it evaluates that
    epoch again on resume; dropping the later records keeps every evaluation exactly once.
    Returns the number of records removed.
    """
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill -9 during the append
        if rec.get("epoch", 0) <= epoch and rec.get("step", 0) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        _replace_text(path, "".join(f"{line}\n" for line in keep))
    return len(lines) - len(keep)


# --------------------------------------------------------------------------------------------
# RNG, versions, determinism
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


def set_deterministic(enabled: bool):
    """Switch torch to deterministic kernels (``run.deterministic``); returns an undo function.

    ``torch.use_deterministic_algorithms`` (errors on ops without a deterministic kernel),
    cuDNN autotuning off, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (needed by deterministic cuBLAS;
    must be set before the first cuBLAS call). CPU fp32 results also depend on the number of
    intra-op threads (reductions split by thread): it is recorded in each checkpoint and a
    resume with another count is warned about.
    """
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    def undo() -> None:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]

    return undo


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


class StopSignals:
    """SIGUSR2 / SIGTERM handlers that only record the request (no I/O, no collective).

    The training loop reads :attr:`requested` at agreed step boundaries and all-reduces it, so
    every rank stops at the same step. A second SIGTERM restores the default action and
    re-raises it: the process exits at once (status 128 + 15), the last sealed checkpoint stays.
    Installed by :meth:`install` when training starts; :meth:`restore` puts back whatever handlers
    were there before (submitit's, for instance).
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = 0  # signal number of the first request, 0 = none
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM and self.requested == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if not self.requested or signum == signal.SIGTERM:
            self.requested = signum

    def install(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def iter_step_dirs(ckpt_dir: Path) -> Iterable[Path]:
    """Step directories, newest first (for tools and tests)."""
    return _candidates(ckpt_dir)
