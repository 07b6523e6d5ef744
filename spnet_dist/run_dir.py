"""The run directory ``run.out_dir``: its paths and the one reader / writer of ``metrics.jsonl``.

::

    RUN/config.yaml        the resolved config of the latest attempt
    RUN/metrics.jsonl      one JSON record per evaluation, appended by rank 0
    RUN/paths.jsonl        one line per path snapshot of the probe set (spnet_dist.training.paths)
    RUN/checkpoints/       the checkpoints (layout: spnet_dist.checkpoint.layout)
    RUN/data_files.json    the training/validation file lists rank 0 scanned (read by every rank)
    RUN/tensorboard/       TensorBoard event files, one per attempt

``metrics.jsonl`` has one rule for a damaged line, whoever reads it (the trainer, spnet-export,
spnet-sweep): a torn LAST line (a kill during the append) is ignored with a warning; an unparsable
line anywhere else is an error naming the file and the line, because records were lost in the
middle of the run's history.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

__all__ = ["RunDirectory", "MetricsError", "read_jsonl", "fsync_path", "replace_text"]


class MetricsError(ValueError):
    """A JSON-lines file damaged before its last line (one line naming the file and line)."""


# --------------------------------------------------------------------------------------------
# Atomic file updates (also used for the checkpoints' ``latest`` pointer)
# --------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a reader sees the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_jsonl(path: Path, drop_torn: bool = False) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; [] if it does not exist.

    A torn last line (a process killed while appending) is ignored with a warning; an unparsable
    line before it raises :class:`MetricsError` naming the file and the line number.

    Args:
        path: the file.
        drop_torn: also remove a torn last line from the file (atomically), so that the next
            append starts a line of its own instead of continuing the fragment.
    """
    path = Path(path)
    if not path.is_file():
        return []
    numbered = [(i, line) for i, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if k == len(numbered) - 1:
                warnings.warn(f"{path}:{lineno}: torn last line ignored (a write was interrupted)", stacklevel=2)
                if drop_torn:
                    replace_text(path, "".join(f"{text}\n" for _, text in numbered[:-1]))
                break
            raise MetricsError(f"{path}:{lineno}: not a JSON record ({err}); only a torn last line is "
                               "tolerated") from None
    return records


class RunDirectory:
    """The paths of one run directory and its metrics file.

    Args:
        root: ``run.out_dir`` (or another RunDirectory, returned as an equal object).
    """

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    DATA_FILES = "data_files.json"
    TENSORBOARD = "tensorboard"
    PATHS = "paths.jsonl"

    def __init__(self, root: Union[str, os.PathLike, "RunDirectory"]) -> None:
        self.root = root.root if isinstance(root, RunDirectory) else Path(root)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def data_files(self) -> Path:
        return self.root / self.DATA_FILES

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    @property
    def paths(self) -> Path:
        return self.root / self.PATHS

    def holds_run(self) -> list[str]:
        """Names of the files that show a run was started here (empty: a fresh directory)."""
        return [p.name for p in (self.config, self.metrics) if p.exists()]

    # ------------------------------------------------------------------ metrics.jsonl
    def read_metrics(self) -> list[dict[str, Any]]:
        """Every evaluation record, oldest first (see :func:`read_jsonl` for damaged lines)."""
        return read_jsonl(self.metrics)

    def last_metrics(self) -> Optional[dict[str, Any]]:
        """The newest evaluation record, or None if the run never evaluated."""
        records = self.read_metrics()
        return records[-1] if records else None

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one record as one line (rank 0 only)."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, epoch: int, step: int) -> int:
        """Keep only the evaluation records a checkpoint at (``epoch``, ``step``) already contains.

        A run stopped between writing a record and sealing the checkpoint after it evaluates that
        epoch again on resume; dropping the later records keeps every evaluation exactly once. A
        torn last line is dropped too. Returns the number of lines removed.
        """
        if not self.metrics.is_file():
            return 0
        lines = [line for line in self.metrics.read_text().splitlines() if line.strip()]
        records = self.read_metrics()  # the first len(records) lines: only a torn last one is dropped
        keep = [line for line, r in zip(lines, records) if r.get("epoch", 0) <= epoch and r.get("step", 0) <= step]
        if len(keep) != len(lines):
            replace_text(self.metrics, "".join(f"{line}\n" for line in keep))
        return len(lines) - len(keep)

    # ------------------------------------------------------------------ paths.jsonl
    def append_paths(self, line: Mapping[str, Any]) -> None:
        """Append one path snapshot as one line (rank 0 only)."""
        with open(self.paths, "a") as f:
            f.write(json.dumps(line) + "\n")

    def truncate_paths(self, step: int) -> int:
        """Keep only the snapshots taken at or before ``step`` (a resume from that step takes the
        later ones again); a torn last line is dropped too. Returns the number of lines removed."""
        if not self.paths.is_file():
            return 0
        lines = [line for line in self.paths.read_text().splitlines() if line.strip()]
        records = read_jsonl(self.paths)
        keep = [line for line, r in zip(lines, records) if r.get("step", 0) <= step]
        if len(keep) != len(lines):
            replace_text(self.paths, "".join(f"{line}\n" for line in keep))
        return len(lines) - len(keep)
