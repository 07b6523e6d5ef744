"""Evaluation over a sharded validation set: top-1, dynamic MACs, per-block execution rates.

Every image is counted exactly once across ranks (the eval loader shards without padding), and
everything reduced across ranks is an integer count: correct predictions, images and, per
block, how many images executed it. Sums of integers do not depend on how the images were
split, so 1 rank and N ranks report the same numbers to the last bit.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .execution import set_execution
from .flops import MacProfile, paper_units
from .models.resnet import GatedResNet


def _all_reduce_sum_(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def evaluate(
    model: GatedResNet,
    loader: Iterable[tuple[Tensor, Tensor]],
    profile: MacProfile,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    on_batch: Optional[Callable[[Any], None]] = None,
) -> dict[str, Any]:
    """Evaluate the dynamic network with its deterministic (inference-mode) gates.

    Closed blocks are really skipped (``execution="skip"``), as they will be after export.

    Args:
        model: the student (``engine.module``); its mode is restored afterwards.
        loader: this rank's shard of the validation set.
        profile: MACs of the model at the evaluation input size.
        device: where to run.
        autocast: the training precision context (None: fp32).
        on_batch: called with every batch's SPNetOutput (spnet-eval collects per-image MACs).

    Returns:
        top1 (percent), gmacs (mean dynamic GMACs per image, plain MACs), gmacs_paper
        (the paper's 2xMACs unit), static_gmacs, mac_ratio, exec_rate (mean over blocks),
        exec_rates (per block), images (count).
    """
    was_training = model.training
    model.eval()
    set_execution(model, "skip")
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
        set_execution(model, "masked")
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
