"""Where checkpoints live and when one counts: sealing, publishing, aliases, pruning, and the ONE
resolver + validator every reader goes through (resume, spnet-export, tools).

Visibility: every rank writes into ``RUN/checkpoints/.tmp-<tag>/``; after a barrier rank 0 fsyncs
it, writes the completion marker with the size and SHA-256 of every file, renames the directory to
``<tag>`` (one atomic rename) and only then replaces DeepSpeed's ``latest`` text pointer
(temporary file + rename). A crash at any point leaves either the previous checkpoints untouched
plus a ``.tmp-*`` leftover (removed at the next start), or the new complete one. ``best`` and
``final`` are relative symlinks to step directories, replaced atomically; pruning keeps the newest
``run.keep_checkpoints`` step directories and everything an alias points to.

A checkpoint counts only if :func:`validate_checkpoint` accepts it: the marker exists, every file
it lists has its size and SHA-256, and the parts every rank must write are listed (one per-rank
state file per rank; with ZeRO 1/2 one optimizer shard per rank). Nothing of a checkpoint is
opened before that check, so a half-synced copy, a file swapped for another valid one or a save
a rank never finished is refused by name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

from ..run_dir import RunDirectory, fsync_path, replace_text
from .layout import (ALIASES, FORMAT_VERSION, LATEST, MARKER, MODEL_STATES, STATE_FILE, is_leftover,
                     optim_states_file, rank_file, step_of, trash_dir_name)

__all__ = [
    "CheckpointError", "write_json", "read_json", "publish", "point_alias", "prune", "remove_leftovers",
    "validate_checkpoint", "step_dirs", "find_resumable", "resolve_checkpoint", "read_state",
]


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or refused (one-line message naming it)."""


# --------------------------------------------------------------------------------------------
# Files: JSON, hashing
# --------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON and fsync it (the caller's directory rename publishes it)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


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
        fsync_path(path)
        files[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    write_json(tmp / MARKER, {"format": FORMAT_VERSION, "tag": tag, "step": step, "files": files})
    for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        fsync_path(sub)
    final = ckpt_dir / tag
    if final.exists():
        trash = ckpt_dir / trash_dir_name(tag)
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(ckpt_dir)
    replace_text(ckpt_dir / LATEST, tag)  # last: DeepSpeed's pointer only ever names a sealed tag
    return final


def point_alias(ckpt_dir: Path, alias: str, tag: str) -> None:
    """Make ``ckpt_dir/alias`` a relative symlink to ``tag``, replaced atomically."""
    link = ckpt_dir / alias
    tmp = ckpt_dir / f".{alias}.tmp{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(tag, tmp)
    os.replace(tmp, link)
    fsync_path(ckpt_dir)


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


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """Step directories (not aliases), newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(s, p) for p in ckpt_dir.iterdir()
             if p.is_dir() and not p.is_symlink() and (s := step_of(p.name)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` step directories; never one an alias or ``latest`` names.

    Returns the removed tags.
    """
    protected = _alias_targets(ckpt_dir)
    removed = []
    for path in step_dirs(ckpt_dir)[keep:]:
        if path.name not in protected:
            shutil.rmtree(path)
            removed.append(path.name)
    return sorted(removed)


def remove_leftovers(ckpt_dir: Path) -> list[str]:
    """Remove ``.tmp-*`` / ``.trash-*`` directories a killed save left behind (rank 0, at start).

    A ``.trash-<tag>`` without its ``<tag>`` is a sealed checkpoint that :func:`publish` had moved
    aside to replace it and was killed before the new one took its name: it is put back, not
    removed (the previous checkpoints stay intact whenever the kill comes).
    """
    removed = []
    if ckpt_dir.is_dir():
        for path in ckpt_dir.iterdir():
            tag = path.name[len(trash_dir_name("")):]
            if path.name == trash_dir_name(tag) and step_of(tag) is not None and not (ckpt_dir / tag).exists():
                os.rename(path, ckpt_dir / tag)
        for path in ckpt_dir.iterdir():
            if is_leftover(path.name) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


# --------------------------------------------------------------------------------------------
# The validator and the resolver
# --------------------------------------------------------------------------------------------


def _required_parts(path: Path) -> list[str]:
    """Files every rank of the saving job had to write, from the (already verified) state file."""
    try:
        state = read_json(path / STATE_FILE)
        world = int(state["world_size"])
        zero_stage = int(state["config"]["engine"]["zero_stage"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lacks world_size / engine.zero_stage "
                              f"({type(err).__name__}: {err})") from None
    parts = [MODEL_STATES] + [rank_file(r) for r in range(world)]
    if zero_stage > 0:  # ZeRO 1/2 shard the optimizer state: one file per data-parallel rank
        parts += [optim_states_file(r) for r in range(world)]
    return parts


def validate_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a sealed checkpoint whose files all match
    the sizes and SHA-256 sums of its completion marker, with every rank's part listed.

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
        files = read_json(marker)["files"]
        sums = {name: (int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} ({err})") from None
    if STATE_FILE not in sums:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} missing from {MARKER}")
    for name, (size, digest) in sums.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        found = file.stat().st_size
        if found != size:
            raise CheckpointError(f"checkpoint {path}: {name} has {found} bytes, {size} expected "
                                  "(truncated or overwritten)")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} fails its SHA-256 check (corrupt or replaced)")
    missing = [name for name in _required_parts(path) if name not in sums]
    if missing:
        raise CheckpointError(f"checkpoint {path}: {missing[0]} missing from {MARKER} (a rank did not "
                              "write its part)")


def find_resumable(run_dir: RunDirectory | Path, warn: bool = True) -> Optional[Path]:
    """The newest valid checkpoint of a run, or None. Each newer invalid one is named in a warning.

    Args:
        run_dir: the run directory (``run.out_dir``).
        warn: emit a warning per skipped checkpoint.
    """
    ckpt_dir = RunDirectory(run_dir).checkpoints
    latest = ckpt_dir / LATEST
    pointed = latest.read_text().strip() if latest.is_file() else None
    for path in step_dirs(ckpt_dir):
        try:
            validate_checkpoint(path)
        except CheckpointError as err:
            if warn:
                warnings.warn(f"skipping {err}; trying the previous checkpoint", stacklevel=2)
            continue
        if warn and pointed is not None and pointed != path.name and step_of(pointed) is not None \
                and step_of(pointed) > step_of(path.name):
            warnings.warn(f"{latest} names {pointed}, which is not a valid checkpoint; using {path.name}",
                          stacklevel=2)
        return path
    return None


def resolve_checkpoint(run_dir: RunDirectory | str | os.PathLike, tag: str = "latest") -> Path:
    """The validated, complete checkpoint directory ``tag`` of a run (the one resolver).

    ``tag="latest"`` is the newest valid checkpoint (a partial or corrupt newer one is skipped
    with a warning naming it); ``"best"``, ``"final"`` or ``"step_00001234"`` name one directory,
    which must be valid. Symlinks are resolved: the result names the step directory.

    Args:
        run_dir: the run directory (``run.out_dir``).
        tag: ``"latest"``, an alias or a step tag.

    Raises:
        CheckpointError: one line naming the run directory or the checkpoint and what is wrong.
    """
    run = RunDirectory(run_dir)
    ckpt_dir = run.checkpoints
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{run.root}: no {ckpt_dir.name}/ directory (not a run directory, or no "
                              "checkpoint was written yet)")
    if tag == "latest":
        found = find_resumable(run)
        if found is None:
            raise CheckpointError(f"{ckpt_dir}: no complete checkpoint")
        return found
    if not tag or "/" in tag or tag in (".", ".."):
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (final, best, latest or step_<8 digits>)")
    path = ckpt_dir / tag
    if not path.is_dir():
        found = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
        raise CheckpointError(f"{path}: no such checkpoint (found: {', '.join(found) or 'none'})")
    path = path.resolve() if path.is_symlink() else path  # messages name the step directory
    validate_checkpoint(path)
    return path


def read_state(path: Path) -> dict[str, Any]:
    """The state file (counters, config, world size) of a validated checkpoint."""
    return read_json(Path(path) / STATE_FILE)
