"""Matched-cost comparison of methods over targets x seeds: pure functions over run records (no torch).

A dynamic network is not "at t = 0.5" when it is trained with target rate 0.5: each method,
seed and target lands at its own achieved MAC ratio. So methods are compared on their
accuracy-vs-achieved-MAC-ratio curves:

(a) :func:`seed_curve` / :func:`method_curve`: per seed, the piecewise-linear curve through its
    (MAC ratio, top-1) points over the targets (sorted by MAC ratio, ties averaged, never
    extrapolated); per method, the mean over seeds at each target.
(b) :func:`paired_difference`: method A − method B at common MAC ratios, each seed's A curve
    minus the same seed's B curve (same ``run.seed``: the pairing cancels initialisation and
    data-order noise), inside the overlap of both methods' achieved ranges over the paired
    seeds, with the mean and a seeded percentile-bootstrap interval over seeds. A requested MAC
    ratio just outside the overlap (at most ``SNAP`` = 0.03 from its nearest end, the tolerance
    of the target table) is compared AT that end and labelled so: a run trained at t = 0.3 lands
    at a MAC ratio of about 0.31 (the stem, routers and head always run), so "at 0.3" can only
    mean "at the lowest cost every paired run reached". Further out there is no number.
(c) :func:`selection_table`: the final epoch and the best-validation epoch side by side (test
    top-1 and MAC ratio of each), and best-on-test, labelled optimistic: it selects the epoch
    on the numbers it reports (what the official code prints).
(d) :func:`persistence_ratio` / :func:`persistence_by_method` / :func:`persistence_difference`:
    Σ path_flips / Σ path_flips_chance, per run, per method and paired against a baseline;
    below 1, a sample's path persists between snapshots more than independent draws at the same
    per-block execution rates would.
(e) :func:`target_table`: the requested rate t against the evaluated execution rate per method and
    t (validation split, where the threshold was calibrated; reported split; the paper's rule).
(f) :func:`accuracy_table` / :func:`power_table`: mean ± 95 % Student-t interval over seeds, and per
    method the paired difference to the baseline at each MAC ratio and each common t with the seeds
    a ±1-point interval needs at the measured seed-to-seed sd (:func:`seeds_for_half_width`). The
    t interval, not the bootstrap, answers "how many seeds": a percentile bootstrap over 6 values
    is too narrow (it ignores the uncertainty of the sd).
(g) :func:`path_summaries`: from each run's ``paths.jsonl`` (found through ``run_dir`` or
    spnet-sweep's layout next to the records), the persistence ratio recomputed from the packed
    paths, the number of path changes per probe image (histogram, and the same expected under
    independent redraws) and the flips per epoch.

Record format (:class:`RunRecord`, read from a dict by :func:`as_record`, one JSON object per
line by :func:`load_records`); top-1 in percent, MAC ratio = dynamic / static MACs:

    method               str    e.g. "baseline", "SP-Net"
    target               float  the loss.target_rate the run was trained with ("target_rate" accepted)
    seed                 int    run.seed (the pairing key)
    final_top1           float  test top-1 at the last epoch
    final_mac_ratio      float  test MAC ratio at the last epoch
    bestval_top1         float  test top-1 at the epoch of the best validation top-1
    bestval_mac_ratio    float  test MAC ratio at that epoch
    besttest_top1        float  the best test top-1 over epochs (optimistic)
    path_flips           list[float], optional: per interval between two path snapshots (or per
                         evaluation record), the share of (image, gated block) decisions that changed
    path_flips_chance    list[float], optional, same length: the share expected if each block's
                         decisions were independent draws at the two snapshots' execution rates
    path_steps           list[int], optional, same length: the optimizer step of each interval's
                         later snapshot
    final_exec_rate, exec_rate (validation), test_paper_rule_exec_rate, calibration_converged,
    variant, run_dir     optional: the target table and the path files (a record with
                         reported_split "val" gives the paper's-rule rate as paper_rule_exec_rate)

    python -m spnet_dist.compare results.jsonl --baseline baseline [--mac-ratios 0.3 0.5 0.7]
    spnet-compare runs/sweeps/fashion/results.jsonl --baseline baseline --expected-runs 72 \
        --title "..." --out docs/sweeps/fashion/report.md      # the whole report (a)-(g), to a file
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

SELECTIONS = ("final", "best_val")
SELECTION_TITLES = {"final": "final epoch", "best_val": "best-validation epoch"}
DEFAULT_MAC_RATIOS = (0.3, 0.5, 0.7)
# A requested MAC ratio at most this far outside the overlap is compared at the overlap's nearest end
# (labelled); the same ±0.03 as the target table, so a target that holds is always comparable.
SNAP = 0.03
RESAMPLES = 10_000
_REQUIRED = ("method", "target", "seed", "final_top1", "final_mac_ratio", "bestval_top1", "bestval_mac_ratio",
             "besttest_top1")

# (RunRecord field, record key, type) of the optional keys; spnet-sweep's results.jsonl names them so.
_OPTIONAL = (("final_exec_rate", "final_exec_rate", float), ("val_exec_rate", "exec_rate", float),
             ("paper_rule_exec_rate", "test_paper_rule_exec_rate", float),
             ("calibration_converged", "calibration_converged", bool), ("variant", "variant", str),
             ("run_dir", "run_dir", str), ("prob_hist", "gate_prob_hist", lambda v: tuple(int(c) for c in v)),
             ("paper_rule_prob_hist", "paper_rule_gate_prob_hist", lambda v: tuple(int(c) for c in v)))


class CompareError(ValueError):
    """Records that cannot be compared; the message names the record and the key."""


@dataclass(frozen=True)
class RunRecord:
    """One training run (method, target, seed) as the comparison reads it; see the module docstring."""

    method: str
    target: float
    seed: int
    final_top1: float
    final_mac_ratio: float
    bestval_top1: float
    bestval_mac_ratio: float
    besttest_top1: float
    path_flips: tuple[float, ...] = ()
    path_flips_chance: tuple[float, ...] = ()
    path_steps: tuple[int, ...] = ()
    # optional (the target table and the path files): None when the record lacks them
    final_exec_rate: Optional[float] = None        # reported-split execution rate at the last epoch
    val_exec_rate: Optional[float] = None          # validation execution rate at the last epoch ("exec_rate")
    paper_rule_exec_rate: Optional[float] = None   # reported split, last epoch, paper's rule (d = 0)
    calibration_converged: Optional[bool] = None
    variant: Optional[str] = None
    run_dir: Optional[str] = None
    # validation split, last evaluation: counts of execute probabilities in equal bins over [0, 1]
    prob_hist: Optional[tuple[int, ...]] = None              # the calibrated rule's (sigmoid(diff - d))
    paper_rule_prob_hist: Optional[tuple[int, ...]] = None   # the paper's rule (sigmoid(diff))

    def point(self, selection: str = "final") -> tuple[float, float]:
        """``(MAC ratio, test top-1)`` of the epoch ``selection`` picks (``final`` | ``best_val``)."""
        check_selection(selection)
        if selection == "final":
            return self.final_mac_ratio, self.final_top1
        return self.bestval_mac_ratio, self.bestval_top1


def check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise CompareError(f"selection must be one of {list(SELECTIONS)}, got {selection!r}")


def as_record(data: Mapping[str, Any] | RunRecord, where: str = "record") -> RunRecord:
    """A :class:`RunRecord` from a dict with the module docstring's keys (a RunRecord passes through).

    Raises:
        CompareError: a key missing, a value of the wrong kind, or path lists of unequal length.
    """
    if isinstance(data, RunRecord):
        return data
    values = dict(data)
    if "target" not in values and "target_rate" in values:
        values["target"] = values["target_rate"]
    if values.get("reported_split") == "val":
        # A run without a test split reports its validation split (spnet-sweep's reported_split), so the
        # paper's-rule rate of the reported split is the validation record's.
        values.setdefault("test_paper_rule_exec_rate", values.get("paper_rule_exec_rate"))
    missing = [k for k in _REQUIRED if values.get(k) is None]
    if missing:
        raise CompareError(f"{where}: missing {missing} (keys: {sorted(values)[:12]})")
    try:
        flips = tuple(float(v) for v in values.get("path_flips") or ())
        chance = tuple(float(v) for v in values.get("path_flips_chance") or ())
        steps = tuple(int(v) for v in values.get("path_steps") or ())
        optional = {key: (None if values.get(name) is None else kind(values[name]))
                    for key, name, kind in _OPTIONAL}
        record = RunRecord(str(values["method"]), float(values["target"]), int(values["seed"]),
                           *(float(values[k]) for k in _REQUIRED[3:]), flips, chance, steps, **optional)
    except (TypeError, ValueError) as err:
        raise CompareError(f"{where}: {err}") from None
    if len(flips) != len(chance) or (steps and len(steps) != len(flips)):
        raise CompareError(f"{where}: path_flips has {len(flips)} values, path_flips_chance {len(chance)}, "
                           f"path_steps {len(steps)}")
    return record


def as_records(records: Iterable[Mapping[str, Any] | RunRecord]) -> list[RunRecord]:
    """Every record through :func:`as_record`; a (method, target, seed) given twice is an error."""
    out, seen = [], set()
    for i, r in enumerate(records):
        record = as_record(r, f"record {i}")
        key = (record.method, record.target, record.seed)
        if key in seen:
            raise CompareError(f"record {i}: method {key[0]!r}, target {key[1]:g}, seed {key[2]} given twice (a sweep "
                               "cell run again with new overrides? a compare: section in the sweep file makes "
                               "spnet-sweep --report-only compare only today's records)")
        seen.add(key)
        out.append(record)
    return out


def load_records(path: str | Path) -> list[RunRecord]:
    """One JSON object per line (blank lines ignored)."""
    lines = Path(path).read_text().splitlines()
    return as_records(json.loads(line) for line in lines if line.strip())


def methods_of(records: Sequence[RunRecord]) -> list[str]:
    return list(dict.fromkeys(r.method for r in records))


def seeds_of(records: Sequence[RunRecord], method: str) -> list[int]:
    return sorted({r.seed for r in records if r.method == method})


# ------------------------------------------------------------------------------------ (a) curves
def seed_curve(records: Iterable[Mapping[str, Any] | RunRecord], method: str, seed: int,
               selection: str = "final") -> list[tuple[float, float]]:
    """``[(MAC ratio, top-1), ...]`` of one method and seed over its targets, sorted by MAC ratio.

    Two targets that reached the same MAC ratio give one point (their mean top-1).
    """
    check_selection(selection)
    by_x: dict[float, list[float]] = {}
    for r in as_records(records):
        if r.method == method and r.seed == seed:
            x, y = r.point(selection)
            by_x.setdefault(x, []).append(y)
    return [(x, statistics.fmean(ys)) for x, ys in sorted(by_x.items())]


def interpolate(curve: Sequence[tuple[float, float]], mac_ratio: float) -> Optional[float]:
    """Piecewise-linear value of ``curve`` (sorted by x) at ``mac_ratio``; None outside its range."""
    if not curve or not curve[0][0] <= mac_ratio <= curve[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= mac_ratio <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (mac_ratio - x0) / (x1 - x0)
    return curve[0][1]  # a one-point curve at exactly mac_ratio


@dataclass(frozen=True)
class CurvePoint:
    """A method's mean over seeds at one target."""

    method: str
    target: float
    n: int
    mac_ratio: float
    mac_ratio_sd: float
    top1: float
    top1_sd: float


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def method_curve(records: Iterable[Mapping[str, Any] | RunRecord], method: str,
                 selection: str = "final") -> list[CurvePoint]:
    """The method's accuracy-vs-achieved-MAC-ratio curve: mean (and sample sd) over seeds per target."""
    check_selection(selection)
    by_target: dict[float, list[tuple[float, float]]] = {}
    for r in as_records(records):
        if r.method == method:
            by_target.setdefault(r.target, []).append(r.point(selection))
    points = []
    for target, xy in sorted(by_target.items()):
        xs, ys = [x for x, _ in xy], [y for _, y in xy]
        points.append(CurvePoint(method, target, len(xy), statistics.fmean(xs), _sd(xs), statistics.fmean(ys), _sd(ys)))
    return points


# ------------------------------------------------------------------------------------ (b) paired differences
def bootstrap_interval(values: Sequence[float], resamples: int = RESAMPLES, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (seeded: the same inputs give the same interval).

    Resamples ``len(values)`` values with replacement ``resamples`` times and returns the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means.
    """
    if not values:
        raise CompareError("bootstrap of no values")
    if not 0 < level < 1 or resamples < 1:
        raise CompareError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    data = np.asarray(values, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    means = data[picks].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedDifference:
    """Method A − method B at one MAC ratio over paired seeds; ``message`` says why there is no number."""

    method_a: str
    method_b: str
    selection: str
    mac_ratio: float
    seeds: tuple[int, ...] = ()
    differences: tuple[float, ...] = ()   # per seed, in ``seeds`` order
    top1_a: Optional[float] = None         # mean over the seeds of A's interpolated top-1
    top1_b: Optional[float] = None
    mean: Optional[float] = None
    sd: Optional[float] = None
    low: Optional[float] = None            # bootstrap interval of the mean (None below 2 seeds)
    high: Optional[float] = None
    level: float = 0.95
    overlap: tuple[float, float] = (math.nan, math.nan)
    message: Optional[str] = None
    compared_at: Optional[float] = None    # where the curves were read: mac_ratio, or the overlap's nearest end

    @property
    def n(self) -> int:
        return len(self.differences)


def achieved_range(records: Sequence[RunRecord], method: str, seeds: Sequence[int],
                   selection: str = "final") -> tuple[float, float]:
    """The MAC ratios every one of ``seeds``' curves of ``method`` covers: (max of minima, min of maxima)."""
    curves = [seed_curve(records, method, s, selection) for s in seeds]
    return max(c[0][0] for c in curves), min(c[-1][0] for c in curves)


def paired_difference(records: Iterable[Mapping[str, Any] | RunRecord], method_a: str, method_b: str,
                      mac_ratios: Sequence[float] = DEFAULT_MAC_RATIOS, selection: str = "final",
                      resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0,
                      snap: float = SNAP) -> list[PairedDifference]:
    """A − B (top-1 points) at each MAC ratio, per seed on the seeds both methods ran, then mean and interval.

    Each seed's difference is its A curve minus its B curve, both interpolated at the MAC ratio
    (:func:`interpolate`). A MAC ratio is compared only inside the overlap of both methods'
    achieved ranges (:func:`achieved_range` over the paired seeds: every seed of both methods
    reaches it, nothing is extrapolated). One at most ``snap`` outside the overlap is compared at
    the overlap's nearest end (``compared_at``, and a ``message`` saying so); further out, the
    result carries a ``message`` instead of numbers. The interval is :func:`bootstrap_interval`
    over seeds (``seed`` seeds it); with one seed there is a mean but no interval.

    Raises:
        CompareError: an unknown method, or no seed that both methods ran.
    """
    check_selection(selection)
    records = as_records(records)
    for method in (method_a, method_b):
        if method not in methods_of(records):
            raise CompareError(f"no records of method {method!r} (methods: {methods_of(records)})")
    seeds = sorted(set(seeds_of(records, method_a)) & set(seeds_of(records, method_b)))
    if not seeds:
        raise CompareError(f"{method_a!r} ran seeds {seeds_of(records, method_a)}, {method_b!r} seeds "
                           f"{seeds_of(records, method_b)}: no seed in common to pair")
    range_a = achieved_range(records, method_a, seeds, selection)
    range_b = achieved_range(records, method_b, seeds, selection)
    lo, hi = max(range_a[0], range_b[0]), min(range_a[1], range_b[1])
    curves = {(m, s): seed_curve(records, m, s, selection) for m in (method_a, method_b) for s in seeds}
    out = []
    for x in mac_ratios:
        common = dict(method_a=method_a, method_b=method_b, selection=selection, mac_ratio=float(x), level=level,
                      overlap=(lo, hi))
        at = min(max(x, lo), hi)
        if lo > hi or abs(at - x) > snap + 1e-12:
            where = "the overlap is empty" if lo > hi else f"the overlap is {lo:.3f}-{hi:.3f}"
            out.append(PairedDifference(**common, message=(
                f"MAC ratio {x:g} is outside the overlap of the achieved ranges over seeds {seeds}: {method_a} "
                f"{range_a[0]:.3f}-{range_a[1]:.3f}, {method_b} {range_b[0]:.3f}-{range_b[1]:.3f}; {where} "
                f"(no extrapolation)")))
            continue
        notes = []
        if at != x:
            end = "low" if at == lo else "high"
            notes.append(f"compared at {at:.3f}, the overlap's {end} end ({abs(at - x):.3f} from {x:g}; "
                         f"no extrapolation)")
        ya = [interpolate(curves[method_a, s], at) for s in seeds]
        yb = [interpolate(curves[method_b, s], at) for s in seeds]
        diffs = [a - b for a, b in zip(ya, yb)]
        low = high = None
        if len(diffs) > 1:
            low, high = bootstrap_interval(diffs, resamples, level, seed)
        else:
            notes.append(f"one paired seed ({seeds[0]}): no interval")
        out.append(PairedDifference(**common, seeds=tuple(seeds), differences=tuple(diffs),
                                    top1_a=statistics.fmean(ya), top1_b=statistics.fmean(yb),
                                    mean=statistics.fmean(diffs), sd=_sd(diffs), low=low, high=high,
                                    message="; ".join(notes) or None, compared_at=at))
    return out


# ------------------------------------------------------------------------------------ (c) final vs best-val
@dataclass(frozen=True)
class SelectionRow:
    """Per (method, target): means (and sample sd) over seeds of each epoch selection."""

    method: str
    target: float
    n: int
    final_top1: float
    final_top1_sd: float
    final_mac_ratio: float
    bestval_top1: float
    bestval_top1_sd: float
    bestval_mac_ratio: float
    besttest_top1: float           # optimistic: the epoch is chosen on the test set itself
    besttest_top1_sd: float


def selection_table(records: Iterable[Mapping[str, Any] | RunRecord]) -> list[SelectionRow]:
    """Final epoch, best-validation epoch and (optimistic) best-on-test, per method and target."""
    records = as_records(records)
    rows = []
    for method in methods_of(records):
        for target in sorted({r.target for r in records if r.method == method}):
            rs = [r for r in records if r.method == method and r.target == target]

            def mean_sd(key: str) -> tuple[float, float]:
                values = [getattr(r, key) for r in rs]
                return statistics.fmean(values), _sd(values)

            final, bestval, besttest = mean_sd("final_top1"), mean_sd("bestval_top1"), mean_sd("besttest_top1")
            rows.append(SelectionRow(method, target, len(rs), final[0], final[1], mean_sd("final_mac_ratio")[0],
                                     bestval[0], bestval[1], mean_sd("bestval_mac_ratio")[0], besttest[0],
                                     besttest[1]))
    return rows


# ------------------------------------------------------------------------------------ (d) persistence
def persistence_ratio(record: Mapping[str, Any] | RunRecord) -> Optional[float]:
    """Σ path_flips / Σ path_flips_chance of one run; None without path records or with zero chance flips."""
    r = as_record(record)
    chance = math.fsum(r.path_flips_chance)
    if not r.path_flips or chance <= 0:
        return None
    return math.fsum(r.path_flips) / chance


@dataclass(frozen=True)
class Persistence:
    """A method's persistence ratio: pooled (Σ over its runs / Σ over its runs) and per run."""

    method: str
    ratio: Optional[float]
    runs: tuple[tuple[float, int, float], ...] = field(default=())   # (target, seed, ratio) per run with paths
    missing: int = 0                                                  # runs without path records

    @property
    def run_mean(self) -> Optional[float]:
        return statistics.fmean(r for _, _, r in self.runs) if self.runs else None

    @property
    def run_sd(self) -> Optional[float]:
        return _sd([r for _, _, r in self.runs]) if self.runs else None


def persistence_by_method(records: Iterable[Mapping[str, Any] | RunRecord]) -> list[Persistence]:
    """Per method: Σ flips / Σ chance flips pooled over its runs, and each run's own ratio."""
    records = as_records(records)
    out = []
    for method in methods_of(records):
        rs = [r for r in records if r.method == method]
        with_paths = [(r, persistence_ratio(r)) for r in rs]
        runs = tuple((r.target, r.seed, ratio) for r, ratio in with_paths if ratio is not None)
        used = [r for r, ratio in with_paths if ratio is not None]
        chance = math.fsum(v for r in used for v in r.path_flips_chance)
        pooled = math.fsum(v for r in used for v in r.path_flips) / chance if used else None
        out.append(Persistence(method, pooled, runs, len(rs) - len(used)))
    return out


def persistence_difference(records: Iterable[Mapping[str, Any] | RunRecord], method: str,
                           baseline: str) -> tuple[list[tuple[float, int]], list[float]]:
    """Per (target, seed) that both ran with path records: ``method``'s persistence ratio minus
    ``baseline``'s (negative: ``method``'s paths persist more). Returns the pairs and the differences."""
    records = as_records(records)
    ratios = {(r.method, r.target, r.seed): persistence_ratio(r) for r in records}
    pairs = sorted((t, s) for m, t, s in ratios if m == method and ratios[m, t, s] is not None
                   and ratios.get((baseline, t, s)) is not None)
    return pairs, [ratios[method, t, s] - ratios[baseline, t, s] for t, s in pairs]


# ------------------------------------------------------------------------------------ (e) targets
@dataclass(frozen=True)
class TargetRow:
    """Per (method, target): the requested rate against the execution rate measured at the last epoch."""

    method: str
    target: float
    n: int
    val_exec_rate: Optional[float]      # mean over seeds: the split the threshold was calibrated on
    exec_rate: Optional[float]          # mean over seeds: the reported (test) split
    exec_rate_sd: Optional[float]
    max_deviation: Optional[float]      # max over seeds of |reported rate - target|
    within: Optional[bool]              # every seed within the tolerance
    paper_rule_exec_rate: Optional[float]  # mean over seeds: the paper's rule (d = 0), reported split
    converged: int                      # seeds whose last calibration met its tolerance


def target_table(records: Iterable[Mapping[str, Any] | RunRecord], tolerance: float = 0.03) -> list[TargetRow]:
    """Requested rate vs evaluated execution rate per method and target (issue 20: |rate - t| <= 0.03)."""
    records = as_records(records)
    rows = []
    for method in methods_of(records):
        for target in sorted({r.target for r in records if r.method == method}):
            rs = [r for r in records if r.method == method and r.target == target]

            def mean_of(key: str) -> Optional[float]:
                values = [getattr(r, key) for r in rs if getattr(r, key) is not None]
                return statistics.fmean(values) if values else None

            rates = [r.final_exec_rate for r in rs if r.final_exec_rate is not None]
            deviation = max(abs(x - target) for x in rates) if rates else None
            rows.append(TargetRow(method, target, len(rs), mean_of("val_exec_rate"),
                                  statistics.fmean(rates) if rates else None, _sd(rates) if rates else None,
                                  deviation, None if deviation is None else deviation <= tolerance + 1e-12,
                                  mean_of("paper_rule_exec_rate"), sum(bool(r.calibration_converged) for r in rs)))
    return rows


# ------------------------------------------------------------------------------------ (f) intervals over seeds
# Two-sided 95 % quantiles of Student's t, df = 1..30 (standard tables); above 30 the Cornish-Fisher
# term z + (z^3 + z) / (4 df) is within 0.002 of the exact value. No scipy for one quantile.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the 95 % two-sided interval)."""
    if df < 1:
        raise CompareError(f"a t interval needs at least 2 values (df >= 1), got df = {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df)


def t_half_width(values: Sequence[float]) -> Optional[float]:
    """Half-width of the 95 % t interval of the mean of ``values`` (None below 2 values)."""
    if len(values) < 2:
        return None
    return t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def seeds_for_half_width(sd: float, half_width: float = 1.0, limit: int = 1000) -> Optional[int]:
    """The fewest seeds n >= 2 whose 95 % t interval of a mean is at most ±``half_width`` at
    seed-to-seed sd ``sd`` (the planning estimate: sd measured on the seeds so far); None above ``limit``."""
    if sd <= 0:
        return 2
    for n in range(2, limit + 1):
        if t_quantile_975(n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return None


@dataclass(frozen=True)
class AccuracyPoint:
    """A method at one target over seeds: mean and 95 % t half-width of MAC ratio and top-1."""

    method: str
    target: float
    selection: str
    n: int
    mac_ratio: float
    mac_ratio_hw: Optional[float]
    top1: float
    top1_hw: Optional[float]


def accuracy_table(records: Iterable[Mapping[str, Any] | RunRecord], selection: str = "final") -> list[AccuracyPoint]:
    """Accuracy vs achieved MACs: per method and target, mean ± 95 % t interval over seeds."""
    check_selection(selection)
    records = as_records(records)
    out = []
    for method in methods_of(records):
        for target in sorted({r.target for r in records if r.method == method}):
            xy = [r.point(selection) for r in records if r.method == method and r.target == target]
            xs, ys = [x for x, _ in xy], [y for _, y in xy]
            out.append(AccuracyPoint(method, target, selection, len(xy), statistics.fmean(xs), t_half_width(xs),
                                     statistics.fmean(ys), t_half_width(ys)))
    return out


@dataclass(frozen=True)
class Power:
    """method − baseline at one point (a MAC ratio or a target), with what ±``goal`` points needs."""

    method: str
    baseline: str
    where: str                      # "MAC ratio 0.5" | "t = 0.5"
    selection: str
    n: int
    mean: Optional[float]
    sd: Optional[float]
    half_width: Optional[float]     # 95 % t interval of the mean difference
    goal: float
    seeds_needed: Optional[int]     # at the measured sd
    message: Optional[str] = None

    @property
    def within(self) -> Optional[bool]:
        return None if self.half_width is None else self.half_width <= self.goal


def _power(method: str, baseline: str, where: str, selection: str, diffs: Sequence[float], goal: float,
           message: Optional[str] = None) -> Power:
    sd = _sd(diffs) if len(diffs) > 1 else None
    return Power(method, baseline, where, selection, len(diffs), statistics.fmean(diffs) if diffs else None, sd,
                 t_half_width(diffs), goal, None if sd is None else seeds_for_half_width(sd, goal), message)


def paired_at_target(records: Iterable[Mapping[str, Any] | RunRecord], method: str, baseline: str, target: float,
                     selection: str = "final") -> tuple[list[int], list[float]]:
    """Seeds and per-seed top-1 differences method − baseline at one training target (no interpolation:
    with a calibrated threshold both run at the same execution rate)."""
    records = as_records(records)
    a = {r.seed: r.point(selection)[1] for r in records if r.method == method and r.target == target}
    b = {r.seed: r.point(selection)[1] for r in records if r.method == baseline and r.target == target}
    seeds = sorted(set(a) & set(b))
    return seeds, [a[s] - b[s] for s in seeds]


def power_table(records: Iterable[Mapping[str, Any] | RunRecord], baseline: str,
                mac_ratios: Sequence[float] = DEFAULT_MAC_RATIOS, selection: str = "final",
                goal: float = 1.0) -> list[Power]:
    """Per method: the paired difference to ``baseline`` at each MAC ratio (interpolated, as
    :func:`paired_difference`) and at each common target, with its 95 % t half-width and the seeds
    a ±``goal``-point interval needs at the measured seed-to-seed sd."""
    records = as_records(records)
    out = []
    for method in methods_of(records):
        if method == baseline:
            continue
        try:
            matched = paired_difference(records, method, baseline, mac_ratios, selection, resamples=1)
        except CompareError as err:
            matched = []
            out.append(_power(method, baseline, "MAC ratio", selection, [], goal, str(err)))
        for d in matched:
            out.append(_power(method, baseline, f"MAC ratio {d.mac_ratio:g}", selection, d.differences, goal,
                              d.message))
        targets = sorted({r.target for r in records if r.method == method} &
                         {r.target for r in records if r.method == baseline})
        for target in targets:
            seeds, diffs = paired_at_target(records, method, baseline, target, selection)
            out.append(_power(method, baseline, f"t = {target:g}", selection, diffs, goal,
                              None if seeds else "no paired seed"))
    return out


def middle_share(counts: Sequence[int], low: float = 0.3, high: float = 0.7) -> Optional[float]:
    """Share of the counted probabilities in the bins inside [low, high) (equal bins over [0, 1];
    ``low`` and ``high`` must fall on bin edges)."""
    total = sum(counts)
    if not total:
        return None
    bins = len(counts)
    a, b = round(low * bins), round(high * bins)
    if abs(a - low * bins) > 1e-9 or abs(b - high * bins) > 1e-9:
        raise CompareError(f"[{low}, {high}) does not fall on the edges of {bins} bins")
    return sum(counts[a:b]) / total


@dataclass(frozen=True)
class ConfidenceRow:
    """Per (method, target): mean over seeds of the share of unconfident router decisions."""

    method: str
    target: float
    n: int
    paper_rule_middle: Optional[float]   # share of execute probabilities in [0.3, 0.7), paper's rule
    calibrated_middle: Optional[float]   # the same under the calibrated threshold


def confidence_table(records: Iterable[Mapping[str, Any] | RunRecord]) -> list[ConfidenceRow]:
    """How unconfident the routers are at the last evaluation (issue 20: the path loss pulls the
    probabilities to the middle, where the hard rule and the soft mean part ways)."""
    records = as_records(records)
    rows = []
    for method in methods_of(records):
        for target in sorted({r.target for r in records if r.method == method}):
            rs = [r for r in records if r.method == method and r.target == target]
            paper = [m for r in rs if r.paper_rule_prob_hist and (m := middle_share(r.paper_rule_prob_hist)) is not None]
            calib = [m for r in rs if r.prob_hist and (m := middle_share(r.prob_hist)) is not None]
            rows.append(ConfidenceRow(method, target, len(rs), statistics.fmean(paper) if paper else None,
                                      statistics.fmean(calib) if calib else None))
    return rows


# ------------------------------------------------------------------------------------ (g) path files
PATH_COUNT_BINS = ((0, 0), (1, 1), (2, 2), (3, 5), (6, 10), (11, None))  # path changes per image, inclusive


def _unpack(path: int, blocks: int) -> list[int]:
    return [(path >> b) & 1 for b in range(blocks)]


def read_path_file(path: str | Path) -> list[dict[str, Any]]:
    """The snapshots of a run's ``paths.jsonl`` (training.paths), in step order."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sorted(lines, key=lambda line: line["step"])


@dataclass(frozen=True)
class PathHistory:
    """One run's snapshots reduced: per image, how many intervals changed its path, observed and by chance."""

    intervals: int
    changes: tuple[int, ...]                 # per probe image: intervals in which its path changed
    chance_changes: float                    # expected changes per image under independent redraws
    flips: tuple[float, ...]                 # per interval, as the evaluation records' path_flips
    flips_chance: tuple[float, ...]
    epochs: tuple[int, ...]                  # per interval: the epoch of its later snapshot


def path_history(lines: Sequence[Mapping[str, Any]]) -> PathHistory:
    """Recompute every interval from the packed paths of consecutive snapshots (same images, same blocks).

    Per interval, chance per image = 1 - Π_b (1 - c_b) with c_b = p_b (1 - q_b) + (1 - p_b) q_b
    (a path changes unless no block flips; blocks independent), summed over intervals.
    """
    lines = [line for line in lines if line.get("paths")]
    if len(lines) < 2:
        return PathHistory(0, (), 0.0, (), (), ())
    blocks = len(lines[0]["exec_rates"])
    images = len(lines[0]["paths"])
    changes = [0] * images
    chance_changes, flips, flips_chance, epochs = 0.0, [], [], []
    previous = [_unpack(p, blocks) for p in lines[0]["paths"]]
    for line in lines[1:]:
        if len(line["paths"]) != images or len(line["exec_rates"]) != blocks:
            raise CompareError(f"snapshot at step {line['step']}: {len(line['paths'])} images x "
                               f"{len(line['exec_rates'])} blocks, the first has {images} x {blocks}")
        current = [_unpack(p, blocks) for p in line["paths"]]
        flipped = 0
        for i, (x, y) in enumerate(zip(previous, current)):
            diff = sum(a != b for a, b in zip(x, y))
            flipped += diff
            changes[i] += diff > 0
        p = [sum(col) / images for col in zip(*previous)]
        q = [sum(col) / images for col in zip(*current)]
        c = [pb * (1 - qb) + (1 - pb) * qb for pb, qb in zip(p, q)]
        chance_changes += 1 - math.prod(1 - cb for cb in c)
        flips.append(flipped / (images * blocks))
        flips_chance.append(math.fsum(c) / blocks)
        epochs.append(int(line.get("epoch", 0)))
        previous = current
    return PathHistory(len(lines) - 1, tuple(changes), chance_changes, tuple(flips), tuple(flips_chance),
                       tuple(epochs))


def change_histogram(changes: Sequence[int], bins: Sequence[tuple[int, Optional[int]]] = PATH_COUNT_BINS) -> list[float]:
    """Share of images per bin of ``changes`` (bins inclusive; None = no upper end)."""
    if not changes:
        return [0.0] * len(bins)
    return [sum(lo <= c and (hi is None or c <= hi) for c in changes) / len(changes) for lo, hi in bins]


@dataclass(frozen=True)
class PathSummary:
    """A method's path stability over its runs with a ``paths.jsonl``."""

    method: str
    runs: int
    intervals: int                          # per run (the first run's; equal within a recipe)
    ratio: Optional[float]                  # Σ flips / Σ chance flips, pooled over runs
    changes_mean: Optional[float]           # path changes per image, mean over images and runs
    chance_changes_mean: Optional[float]    # expected under independent redraws
    histogram: tuple[float, ...]            # share of images per PATH_COUNT_BINS, pooled
    by_epoch: tuple[tuple[int, float, float], ...]  # (epoch, mean flips, mean chance flips)
    missing: int                            # runs without a readable paths.jsonl


def run_path_file(record: RunRecord, results_dir: Optional[Path]) -> Optional[Path]:
    """Where a run's ``paths.jsonl`` is: ``run_dir`` as recorded (absolute or relative to the current
    directory), else spnet-sweep's layout ``<results_dir>/runs/<variant>/seed<k>``."""
    candidates = []
    if record.run_dir:
        candidates.append(Path(record.run_dir) / "paths.jsonl")
    if results_dir is not None and record.variant:
        candidates.append(Path(results_dir) / "runs" / record.variant / f"seed{record.seed}" / "paths.jsonl")
    return next((c for c in candidates if c.is_file()), None)


def path_summaries(records: Iterable[Mapping[str, Any] | RunRecord], results_dir: Optional[Path] = None) -> list[PathSummary]:
    """Per method: persistence ratio, per-image change counts and per-epoch flips from the runs' path files."""
    records = as_records(records)
    out = []
    for method in methods_of(records):
        rs = [r for r in records if r.method == method]
        histories = []
        for r in rs:
            where = run_path_file(r, results_dir)
            if where is not None:
                h = path_history(read_path_file(where))
                if h.intervals:
                    histories.append(h)
        if not histories:
            out.append(PathSummary(method, 0, 0, None, None, None, (), (), len(rs)))
            continue
        chance = math.fsum(v for h in histories for v in h.flips_chance)
        ratio = math.fsum(v for h in histories for v in h.flips) / chance if chance > 0 else None
        changes = [c for h in histories for c in h.changes]
        by_epoch: dict[int, list[tuple[float, float]]] = {}
        for h in histories:
            for e, f, c in zip(h.epochs, h.flips, h.flips_chance):
                by_epoch.setdefault(e, []).append((f, c))
        out.append(PathSummary(
            method, len(histories), histories[0].intervals, ratio, statistics.fmean(changes),
            statistics.fmean(h.chance_changes for h in histories), tuple(change_histogram(changes)),
            tuple((e, statistics.fmean(f for f, _ in v), statistics.fmean(c for _, c in v))
                  for e, v in sorted(by_epoch.items())),
            len(rs) - len(histories)))
    return out


# ------------------------------------------------------------------------------------ report
def _pm(mean: Optional[float], sd: Optional[float], digits: int = 2) -> str:
    return "—" if mean is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown_report(records: Iterable[Mapping[str, Any] | RunRecord], baseline: str,
                    mac_ratios: Sequence[float] = DEFAULT_MAC_RATIOS, resamples: int = RESAMPLES,
                    level: float = 0.95, seed: int = 0) -> str:
    """Curves, paired differences against ``baseline`` (both selections), the selection table, persistence."""
    records = as_records(records)
    pct = f"{100 * level:g} %"
    lines = ["## Accuracy vs achieved MAC ratio (mean ± sd over seeds, per target; test top-1 %)", "",
             "| method | t | n | MAC ratio (final) | top-1 (final) | MAC ratio (best val) | top-1 (best val) "
             "| top-1 best-on-test (optimistic) |", "|---|---|---|---|---|---|---|---|"]
    for row in selection_table(records):
        lines.append(f"| {row.method} | {row.target:g} | {row.n} | {row.final_mac_ratio:.3f} | "
                     f"{_pm(row.final_top1, row.final_top1_sd)} | {row.bestval_mac_ratio:.3f} | "
                     f"{_pm(row.bestval_top1, row.bestval_top1_sd)} | {_pm(row.besttest_top1, row.besttest_top1_sd)} |")
    lines += ["", f"## Paired difference at matched MAC ratio: method − {baseline} (top-1 points, same seeds, "
                  f"per-seed linear interpolation; {pct} percentile bootstrap over seeds, {resamples} resamples)", "",
              "| method | MAC ratio | selection | n | mean | sd | " + pct + " interval | note |",
              "|---|---|---|---|---|---|---|---|"]
    for method in methods_of(records):
        if method == baseline:
            continue
        for selection in SELECTIONS:
            try:
                diffs = paired_difference(records, method, baseline, mac_ratios, selection, resamples, level, seed)
            except CompareError as err:  # a partial sweep: this method has no seed in common yet
                lines.append(f"| {method} | — | {SELECTION_TITLES[selection]} | 0 | — | — | — | {err} |")
                continue
            for d in diffs:
                interval = "—" if d.low is None else f"[{d.low:+.2f}, {d.high:+.2f}]"
                mean = "—" if d.mean is None else f"{d.mean:+.2f}"
                sd = "—" if d.sd is None else f"{d.sd:.2f}"
                lines.append(f"| {method} | {d.mac_ratio:g} | {SELECTION_TITLES[selection]} | {d.n} | {mean} | {sd} | "
                             f"{interval} | {d.message or ''} |")
    persistence = persistence_by_method(records)
    if any(p.runs for p in persistence):
        lines += ["", "## Path persistence: Σ path_flips / Σ path_flips_chance (below 1: paths persist beyond chance)",
                  "", "| method | pooled ratio | per run (mean ± sd) | runs | runs without paths |", "|---|---|---|---|---|"]
        for p in persistence:
            pooled = "—" if p.ratio is None else f"{p.ratio:.3f}"
            lines.append(f"| {p.method} | {pooled} | {_pm(p.run_mean, p.run_sd, 3)} | {len(p.runs)} | {p.missing} |")
        rows = [(m, *persistence_difference(records, m, baseline)) for m in methods_of(records) if m != baseline]
        if any(diffs for _, _, diffs in rows):
            lines += ["", f"Persistence ratio, method − {baseline}, paired per (t, seed) (negative: paths persist more "
                          f"than the {baseline}'s; 95 % t interval over the pairs)", "",
                      "| method | pairs | mean | sd | 95 % interval |", "|---|---|---|---|---|"]
            for m, pairs, diffs in rows:
                hw = t_half_width(diffs)
                interval = "—" if hw is None else f"[{statistics.fmean(diffs) - hw:+.3f}, {statistics.fmean(diffs) + hw:+.3f}]"
                mean = _f(statistics.fmean(diffs), 3, True) if diffs else "—"
                lines.append(f"| {m} | {len(pairs)} | {mean} | {_f(_sd(diffs), 3) if len(diffs) > 1 else '—'} | {interval} |")
    return "\n".join(lines) + "\n"


def _f(value: Optional[float], digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _ci(mean: float, hw: Optional[float], digits: int) -> str:
    return f"{mean:.{digits}f}" + ("" if hw is None else f" ± {hw:.{digits}f}")


def _bin_title(lo: int, hi: Optional[int]) -> str:
    return f"{lo}+" if hi is None else (str(lo) if lo == hi else f"{lo}–{hi}")


def full_report(records: Iterable[Mapping[str, Any] | RunRecord], baseline: str, results_dir: Optional[Path] = None,
                mac_ratios: Sequence[float] = DEFAULT_MAC_RATIOS, expected_runs: Optional[int] = None,
                tolerance: float = 0.03, goal: float = 1.0, focus: float = 0.5, resamples: int = RESAMPLES,
                title: str = "Matched-cost comparison", source: str = "results.jsonl") -> str:
    """The whole report: status, target table, accuracy vs MACs with 95 % intervals, the power at
    ``focus`` (t and MAC ratio), :func:`markdown_report` (selections, paired bootstrap differences,
    persistence from the records) and path stability from the runs' ``paths.jsonl``."""
    records = as_records(records)
    n = len(records)
    partial = expected_runs is not None and n < expected_runs
    status = (f"**PARTIAL: {n} of {expected_runs} runs finished**; every figure below is provisional"
              if partial else f"{n} runs" + ("" if expected_runs is None else f" of {expected_runs} (complete)"))
    runs = "" if results_dir is None or Path(results_dir) == Path(source).parent else f" --runs-dir {results_dir}"
    lines = [f"# {title}", "",
             f"Generated by `python -m spnet_dist.compare {source} --baseline {baseline}{runs} --out ...` "
             "(do not edit by hand: rerun it). " + status + ".", "",
             "Top-1 in percent on the reported split (the test split when the runs have one); MAC ratio = "
             "dynamic / static MACs. ± is the 95 % Student-t interval of the mean over seeds (half-width) "
             "unless a column says otherwise.", ""]
    lines += [f"## Target adherence: requested rate t vs evaluated execution rate (last epoch; tolerance ±{tolerance:g})",
              "", "| method | t | n | val exec rate (calibrated on it) | reported-split exec rate (mean ± sd) "
              f"| max \\|rate − t\\| | within ±{tolerance:g} | reported-split exec rate, paper's rule (d = 0) "
              "| calibration converged |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in target_table(records, tolerance):
        within = "—" if row.within is None else ("yes" if row.within else "**no**")
        rate = "—" if row.exec_rate is None else f"{row.exec_rate:.3f} ± {row.exec_rate_sd:.3f}"
        lines.append(f"| {row.method} | {row.target:g} | {row.n} | {_f(row.val_exec_rate)} | {rate} | "
                     f"{_f(row.max_deviation)} | {within} | {_f(row.paper_rule_exec_rate)} | {row.converged}/{row.n} |")
    confidence = confidence_table(records)
    if any(row.paper_rule_middle is not None for row in confidence):
        lines += ["", "## Router confidence at the last evaluation (validation split): share of execute "
                      "probabilities in [0.3, 0.7), mean over seeds", "",
                  "| method | t | n | paper's rule | calibrated threshold |", "|---|---|---|---|---|"]
        for row in confidence:
            lines.append(f"| {row.method} | {row.target:g} | {row.n} | {_f(row.paper_rule_middle)} | "
                         f"{_f(row.calibrated_middle)} |")
    for selection in SELECTIONS:
        lines += ["", f"## Accuracy vs achieved MACs ({SELECTION_TITLES[selection]}; mean ± 95 % t interval over seeds)",
                  "", "| method | t | n | MAC ratio | top-1 |", "|---|---|---|---|---|"]
        for p in accuracy_table(records, selection):
            lines.append(f"| {p.method} | {p.target:g} | {p.n} | {_ci(p.mac_ratio, p.mac_ratio_hw, 3)} | "
                         f"{_ci(p.top1, p.top1_hw, 2)} |")
    if baseline in methods_of(records):
        rows = [p for selection in SELECTIONS for p in power_table(records, baseline, mac_ratios, selection, goal)]
        lines += ["", f"## Power: method − {baseline} (top-1 points, paired seeds; 95 % t interval; seeds a "
                      f"±{goal:g}-point interval needs at the measured sd)", "",
                  "| method | at | selection | n | mean | sd | 95 % interval | within ±" + f"{goal:g}" +
                  " | seeds needed | note |", "|---|---|---|---|---|---|---|---|---|---|"]
        for p in rows:
            interval = ("—" if p.half_width is None or p.mean is None
                        else f"[{p.mean - p.half_width:+.2f}, {p.mean + p.half_width:+.2f}]")
            within = "—" if p.within is None else ("yes" if p.within else "no")
            lines.append(f"| {p.method} | {p.where} | {SELECTION_TITLES[p.selection]} | {p.n} | {_f(p.mean, 2, True)} | "
                         f"{_f(p.sd, 2)} | {interval} | {within} | {p.seeds_needed or '—'} | {p.message or ''} |")
        lines += ["", f"At {focus:g} ({SELECTION_TITLES['final']}):", ""]
        focused = [p for p in rows if p.selection == "final" and p.where in (f"MAC ratio {focus:g}", f"t = {focus:g}")]
        if not focused:
            lines.append(f"- no run of another method paired with {baseline} yet.")
        for p in focused:
            if p.half_width is None:
                lines.append(f"- {p.method} − {baseline} at {p.where}: {p.n} paired seed(s), no interval yet.")
            else:
                verdict = "within" if p.within else "NOT within"
                lines.append(f"- {p.method} − {baseline} at {p.where}: {p.mean:+.2f} ± {p.half_width:.2f} points "
                             f"over {p.n} seeds (sd {p.sd:.2f}): {verdict} ±{goal:g}; ±{goal:g} needs "
                             f"{p.seeds_needed or 'more than 1000'} seeds at this sd.")
    lines += ["", markdown_report(records, baseline, mac_ratios, resamples).rstrip("\n")] \
        if baseline in methods_of(records) else []
    summaries = path_summaries(records, results_dir)
    if any(s.runs for s in summaries):
        titles = " | ".join(_bin_title(lo, hi) for lo, hi in PATH_COUNT_BINS)
        lines += ["", "## Path stability from the runs' paths.jsonl (probe set, paper's rule, eval mode)", "",
                  "Persistence ratio = Σ path_flips / Σ path_flips_chance over a run's snapshot intervals, pooled "
                  "over runs (below 1: paths persist beyond independent redraws at the same per-block rates). "
                  "Changes per image = intervals in which an image's whole path changed; chance = the same under "
                  "independent redraws (1 − Π_b(1 − c_b) per interval). Histogram: share of probe images by "
                  "number of path changes over the run.", "",
                  f"| method | runs | intervals / run | persistence ratio | changes / image | chance | {titles} |",
                  "|---|---|---|---|---|---|" + "---|" * len(PATH_COUNT_BINS)]
        for s in summaries:
            if not s.runs:
                lines.append(f"| {s.method} | 0 | — | — | — | — |" + " — |" * len(PATH_COUNT_BINS))
                continue
            hist = " | ".join(f"{h:.3f}" for h in s.histogram)
            lines.append(f"| {s.method} | {s.runs} | {s.intervals} | {_f(s.ratio)} | {_f(s.changes_mean, 2)} | "
                         f"{_f(s.chance_changes_mean, 2)} | {hist} |")
        epochs = sorted({e for s in summaries for e, _, _ in s.by_epoch})
        lines += ["", "Path flips per epoch (0-based; mean over the epoch's intervals and the runs): observed / chance", "",
                  "| method | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
        for s in summaries:
            cells = {e: f"{f:.4f} / {c:.4f}" for e, f, c in s.by_epoch}
            lines.append(f"| {s.method} | " + " | ".join(cells.get(e, "—") for e in epochs) + " |")
    return "\n".join(lines) + "\n"


def cli(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spnet_dist.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("records", help="JSON lines, one run record each (format: the module docstring)")
    p.add_argument("--baseline", required=True, help="the method every other one is compared with")
    p.add_argument("--mac-ratios", type=float, nargs="+", default=list(DEFAULT_MAC_RATIOS))
    p.add_argument("--resamples", type=int, default=RESAMPLES)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default=None,
                   help="write the full report (target table, intervals, power, path stability) to this file")
    p.add_argument("--expected-runs", type=int, default=None, help="runs of the complete grid (labels a partial report)")
    p.add_argument("--title", default="Matched-cost comparison", help="the report's title (with --out)")
    p.add_argument("--runs-dir", default=None,
                   help="where the runs' paths.jsonl are, for the path-stability section (spnet-sweep's out_dir; "
                        "default: the records' directory)")
    args = p.parse_args(argv)
    try:
        records = load_records(args.records)
        if args.baseline not in methods_of(records) and (records or args.out is None):
            raise CompareError(f"no records of method {args.baseline!r} (methods: {methods_of(records)})")
        if args.out is None:
            print(markdown_report(records, args.baseline, args.mac_ratios, args.resamples, seed=args.seed), end="")
        else:
            runs_dir = Path(args.runs_dir) if args.runs_dir else Path(args.records).parent
            text = full_report(records, args.baseline, runs_dir, args.mac_ratios,
                               args.expected_runs, resamples=args.resamples, title=args.title,
                               source=args.records)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
            print(args.out)
    except (CompareError, OSError, json.JSONDecodeError) as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
