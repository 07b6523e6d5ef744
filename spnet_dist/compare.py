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
    seeds, with the mean and a seeded percentile-bootstrap interval over seeds.
(c) :func:`selection_table`: the final epoch and the best-validation epoch side by side (test
    top-1 and MAC ratio of each), and best-on-test, labelled optimistic: it selects the epoch
    on the numbers it reports (what the official code prints).
(d) :func:`persistence_ratio` / :func:`persistence_by_method`: Σ path_flips / Σ path_flips_chance;
    below 1, a sample's path persists between snapshots more than independent draws at the same
    per-block execution rates would.

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

    python -m spnet_dist.compare results.jsonl --baseline baseline [--mac-ratios 0.3 0.5 0.7]
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
RESAMPLES = 10_000
_REQUIRED = ("method", "target", "seed", "final_top1", "final_mac_ratio", "bestval_top1", "bestval_mac_ratio",
             "besttest_top1")


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
    missing = [k for k in _REQUIRED if values.get(k) is None]
    if missing:
        raise CompareError(f"{where}: missing {missing} (keys: {sorted(values)[:12]})")
    try:
        flips = tuple(float(v) for v in values.get("path_flips") or ())
        chance = tuple(float(v) for v in values.get("path_flips_chance") or ())
        record = RunRecord(str(values["method"]), float(values["target"]), int(values["seed"]),
                           *(float(values[k]) for k in _REQUIRED[3:]), flips, chance)
    except (TypeError, ValueError) as err:
        raise CompareError(f"{where}: {err}") from None
    if len(flips) != len(chance):
        raise CompareError(f"{where}: path_flips has {len(flips)} values, path_flips_chance {len(chance)}")
    return record


def as_records(records: Iterable[Mapping[str, Any] | RunRecord]) -> list[RunRecord]:
    """Every record through :func:`as_record`; a (method, target, seed) given twice is an error."""
    out, seen = [], set()
    for i, r in enumerate(records):
        record = as_record(r, f"record {i}")
        key = (record.method, record.target, record.seed)
        if key in seen:
            raise CompareError(f"record {i}: method {key[0]!r}, target {key[1]:g}, seed {key[2]} given twice")
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
                      resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0) -> list[PairedDifference]:
    """A − B (top-1 points) at each MAC ratio, per seed on the seeds both methods ran, then mean and interval.

    Each seed's difference is its A curve minus its B curve, both interpolated at the MAC ratio
    (:func:`interpolate`). A MAC ratio is compared only inside the overlap of both methods'
    achieved ranges (:func:`achieved_range` over the paired seeds: every seed of both methods
    reaches it, nothing is extrapolated); outside, the result carries a ``message`` instead of
    numbers. The interval is :func:`bootstrap_interval` over seeds (``seed`` seeds it); with one
    seed there is a mean but no interval.

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
        if not lo <= x <= hi:
            where = "the overlap is empty" if lo > hi else f"the overlap is {lo:.3f}-{hi:.3f}"
            out.append(PairedDifference(**common, message=(
                f"MAC ratio {x:g} is outside the overlap of the achieved ranges over seeds {seeds}: {method_a} "
                f"{range_a[0]:.3f}-{range_a[1]:.3f}, {method_b} {range_b[0]:.3f}-{range_b[1]:.3f}; {where} "
                f"(no extrapolation)")))
            continue
        ya = [interpolate(curves[method_a, s], x) for s in seeds]
        yb = [interpolate(curves[method_b, s], x) for s in seeds]
        diffs = [a - b for a, b in zip(ya, yb)]
        low = high = None
        message = None
        if len(diffs) > 1:
            low, high = bootstrap_interval(diffs, resamples, level, seed)
        else:
            message = f"one paired seed ({seeds[0]}): no interval"
        out.append(PairedDifference(**common, seeds=tuple(seeds), differences=tuple(diffs),
                                    top1_a=statistics.fmean(ya), top1_b=statistics.fmean(yb),
                                    mean=statistics.fmean(diffs), sd=_sd(diffs), low=low, high=high, message=message))
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
            for d in paired_difference(records, method, baseline, mac_ratios, selection, resamples, level, seed):
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
    return "\n".join(lines) + "\n"


def cli(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spnet_dist.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("records", help="JSON lines, one run record each (format: the module docstring)")
    p.add_argument("--baseline", required=True, help="the method every other one is compared with")
    p.add_argument("--mac-ratios", type=float, nargs="+", default=list(DEFAULT_MAC_RATIOS))
    p.add_argument("--resamples", type=int, default=RESAMPLES)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = p.parse_args(argv)
    try:
        print(markdown_report(load_records(args.records), args.baseline, args.mac_ratios, args.resamples,
                              seed=args.seed), end="")
    except (CompareError, OSError, json.JSONDecodeError) as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
