"""Path stability: how often a sample's execution path changes during training (issue 20, item 4).

SP-Net's central claim is that its routers are "more stable against instant changes in paths"
(the dynamic auxiliary module slows their progress). This module measures it. A fixed **probe
set** (the first ``run.path_probe_size`` images of the validation split) is run in eval mode with
hard decisions by the paper's rule (execute iff logit1 > logit0: the calibrated threshold is left
out, so the measure does not move with the calibration) every ``run.path_snapshot_every``
optimizer steps and once before the first step. Each snapshot is a 0/1 matrix
``X[i, b]`` (image i, gated block b) and goes to ``RUN/paths.jsonl``. Between two consecutive
snapshots X (earlier) and Y:

- ``path_flips`` = mean over (i, b) of [X[i, b] != Y[i, b]]: the share of decisions that changed;
- ``path_flips_chance`` = Σ_b [p_b (1 - q_b) + (1 - p_b) q_b] / B with p_b, q_b the two
  snapshots' execution rates of block b: the share expected if each block's decisions were
  independent draws at those rates (what a router that re-draws its paths at random would give);
- ``path_changed`` = mean over i of [X[i, :] != Y[i, :]]: the share of images whose path (as a
  whole vector) differs in at least one block.

Σ path_flips / Σ path_flips_chance over a run (``spnet_dist.compare.persistence_ratio``) below 1
means paths persist beyond chance. Each evaluation record carries the lists of the intervals that
ended since the previous record (``path_flips``, ``path_flips_chance``, ``path_changed``,
``path_steps``: the step each interval ends at).

Distributed: each rank runs its shard of the probe set (image i on rank i mod world), writes its
rows into a zero matrix and one all-reduce (sum of int64) gives every rank the whole matrix, so
every rank computes the same metrics; rank 0 writes the file. The snapshot is a logging
boundary: its one host read is the matrix it writes.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..execution import execution_plan, restore_execution, set_execution
from ..models.resnet import GatedResNet
from .. import distributed as D
from ..run_dir import RunDirectory, read_jsonl

__all__ = ["PATH_KEYS", "PathProbe", "path_metrics", "resolve_snapshot_every", "unpack_paths"]

# Keys every evaluation record gets (lists, one value per interval that ended since the last record).
PATH_KEYS = ("path_flips", "path_flips_chance", "path_changed", "path_steps")
snapshots_per_epoch_default = 4  # run.path_snapshot_every = null: this many snapshots per epoch


def path_metrics(before: Tensor, after: Tensor) -> dict[str, float]:
    """The three interval metrics of two 0/1 path matrices (images x gated blocks), see the module docstring."""
    if before.shape != after.shape or before.ndim != 2 or before.shape[0] == 0:
        raise ValueError(f"path snapshots must be two equal (images, blocks) matrices, got {tuple(before.shape)} "
                         f"and {tuple(after.shape)}")
    x, y = before.to(torch.float64), after.to(torch.float64)
    changed = x != y
    p, q = x.mean(dim=0), y.mean(dim=0)  # per-block execution rates
    chance = (p * (1 - q) + (1 - p) * q).mean()
    return {"path_flips": changed.double().mean().item(), "path_flips_chance": chance.item(),
            "path_changed": changed.any(dim=1).double().mean().item()}


def _pack(row: list[int]) -> int:
    """A path as an integer: bit b set iff block b executed (JSON-friendly; 54 blocks fit)."""
    return sum(1 << b for b, v in enumerate(row) if v)


def unpack_paths(paths: list[int], num_blocks: int) -> Tensor:
    """The (images, blocks) 0/1 matrix of a ``paths.jsonl`` line's ``paths``."""
    return torch.tensor([[(p >> b) & 1 for b in range(num_blocks)] for p in paths], dtype=torch.int64)


class PathProbe:
    """The probe set of this rank and the snapshots taken so far.

    Args:
        loader: this rank's shard of the validation split (image i of the split on rank i mod world,
            in order, as both loader backends shard it).
        size: probe images over all ranks (``run.path_probe_size``; fewer if the split is smaller).
        every: optimizer steps between snapshots.
        run_dir: where ``paths.jsonl`` goes (written by the main rank).
        device: the training device.
        rank, world_size, is_main: this process.
        execution: "skip" or "masked" (the eval-mode forward: the device profile's ``teacher_execution``).
    """

    def __init__(self, loader: Any, size: int, every: int, run_dir: RunDirectory, device: torch.device,
                 rank: int, world_size: int, is_main: bool, execution: str = "skip") -> None:
        self.size, self.every, self.run_dir, self.device = size, every, RunDirectory(run_dir), device
        self.rank, self.world_size, self.is_main, self.execution = rank, world_size, is_main, execution
        wanted = len(range(rank, size, world_size))
        parts, have = [], 0
        for images, _ in loader:  # the first images of this rank's shard (kept on the CPU between snapshots)
            if have >= wanted:
                break
            parts.append(images[: wanted - have].cpu())
            have += parts[-1].shape[0]
        self.images = torch.cat(parts) if parts else torch.empty(0)
        self.batch_size = max(parts[0].shape[0], 1) if parts else 1
        self.previous: Optional[Tensor] = None  # (size, B) int64 on the device, the last snapshot
        self.pending: list[dict[str, float]] = []  # intervals ended since the last evaluation record
        self.last_step: Optional[int] = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step != self.last_step

    @torch.no_grad()
    def _decisions(self, model: GatedResNet) -> Tensor:
        """(images, B) decisions of every probe image (all ranks' rows, in the split's order)."""
        was_training, saved, before = model.training, model.gate_threshold, execution_plan(model)
        model.eval()
        model.set_gate_threshold(0.0)  # the paper's rule, whatever the calibration did
        set_execution(model, self.execution)
        rows = torch.zeros(self.size, model.num_blocks + 1, dtype=torch.int64, device=self.device)
        try:
            mine = []
            for start in range(0, self.images.shape[0], self.batch_size):
                batch = self.images[start:start + self.batch_size].to(self.device, non_blocking=True)
                mine.append(model(batch).gate_decisions.round().long())
            if mine:
                index = torch.arange(len(torch.cat(mine)), device=self.device) * self.world_size + self.rank
                rows[index, :-1] = torch.cat(mine)
                rows[index, -1] = 1
        finally:
            restore_execution(model, before)  # exactly as it was: no recompilation of a compiled student
            model.set_gate_threshold(saved)
            model.train(was_training)
        if self.world_size > 1:
            torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.SUM)  # every rank, same matrix
        return rows[rows[:, -1] > 0, :-1]

    def snapshot(self, model: GatedResNet, step: int, epoch: int) -> None:
        """Take a snapshot (every rank calls it: one all-reduce); the main rank appends it to paths.jsonl."""
        current = self._decisions(model)
        line: dict[str, Any] = {"step": step, "epoch": epoch}
        metrics: Optional[dict[str, float]] = None
        if self.previous is not None and current.shape == self.previous.shape and current.shape[0] > 0:
            metrics = path_metrics(self.previous, current)
            self.pending.append({**metrics, "path_steps": step})
        host = current.cpu()  # the snapshot's one host read
        line |= {"images": host.shape[0], "exec_rates": host.double().mean(dim=0).tolist() if host.shape[0] else [],
                 **(metrics or {k: None for k in PATH_KEYS[:3]}), "paths": [_pack(r) for r in host.tolist()]}
        if self.is_main:
            self.run_dir.append_paths(line)
        self.previous, self.last_step = current, step

    def take_intervals(self) -> dict[str, list]:
        """The lists of the intervals since the last call (for an evaluation record), then forget them."""
        out = {k: [iv[k] for iv in self.pending] for k in PATH_KEYS}
        self.pending = []
        return out

    def resume(self, step: int, last_evaluated_step: Optional[int]) -> None:
        """After a resume from ``step``: drop later snapshots (main rank), then every rank reads the
        last one as the previous snapshot and the intervals not yet in an evaluation record."""
        if self.is_main:
            self.run_dir.truncate_paths(step)
        D.barrier()
        lines = [line for line in read_jsonl(self.run_dir.paths) if line.get("step", 0) <= step]
        if not lines:
            return
        last = lines[-1]
        num_blocks = len(last.get("exec_rates") or [])
        if num_blocks:
            self.previous = unpack_paths(last["paths"], num_blocks).to(self.device)
        self.last_step = last["step"]
        after = -1 if last_evaluated_step is None else last_evaluated_step
        self.pending = [{**{k: line[k] for k in PATH_KEYS[:3]}, "path_steps": line["step"]}
                        for line in lines if line["step"] > after and line.get("path_flips") is not None]


def resolve_snapshot_every(every: Optional[int], steps_per_epoch: int) -> int:
    """``run.path_snapshot_every``: null = :data:`snapshots_per_epoch_default` per epoch (at least every step)."""
    if every is None:
        return max(1, steps_per_epoch // snapshots_per_epoch_default)
    return every

