"""Issue 20: the plots of a matched-cost comparison, from the records spnet-compare reads.

Writes five PNGs into ``--out-dir`` (the numbers behind each are spnet_dist.compare's, so a plot
and report.md never disagree):

- ``accuracy_vs_macs.png``: per method, test top-1 against the achieved MAC ratio at each target
  (mean over seeds, 95 % t intervals on both axes; faint dots: the seeds), final epoch;
- ``difference_vs_baseline.png``: method − baseline at matched MAC ratios (paired seeds, the
  report's bootstrap interval), final and best-validation epoch;
- ``seed_spread.png``: per target, each method's seeds (dots, one colour per seed so the pairing
  shows) and mean ± sd;
- ``path_flips.png``: the share of probe-image block decisions that flipped between consecutive
  path snapshots (the records' path_flips at path_steps), against the optimizer step, mean over a
  method's runs (solid), and the share expected from independent redraws at the same per-block
  rates (dashed); one panel per target;
- ``router_probabilities.png``: the routers' execute probabilities on the validation split at the
  last evaluation, pooled over seeds, under the paper's rule (sigmoid(diff), threshold 0.5) and
  under the calibrated threshold d (sigmoid(diff - d)): the "before and after" of the fix.

    python tools/plot_comparison.py docs/sweeps/fashion/results.jsonl --baseline baseline \\
        --out-dir docs/sweeps/fashion
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

from spnet_dist import compare as C

PLOTS = ("accuracy_vs_macs.png", "difference_vs_baseline.png", "seed_spread.png", "path_flips.png",
         "router_probabilities.png")


# ------------------------------------------------------------------------------------ series (pure)
def flip_series(records: Sequence[C.RunRecord]) -> dict[tuple[str, float], dict]:
    """Per (method, target): the snapshot steps and, per step, the mean over runs of the records'
    path_flips and path_flips_chance (the runs of one recipe snapshot at the same steps; a step
    some runs lack averages over the runs that have it). Runs without path_steps are left out."""
    out: dict[tuple[str, float], dict] = {}
    for r in records:
        if not r.path_steps:
            continue
        series = out.setdefault((r.method, r.target), {"runs": 0, "by_step": {}})
        series["runs"] += 1
        for step, f, c in zip(r.path_steps, r.path_flips, r.path_flips_chance):
            series["by_step"].setdefault(step, []).append((f, c))
    for series in out.values():
        by_step = series.pop("by_step")
        series["steps"] = sorted(by_step)
        series["flips"] = [statistics.fmean(f for f, _ in by_step[s]) for s in series["steps"]]
        series["chance"] = [statistics.fmean(c for _, c in by_step[s]) for s in series["steps"]]
    return out


def probability_densities(records: Sequence[C.RunRecord]) -> dict[tuple[str, float], dict[str, list[float]]]:
    """Per (method, target): the pooled histogram over seeds of each rule, as shares summing to 1
    (``paper``: the paper's rule, ``calibrated``: the calibrated threshold)."""
    pooled: dict[tuple[str, float], dict[str, list[int]]] = {}
    for r in records:
        for rule, counts in (("paper", r.paper_rule_prob_hist), ("calibrated", r.prob_hist)):
            if counts:
                acc = pooled.setdefault((r.method, r.target), {}).setdefault(rule, [0] * len(counts))
                if len(acc) != len(counts):
                    raise C.CompareError(f"{r.method} t={r.target:g} seed {r.seed}: {len(counts)} histogram bins, "
                                         f"other seeds {len(acc)}")
                for i, c in enumerate(counts):
                    acc[i] += c
    return {key: {rule: [c / sum(counts) for c in counts] for rule, counts in rules.items() if sum(counts)}
            for key, rules in pooled.items()}


# ------------------------------------------------------------------------------------ drawing
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise


def _colours(plt, methods: Sequence[str]) -> dict[str, tuple]:
    return {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}


def plot_accuracy_vs_macs(records: Sequence[C.RunRecord], path: Path) -> None:
    plt = _pyplot()
    methods = C.methods_of(records)
    colours = _colours(plt, methods)
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for method in methods:
        points = [p for p in C.accuracy_table(records, "final") if p.method == method]
        seeds = [r.point("final") for r in records if r.method == method]
        ax.scatter(*zip(*seeds), color=colours[method], alpha=0.25, s=12)
        ax.errorbar([p.mac_ratio for p in points], [p.top1 for p in points],
                    xerr=[p.mac_ratio_hw or 0 for p in points], yerr=[p.top1_hw or 0 for p in points],
                    fmt="-o", color=colours[method], capsize=3, markersize=5, label=method)
    ax.set_xlabel("achieved MAC ratio (dynamic / static), test split")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("accuracy vs computation, final epoch\n(mean over seeds, 95 % t intervals; dots: seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, path, 110)


def plot_difference(records: Sequence[C.RunRecord], baseline: str, mac_ratios: Sequence[float], path: Path) -> None:
    plt = _pyplot()
    methods = [m for m in C.methods_of(records) if m != baseline]
    colours = _colours(plt, C.methods_of(records))
    fig, axes = plt.subplots(1, len(C.SELECTIONS), figsize=(11, 4.5), sharey=True)
    for ax, selection in zip(axes, C.SELECTIONS):
        for i, method in enumerate(methods):
            diffs = [d for d in C.paired_difference(records, method, baseline, mac_ratios, selection)
                     if d.mean is not None and d.low is not None]
            offset = (i - (len(methods) - 1) / 2) * 0.012
            ax.errorbar([d.mac_ratio + offset for d in diffs], [d.mean for d in diffs],
                        yerr=[[d.mean - d.low for d in diffs], [d.high - d.mean for d in diffs]],
                        fmt="o", color=colours[method], capsize=3, label=method)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(mac_ratios))
        ax.set_xlabel("MAC ratio (an end of the overlap where the report says so)")
        ax.set_title(f"method − {baseline}, {C.SELECTION_TITLES[selection]}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 difference (points), 95 % bootstrap")
    axes[0].legend()
    _save(plt, fig, path, 110)


def plot_seed_spread(records: Sequence[C.RunRecord], path: Path) -> None:
    plt = _pyplot()
    methods = C.methods_of(records)
    targets = sorted({r.target for r in records})
    seeds = sorted({r.seed for r in records})
    seed_colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(seeds)}
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 4.5), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for i, method in enumerate(methods):
            rs = sorted((r for r in records if r.method == method and r.target == target), key=lambda r: r.seed)
            if not rs:
                continue
            ax.scatter([i - 0.1] * len(rs), [r.final_top1 for r in rs], c=[seed_colours[r.seed] for r in rs], s=20)
            ys = [r.final_top1 for r in rs]
            ax.errorbar([i + 0.15], [statistics.fmean(ys)], yerr=[C._sd(ys)], fmt="s", color="black", capsize=4)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=20, ha="right")
        ax.set_title(f"t = {target:g}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("test top-1 (%), final epoch")
    fig.suptitle("seed spread (dots: seeds, one colour per seed; square: mean ± sd)")
    _save(plt, fig, path, 110)


def plot_path_flips(records: Sequence[C.RunRecord], path: Path) -> bool:
    series = flip_series(records)
    if not series:
        return False
    plt = _pyplot()
    methods = C.methods_of(records)
    colours = _colours(plt, methods)
    targets = sorted({t for _, t in series})
    fig, axes = plt.subplots(1, len(targets), figsize=(4.6 * len(targets), 4.2), sharey=True, squeeze=False)
    for ax, target in zip(axes[0], targets):
        for method in methods:
            s = series.get((method, target))
            if s is None:
                continue
            ax.plot(s["steps"], s["flips"], "-", color=colours[method], label=f"{method} ({s['runs']} runs)")
            ax.plot(s["steps"], s["chance"], "--", color=colours[method], alpha=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"t = {target:g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of block decisions flipped since the last snapshot")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("path flips on the probe set (solid) vs independent redraws at the same rates (dashed)")
    _save(plt, fig, path, 110)
    return True


def plot_router_probabilities(records: Sequence[C.RunRecord], path: Path) -> bool:
    densities = probability_densities(records)
    if not densities:
        return False
    plt = _pyplot()
    methods = C.methods_of(records)
    targets = sorted({t for _, t in densities})
    fig, axes = plt.subplots(len(methods), len(targets), figsize=(3.6 * len(targets), 2.3 * len(methods)),
                             sharex=True, squeeze=False)
    for row, method in enumerate(methods):
        for col, target in enumerate(targets):
            ax = axes[row][col]
            rules = densities.get((method, target), {})
            for rule, style in (("paper", dict(color="tab:red", label="paper's rule: sigmoid(diff)")),
                                ("calibrated", dict(color="tab:blue", label="calibrated: sigmoid(diff − d)"))):
                if rule in rules:
                    shares = rules[rule]
                    edges = [i / len(shares) for i in range(len(shares) + 1)]
                    ax.stairs(shares, edges, **style)
            ax.axvspan(0.3, 0.7, color="grey", alpha=0.12)
            ax.set_title(f"{method}, t = {target:g}", fontsize=9)
            if row == len(methods) - 1:
                ax.set_xlabel("execute probability")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("router execute probabilities, validation split, last evaluation (pooled over seeds; "
                 "shaded: 0.3-0.7)", fontsize=10)
    _save(plt, fig, path, 100)
    return True


def write_plots(records_path: Path, baseline: str, out_dir: Path,
                mac_ratios: Sequence[float] = C.DEFAULT_MAC_RATIOS) -> list[Path]:
    """Every plot this module draws, into ``out_dir``; returns the files written."""
    records = C.load_records(records_path)
    if baseline not in C.methods_of(records):
        raise C.CompareError(f"no records of method {baseline!r} (methods: {C.methods_of(records)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    accuracy, difference, spread, flips, probabilities = (out_dir / name for name in PLOTS)
    plot_accuracy_vs_macs(records, accuracy)
    plot_difference(records, baseline, mac_ratios, difference)
    plot_seed_spread(records, spread)
    written = [accuracy, difference, spread]
    if plot_path_flips(records, flips):
        written.append(flips)
    if plot_router_probabilities(records, probabilities):
        written.append(probabilities)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", type=Path, help="results.jsonl (spnet-compare's record format)")
    p.add_argument("--baseline", required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--mac-ratios", type=float, nargs="+", default=list(C.DEFAULT_MAC_RATIOS))
    args = p.parse_args(argv)
    try:
        for path in write_plots(args.records, args.baseline, args.out_dir, args.mac_ratios):
            print(path)
    except (C.CompareError, OSError) as err:
        print(f"plot_comparison: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
