"""Evaluation over a sharded validation set: top-1, dynamic MACs, per-block execution rates,
and the calibration of the routers' decision threshold to the target execution rate.

Every image is counted exactly once across ranks (the eval loader shards without padding), and
everything reduced across ranks is an integer count: correct predictions, images and, per
block, how many images executed it (and the histogram counts of the routers' logit
differences). Sums of integers do not depend on how the images were split, so 1 rank and N
ranks report the same numbers to the last bit, and every rank calibrates to the same threshold.

Calibration (:func:`evaluate_calibrated`, docs/paper_fidelity.md "Targets that hold at
evaluation"): the cost loss steers the batch mean of the routers' soft probabilities in
training (Gumbel noise, dropout, batch-statistics BN), but evaluation takes hard, noise-free
decisions with running statistics, which execute another share of the blocks. One offset d,
shared by every router, moves the evaluation rule to "execute iff logit1 - logit0 > d" and is
searched on the validation split so that the evaluated execution rate equals the target. It
uses no label, never touches training, and an export bakes it into the routers' biases.

Evaluation always runs eagerly (``torch.compiler.set_stance("force_eager")``), also for a student
compiled with ``engine.compile``: the skip path has a data-dependent shape in every block (a graph
break at each ``nonzero()``, a new graph per batch size), so compiling it would cost minutes of
tracing per evaluation for nothing. The compiled training graph is left as it was: no new graph
and no recompilation at the next training step (``tests/training/test_step.py``).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .execution import execution_plan, restore_execution, set_execution
from .flops import MacProfile, paper_units
from .models.resnet import GatedResNet

# model.gate_calibration: "target" calibrates the evaluation threshold to loss.target_rate (when
# the run has a cost loss), "none" keeps the paper's rule logit1 > logit0.
GATE_CALIBRATIONS = ("target", "none")
# Bins of the routers' execute probability in the records' histograms (eval mode).
PROB_BINS = 20
# Edges of the histogram of logit differences d = logit1 - logit0 the calibration reads: 0.01
# wide over [-20, 20] (beyond it a router is saturated: sigmoid(20) = 1 - 2e-9), plus two
# open-ended bins. The histogram only proposes the next threshold; the rate is always measured.
DIFF_EDGES = (-20.0, 20.0, 4000)


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


def evaluate(
    model: GatedResNet,
    loader: Iterable[tuple[Tensor, Tensor]],
    profile: MacProfile,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    on_batch: Optional[Callable[[Any], None]] = None,
    timer: Optional[EvalTimer] = None,
    threshold: Optional[float] = None,
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
        timer: measures data and model time separately (spnet-eval's report).
        threshold: the routers' evaluation threshold for this pass (None: the one the model
            holds, 0 unless calibrated); the model's own threshold is restored afterwards.
        skip_strategy: how closed blocks are skipped (``DeviceProfile.eval_skip_strategy``:
            "capacity" on CUDA, no host sync per block; "gather" on CPU); None keeps the model's
            own (an exported model's). Same outputs either way.

    Returns:
        top1 (percent), gmacs (mean dynamic GMACs per image, plain MACs), gmacs_paper
        (the paper's 2xMACs unit), static_gmacs, mac_ratio, exec_rate (mean over blocks),
        exec_rates (per block), images (count), gate_threshold (the rule's offset d),
        gate_prob_hist (``PROB_BINS`` counts over [0, 1] of sigmoid(logit1 - logit0 - d), one per
        (image, block): the execute probabilities of the rule evaluated).
    """
    record, _ = _evaluate_pass(model, loader, profile, device, autocast, on_batch, threshold, diff_counts=False,
                               timer=timer, skip_strategy=skip_strategy)
    return record


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a compiled module runs its plain forward; nothing is traced
def _evaluate_pass(model: GatedResNet, loader: Iterable[tuple[Tensor, Tensor]], profile: MacProfile,
                   device: torch.device, autocast: contextlib.AbstractContextManager | None,
                   on_batch: Optional[Callable[[Any], None]], threshold: Optional[float],
                   diff_counts: bool, timer: Optional[EvalTimer] = None,
                   skip_strategy: Optional[str] = None) -> tuple[dict[str, Any], Optional[Tensor]]:
    """One pass of :func:`evaluate`; with ``diff_counts`` also the all-reduced histogram of the
    logit differences over :data:`DIFF_EDGES` (int64, on the CPU)."""
    was_training, before = model.training, execution_plan(model)
    saved = model.gate_threshold
    if threshold is not None:
        model.set_gate_threshold(threshold)
    used = model.gate_threshold
    model.eval()
    set_execution(model, "skip", skip_strategy=skip_strategy)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, images
    executed = torch.zeros(model.num_blocks, dtype=torch.int64, device=device)
    prob_hist = torch.zeros(PROB_BINS, dtype=torch.int64, device=device)
    lo, hi, bins = DIFF_EDGES
    diff_hist = torch.zeros(bins + 2, dtype=torch.int64, device=device) if diff_counts else None
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float32, device=device) if diff_counts else None
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
            diff = (out.gate_logits[..., 1] - out.gate_logits[..., 0]).float().flatten()  # (B * N,)
            prob = torch.sigmoid(diff - used)  # the rule's probability: > 0.5 iff executed
            prob_hist += torch.bincount((prob * PROB_BINS).long().clamp_(max=PROB_BINS - 1), minlength=PROB_BINS)
            if diff_hist is not None:
                # bucketize: bin 0 below lo, bin k for edges[k-1] < d <= edges[k], bin bins+1 above hi
                diff_hist += torch.bincount(torch.bucketize(diff, edges), minlength=bins + 2)
            if on_batch is not None:
                on_batch(out)
    finally:
        restore_execution(model, before)
        model.train(was_training)
        model.set_gate_threshold(saved)
    _all_reduce_sum_(counts)
    _all_reduce_sum_(executed)
    _all_reduce_sum_(prob_hist)
    if diff_hist is not None:
        _all_reduce_sum_(diff_hist)
    correct, images = (int(v) for v in counts.tolist())
    if images == 0:
        raise ValueError("evaluation saw no images: the validation set is empty")
    macs = profile.mean_from_counts(executed.cpu(), images)
    static = profile.static()
    rates = (executed.double() / images).tolist()
    record = {
        "top1": 100.0 * correct / images,
        "gmacs": macs / 1e9,
        "gmacs_paper": paper_units(macs),
        "static_gmacs": static / 1e9,
        "mac_ratio": macs / static,
        "exec_rate": sum(rates) / len(rates),
        "exec_rates": rates,
        "images": images,
        "gate_threshold": used,
        "gate_prob_hist": prob_hist.tolist(),
    }
    return record, (diff_hist.cpu() if diff_hist is not None else None)


# ------------------------------------------------------------------------------------ calibration
def threshold_for_rate(diff_counts: Sequence[int] | Tensor, target: float,
                       edges: tuple[float, float, int] = DIFF_EDGES) -> float:
    """The d at which a share ``target`` of the counted logit differences lies above d.

    Linear inside the bin where the share crosses ``target`` (differences assumed uniform within a
    bin); the open-ended end bins give their finite edge.

    Args:
        diff_counts: ``bins + 2`` counts as :func:`_evaluate_pass` makes them: below ``lo``, the
            ``bins`` bins of width (hi - lo) / bins, above ``hi``.
        target: the share of decisions to execute, in [0, 1].
        edges: ``(lo, hi, bins)``.
    """
    lo, hi, bins = edges
    counts = [int(c) for c in (diff_counts.tolist() if isinstance(diff_counts, Tensor) else diff_counts)]
    if len(counts) != bins + 2:
        raise ValueError(f"expected {bins + 2} counts, got {len(counts)}")
    total = sum(counts)
    if total == 0:
        raise ValueError("no logit differences counted")
    width = (hi - lo) / bins
    wanted_above = target * total
    above = 0.0
    # Walk from the top bin down: ``above`` is the count strictly above the current bin's top edge.
    for k in range(bins + 1, -1, -1):
        c = counts[k]
        if above + c >= wanted_above and c > 0:
            if k == bins + 1:
                return hi
            if k == 0:
                return lo
            bottom = lo + (k - 1) * width
            # share of this bin that must lie above d, from the bin's top edge down
            frac = (wanted_above - above) / c
            return bottom + width * (1.0 - frac)
        above += c
    return lo


@dataclass
class Calibration:
    """The result of :func:`calibrate_threshold`: the chosen offset and every pass measured."""

    threshold: float
    rate: float
    passes: list[tuple[float, float]]  # (threshold, measured execution rate) in the order measured
    converged: bool


def calibrate_threshold(measure: Callable[[float], tuple[float, Optional[Sequence[int]]]], target: float,
                        tol: float = 0.002, max_passes: int = 8, start: float = 0.0,
                        edges: tuple[float, float, int] = DIFF_EDGES) -> Calibration:
    """Find d with measured execution rate r(d) within ``tol`` of ``target`` (r falls as d rises).

    A safeguarded root search on r(d) - target, every point measured:

    1. the first step goes to the histogram's proposal (:func:`threshold_for_rate`: the d that
       would give the target if the routers' logits did not depend on the paths; they do,
       through the blocks before them, so it is only a first guess);
    2. while only one side of the target is known: secant steps through the last two measured
       points (the measured slope includes the paths' feedback), or the histogram's proposal
       where the secant has no slope (r is a step function on a finite set: two points on one
       plateau), or a step of 2, 4, 8, ... logits when the proposal points the wrong way;
    3. once a bracket [a, b] with r(a) > target > r(b) is known: false position between its
       ends, every other step bisection (the bracket at least halves every two passes).

    Args:
        measure: d -> (execution rate, histogram counts of the logit differences or None).
        target: the wanted execution rate.
        tol: accepted |r(d) - target|.
        max_passes: at most this many measurements; the closest is returned if none is within ``tol``.
        start: the first d measured (0: the paper's rule, whose numbers are worth having anyway).

    Returns:
        the chosen :class:`Calibration` (the pass closest to the target).
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target execution rate must be in [0, 1], got {target}")
    below, above = -math.inf, math.inf  # r(below) > target > r(above)
    rate_below = rate_above = math.nan
    passes: list[tuple[float, float]] = []
    d = float(start)
    step = 2.0
    bracketed_passes = 0
    for _ in range(max_passes):
        rate, counts = measure(d)
        passes.append((d, rate))
        if abs(rate - target) <= tol:
            return Calibration(d, rate, passes, True)
        if rate > target and d > below:
            below, rate_below = d, rate
        elif rate < target and d < above:
            above, rate_above = d, rate
        if math.isfinite(below) and math.isfinite(above):
            # Inside a bracket: false position between its ends, every other step bisection,
            # so the bracket at least halves every two passes whatever the steps of r.
            bracketed_passes += 1
            if bracketed_passes % 2 == 1 and rate_below != rate_above:
                d = below + (rate_below - target) * (above - below) / (rate_below - rate_above)
            else:
                d = 0.5 * (below + above)
            continue
        proposal = threshold_for_rate(counts, target, edges) if counts is not None else math.nan
        if len(passes) >= 2:
            (d0, r0), (d1, r1) = passes[-2], passes[-1]
            slope = (r1 - r0) / (d1 - d0) if d1 != d0 else 0.0
            if slope < 0:  # r falls with d, as it must for a useful secant
                # at most 4 times the last step: a nearly flat secant (a plateau of r) would
                # otherwise throw d to a saturated end that bisection then needs passes to leave
                reach = 4.0 * abs(d1 - d0)
                proposal = d1 + max(-reach, min(reach, (target - r1) / slope))
        if math.isfinite(proposal) and below < proposal < above and all(abs(proposal - x) > 1e-9 for x, _ in passes):
            d = proposal
        else:
            d = d + step if rate > target else d - step
            step *= 2.0
    best = min(passes, key=lambda p: abs(p[1] - target))
    return Calibration(best[0], best[1], passes, False)


def evaluate_calibrated(model: GatedResNet, loader: Iterable[tuple[Tensor, Tensor]], profile: MacProfile,
                        device: torch.device, target: float,
                        autocast: contextlib.AbstractContextManager | None = None,
                        tol: float = 0.005, max_passes: int = 10,
                        skip_strategy: Optional[str] = None) -> dict[str, Any]:
    """Calibrate the routers' shared threshold on ``loader`` to execution rate ``target``, set it on
    the model, and return the evaluation at it.

    The first pass is the paper's rule (d = 0); its figures are kept in the record as
    ``paper_rule_*``. Every rank runs the same passes (the rates and histograms are all-reduced
    integer counts), so every rank ends with the same threshold.

    Returns:
        :func:`evaluate`'s record at the chosen threshold, plus ``paper_rule_top1``,
        ``paper_rule_exec_rate``, ``paper_rule_mac_ratio``, ``paper_rule_gate_prob_hist`` (the
        d = 0 pass), ``calibration_passes`` (how many passes) and ``calibration_converged``.
    """
    records: dict[float, dict[str, Any]] = {}

    def measure(d: float) -> tuple[float, Optional[Sequence[int]]]:
        record, counts = _evaluate_pass(model, loader, profile, device, autocast, None, d, diff_counts=True,
                                        skip_strategy=skip_strategy)
        records[d] = record
        return record["exec_rate"], counts

    result = calibrate_threshold(measure, target, tol, max_passes, start=0.0)
    model.set_gate_threshold(result.threshold)
    paper = records[0.0]
    return {**records[result.threshold],
            "paper_rule_top1": paper["top1"], "paper_rule_exec_rate": paper["exec_rate"],
            "paper_rule_mac_ratio": paper["mac_ratio"], "paper_rule_gate_prob_hist": paper["gate_prob_hist"],
            "calibration_passes": len(result.passes), "calibration_converged": result.converged}
