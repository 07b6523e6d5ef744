"""Evaluation over a sharded validation set: top-1, dynamic MACs, per-block execution rates.

Every image is counted exactly once across ranks (the eval loader shards without padding), and
everything reduced across ranks is an integer count: correct predictions, images and, per
block, how many images executed it. Sums of integers do not depend on how the images were
split, so 1 rank and N ranks report the same numbers to the last bit.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Iterator, Optional

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


class EvalTimer:
    """Where an evaluation pass spends its time: waiting for batches (data) and in the forwards (model).

    Data time is the host's wait in the loader's ``next()``. Model time is the forwards' time on
    the device: CUDA events read once at the end on CUDA (no host sync per batch), host time on
    the CPU (a CPU forward returns when it is done).

    Args:
        device: where the forwards run.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.data_seconds = 0.0
        self._host_model_seconds = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._start: Any = None

    def batches(self, loader: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        """``loader``'s batches, timing each ``next()``."""
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.data_seconds += time.perf_counter() - start
            yield batch

    def model_start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def model_stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._host_model_seconds += time.perf_counter() - self._start

    @property
    def model_seconds(self) -> float:
        """Total forward time (on CUDA: waits for the last forward, once)."""
        if not self._events:
            return self._host_model_seconds
        self._events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self._events) / 1000.0


@torch.no_grad()
def evaluate(
    model: GatedResNet,
    loader: Iterable[tuple[Tensor, Tensor]],
    profile: MacProfile,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    on_batch: Optional[Callable[[Any], None]] = None,
    timer: Optional[EvalTimer] = None,
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
        timer: measures data and model time separately (spnet-eval's report).

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
        for images, targets in (timer.batches(loader) if timer is not None else loader):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if timer is not None:
                timer.model_start()
            with autocast or contextlib.nullcontext():
                out = model(images)
            if timer is not None:
                timer.model_stop()
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
