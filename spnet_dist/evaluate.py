"""Evaluation over a sharded validation set: top-1, dynamic MACs, per-block execution rates.

Every image is counted exactly once across ranks (the eval loader shards without padding), and
everything reduced across ranks is an integer count: correct predictions, images and, per
block, how many images executed it. Sums of integers do not depend on how the images were
split, so 1 rank and N ranks report the same numbers to the last bit.

Evaluation always runs eagerly (``torch.compiler.set_stance("force_eager")``), also for a student
compiled with ``engine.compile``: the skip path has a data-dependent shape in every block (a graph
break at each ``nonzero()``, a new graph per batch size), so compiling it would cost minutes of
tracing per evaluation for nothing. The compiled training graph is left as it was: no new graph
and no recompilation at the next training step (``tests/training/test_step.py``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .execution import ExecutionPlan, execution_plan, reset_execution, set_execution
from .flops import MacProfile, paper_units
from .models.resnet import GatedResNet


def _all_reduce_sum_(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a compiled module runs its plain forward; nothing is traced
def evaluate(
    model: GatedResNet,
    loader: Iterable[tuple[Tensor, Tensor]],
    profile: MacProfile,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    on_batch: Optional[Callable[[Any], None]] = None,
    skip_strategy: Optional[str] = None,
) -> dict[str, Any]:
    """Evaluate the dynamic network with its deterministic (inference-mode) gates.

    Closed blocks are really skipped (``execution="skip"``), as they will be after export. The
    model's execution plan is restored afterwards; a plain model (the trainer's student) becomes
    exactly its plain classes and attributes again, which is what a compiled training graph's
    guards check: anything else left behind (a "masked" plan that still names the capacity
    strategy, say) would recompile the training graph at its next step.

    Args:
        model: the student (``engine.module``); its mode is restored afterwards.
        loader: this rank's shard of the validation set.
        profile: MACs of the model at the evaluation input size.
        device: where to run.
        autocast: the training precision context (None: fp32).
        on_batch: called with every batch's SPNetOutput (spnet-eval collects per-image MACs).
        skip_strategy: how closed blocks are skipped (``DeviceProfile.eval_skip_strategy``:
            "capacity" on CUDA, no host sync per block; "gather" on CPU); None keeps the model's
            own (an exported model's). Same outputs either way.

    Returns:
        top1 (percent), gmacs (mean dynamic GMACs per image, plain MACs), gmacs_paper
        (the paper's 2xMACs unit), static_gmacs, mac_ratio, exec_rate (mean over blocks),
        exec_rates (per block), images (count).
    """
    was_training, before = model.training, execution_plan(model)
    model.eval()
    set_execution(model, "skip", skip_strategy=skip_strategy)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, images
    executed = torch.zeros(model.num_blocks, dtype=torch.int64, device=device)
    try:
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast or contextlib.nullcontext():
                out = model(images)
            counts[0] += (out.logits.argmax(dim=1) == targets).sum()
            counts[1] += targets.numel()
            executed += out.gate_decisions.sum(dim=0).round().long()
            if on_batch is not None:
                on_batch(out)
    finally:
        if before == ExecutionPlan():
            reset_execution(model)
        else:
            set_execution(model, before.mode, skip_strategy=before.skip_strategy)
        model.train(was_training)
    _all_reduce_sum_(counts)
    _all_reduce_sum_(executed)
    correct, images = (int(v) for v in counts.tolist())
    if images == 0:
        raise ValueError("evaluation saw no images: the validation set is empty")
    macs = profile.mean_from_counts(executed.cpu(), images)
    static = profile.static()
    rates = (executed.double() / images).tolist()
    return {
        "top1": 100.0 * correct / images,
        "gmacs": macs / 1e9,
        "gmacs_paper": paper_units(macs),
        "static_gmacs": static / 1e9,
        "mac_ratio": macs / static,
        "exec_rate": sum(rates) / len(rates),
        "exec_rates": rates,
        "images": images,
    }
