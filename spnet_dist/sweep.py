"""``spnet-sweep``: a grid of config variants x seeds on one machine, with a report and plots.

A sweep file (YAML) names a base config, overrides shared by every run, the seeds and the
variants (each a list of dotted overrides)::

    base: ../configs/demo.yaml          # relative to the sweep file
    out_dir: runs/sweeps/rates          # relative to the current directory
    seeds: [0, 1, 2, 3, 4]
    overrides: [schedule.epochs=8]      # every run
    variants:
      baseline_t0.3: {method: baseline, overrides: [teacher.enabled=false, loss.target_rate=0.3]}
      spnet_t0.3:    {method: SP-Net,   overrides: [loss.target_rate=0.3]}
      exp1_t0.3:     {method: EXP-1, seeds: [0, 1, 2], overrides: [loss.stage_heads=false]}

    spnet-sweep sweeps/rates.yaml --jobs 1 --threads 1 --nice 10

Every run is an ordinary ``python -m spnet_dist.train`` process writing its own run directory
``<out_dir>/runs/<variant>/seed<k>``; its final evaluation (the last line of ``metrics.jsonl``)
is appended to ``<out_dir>/results.jsonl`` together with the exact overrides it ran with.

Resumable: a (variant, seed) whose record is in ``results.jsonl`` with the same overrides is
not run again, so an interrupted sweep continues where it stopped. A run directory left by an
interrupted run is moved aside (``<dir>.incomplete-<n>``), never deleted or written into.
After the grid, ``report.md`` (per variant: mean ± std and min/max over seeds of top-1, MAC
ratio and execution rate) and two PNGs are written: accuracy vs MAC ratio (one point per seed,
a line per method through the variant means) and the seed spread of top-1 per variant.
``--report-only`` rebuilds them from ``results.jsonl`` without running anything.

Comparison mode: a ``compare`` section makes the sweep also write ``comparison.md``, the
matched-cost comparison of every method with the baseline (:func:`spnet_dist.compare.full_report`:
target table, accuracy vs achieved MACs with 95 % intervals, paired differences at common MAC
ratios with bootstrap intervals, final and best-validation epoch, path stability)::

    compare: {baseline: baseline, title: "Fashion-MNIST at matched cost", mac_ratios: [0.3, 0.5, 0.7]}
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from . import compare as C
from .run_dir import RunDirectory, read_jsonl

RESULTS = "results.jsonl"
REPORT = "report.md"
COMPARISON = "comparison.md"
PLOT_ACC_MACS = "accuracy_vs_macs.png"
PLOT_SPREAD = "seed_spread.png"
# Metrics copied from the run's final evaluation record into results.jsonl.
METRICS = ("top1", "mac_ratio", "exec_rate", "gmacs", "static_gmacs")
# (key, column title, decimals); spnet-train's metrics.jsonl gives top1 in percent.
REPORTED = (("top1", "top-1 (%)", 2), ("mac_ratio", "MAC ratio", 3), ("exec_rate", "exec. rate", 3))


class SweepError(ValueError):
    """A malformed sweep file; the message names the file and the key."""


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    overrides: tuple[str, ...]
    target_rate: Optional[float] = None
    seeds: Optional[tuple[int, ...]] = None  # None: the sweep's seeds


@dataclass(frozen=True)
class Comparison:
    """The sweep file's ``compare`` section: which method the others are compared with."""
    baseline: str
    title: str = "Matched-cost comparison"
    mac_ratios: tuple[float, ...] = C.DEFAULT_MAC_RATIOS


@dataclass
class Sweep:
    path: Path
    base: Path
    out_dir: Path
    seeds: list[int]
    overrides: tuple[str, ...]
    variants: list[Variant] = field(default_factory=list)
    compare: Optional[Comparison] = None

    def runs(self) -> list[tuple[Variant, int]]:
        """The grid in execution order: seed-major, so a stopped sweep has every variant at equal n."""
        return [(v, s) for s in self.seeds for v in self.variants if v.seeds is None or s in v.seeds]

    def run_overrides(self, variant: Variant, seed: int) -> list[str]:
        """Every override of one run, shared ones first (later ones win in ``spnet-train``)."""
        return [*self.overrides, *variant.overrides, f"run.seed={seed}",
                f"run.out_dir={self.run_dir(variant, seed)}", "run.progress=none"]

    def run_dir(self, variant: Variant, seed: int) -> Path:
        return self.out_dir / "runs" / variant.name / f"seed{seed}"


# ------------------------------------------------------------------------------------------ parsing
def load_sweep(path: str | os.PathLike, out_dir: Optional[str] = None) -> Sweep:
    """Read and check a sweep file.

    Args:
        path: the YAML sweep file.
        out_dir: overrides the file's ``out_dir``.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping at the top level")
    unknown = set(raw) - {"base", "out_dir", "seeds", "overrides", "variants", "compare"}
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}")
    if "base" not in raw:
        raise SweepError(f"{path}: 'base' (the config every run starts from) is missing")
    base = (path.parent / str(raw["base"])).resolve()
    if not base.is_file():
        raise SweepError(f"{path}: base: no such config {base}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                           for s in seeds):
        raise SweepError(f"{path}: seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: seeds: {seeds} has duplicates")
    shared = _override_list(raw.get("overrides", []), f"{path}: overrides")
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise SweepError(f"{path}: variants: expected a non-empty mapping name -> {{method, overrides}}")
    variants = []
    for name, spec in variants_raw.items():
        where = f"{path}: variants.{name}"
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise SweepError(f"{where}: a variant name must be a plain directory name")
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"method", "overrides", "seeds"}:
            raise SweepError(f"{where}: expected keys 'method', 'overrides' and 'seeds', got {spec!r}")
        ovr = _override_list(spec.get("overrides", []), f"{where}.overrides")
        own_seeds = spec.get("seeds")
        if own_seeds is not None and (not isinstance(own_seeds, list) or not own_seeds
                                      or not set(own_seeds) <= set(seeds)):
            raise SweepError(f"{where}.seeds: must be a non-empty subset of the sweep's seeds {seeds}, got {own_seeds!r}")
        variants.append(Variant(name, str(spec.get("method", name)), ovr, _target_rate(shared + ovr),
                                None if own_seeds is None else tuple(own_seeds)))
    out = Path(out_dir if out_dir is not None else raw.get("out_dir", f"runs/sweeps/{path.stem}"))
    comparison = _comparison(raw.get("compare"), [v.method for v in variants], f"{path}: compare")
    return Sweep(path, base, out, list(seeds), shared, variants, comparison)


def _comparison(value: Any, methods: list[str], where: str) -> Optional[Comparison]:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"baseline", "title", "mac_ratios"}:
        raise SweepError(f"{where}: expected keys 'baseline', 'title' and 'mac_ratios', got {value!r}")
    baseline = value.get("baseline")
    if baseline not in methods:
        raise SweepError(f"{where}.baseline: {baseline!r} is not the method of any variant "
                         f"({sorted(set(methods))})")
    ratios = value.get("mac_ratios", list(C.DEFAULT_MAC_RATIOS))
    if (not isinstance(ratios, list) or not ratios
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios)):
        raise SweepError(f"{where}.mac_ratios: expected a non-empty list of numbers in (0, 1], got {ratios!r}")
    title = value.get("title", Comparison.title)
    if not isinstance(title, str) or not title:
        raise SweepError(f"{where}.title: expected a non-empty string, got {title!r}")
    return Comparison(baseline, title, tuple(float(r) for r in ratios))


def _override_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(o, str) and "=" in o for o in value):
        raise SweepError(f"{where}: expected a list of 'section.key=value' strings, got {value!r}")
    for o in value:
        if o.split("=", 1)[0].strip() in ("run.seed", "run.out_dir"):
            raise SweepError(f"{where}: {o!r}: run.seed and run.out_dir are set by the sweep")
    return tuple(value)


def _target_rate(overrides: Sequence[str]) -> Optional[float]:
    rate = None
    for o in overrides:
        key, value = o.split("=", 1)
        if key.strip() == "loss.target_rate":
            parsed = yaml.safe_load(value)
            rate = None if parsed is None else float(parsed)
    return rate


def overrides_key(overrides: Sequence[str]) -> str:
    """A short fingerprint of a run's overrides (run.out_dir excluded: moving a sweep keeps it)."""
    kept = [o for o in overrides if not o.startswith("run.out_dir=")]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ results
def read_results(path: Path) -> list[dict]:
    """Records of ``results.jsonl``, with the run directory's rule for a damaged line: a torn last
    line (killed writer) is ignored with a warning, any other bad line is an error naming it."""
    return read_jsonl(path)


def final_metrics(run_dir: Path) -> dict:
    """The last evaluation record of a finished run, restricted to :data:`METRICS`."""
    run = RunDirectory(run_dir)
    metrics, last = run.metrics, run.last_metrics()
    if last is None:
        raise RuntimeError(f"{metrics}: no evaluation record (the run did not finish)")
    missing = [k for k in METRICS if k not in last]
    if missing:
        raise RuntimeError(f"{metrics}: last record lacks {missing}")
    return {k: last[k] for k in METRICS} | {"epoch": last.get("epoch")}


# Keys of every evaluation record copied into the results record's per-epoch list.
EPOCH_KEYS = ("epoch", "step", "top1", "mac_ratio", "exec_rate", "gate_threshold", "test_top1", "test_mac_ratio",
              "test_exec_rate", "paper_rule_top1", "paper_rule_exec_rate", "paper_rule_mac_ratio")
# Keys of the last evaluation record copied as they are.
FINAL_KEYS = ("gate_threshold", "calibration_converged", "paper_rule_top1", "paper_rule_exec_rate",
              "paper_rule_mac_ratio", "gate_prob_hist", "paper_rule_gate_prob_hist", "exec_rates", "test_exec_rates",
              "test_paper_rule_top1", "test_paper_rule_exec_rate", "test_paper_rule_mac_ratio",
              "test_paper_rule_exec_rates", "loss")


def run_summary(run_dir: Path) -> dict:
    """What ``spnet_dist.compare`` reads of a finished run, from every evaluation record.

    ``final_*``: the last record; ``bestval_*``: the record of the best validation top-1 (the
    first of equals, as the trainer's ``best`` checkpoint); ``besttest_top1``: the best test top-1
    over the records (optimistic: chosen on the reported split). The reported split is the test
    split when the records have one (``test_*`` keys), else the validation split
    (``reported_split`` says which). Path-stability lists are concatenated over the records.
    """
    records = RunDirectory(run_dir).read_metrics()
    if not records:
        raise RuntimeError(f"{RunDirectory(run_dir).metrics}: no evaluation record (the run did not finish)")
    split = "test" if all("test_top1" in r for r in records) else "val"
    pre = "test_" if split == "test" else ""
    last = records[-1]
    best = max(range(len(records)), key=lambda i: (records[i]["top1"], -i))
    besttest = max(range(len(records)), key=lambda i: (records[i][f"{pre}top1"], -i))
    out = {"reported_split": split,
           "final_top1": last[f"{pre}top1"], "final_mac_ratio": last[f"{pre}mac_ratio"],
           "final_exec_rate": last[f"{pre}exec_rate"],
           "bestval_epoch": records[best].get("epoch"), "bestval_top1": records[best][f"{pre}top1"],
           "bestval_mac_ratio": records[best][f"{pre}mac_ratio"], "bestval_exec_rate": records[best][f"{pre}exec_rate"],
           "besttest_epoch": records[besttest].get("epoch"), "besttest_top1": records[besttest][f"{pre}top1"],
           "epochs": [{k: r[k] for k in EPOCH_KEYS if k in r} for r in records]}
    out |= {k: last[k] for k in FINAL_KEYS if k in last}
    for key in ("path_flips", "path_flips_chance", "path_changed", "path_steps"):
        out[key] = [v for r in records for v in (r.get(key) or [])]
    return out


def _move_aside(run_dir: Path) -> Optional[Path]:
    if not run_dir.exists():
        return None
    n = 0
    while (aside := run_dir.with_name(f"{run_dir.name}.incomplete-{n}")).exists():
        n += 1
    os.replace(run_dir, aside)
    return aside


TRAIN_COMMAND = (sys.executable, "-m", "spnet_dist.train")
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_one(sweep: Sweep, variant: Variant, seed: int, threads: int, nice: int,
            command: Sequence[str] = TRAIN_COMMAND) -> dict:
    """Train one (variant, seed) in a child process and return its results record.

    Args:
        sweep: the sweep.
        variant: which variant.
        seed: ``run.seed``.
        threads: OMP/MKL/torch intra-op threads of the child.
        nice: niceness added to the child (0 = unchanged).
        command: the trainer; ``--config <base> <overrides>`` are appended.
    """
    run_dir = sweep.run_dir(variant, seed)
    _move_aside(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    overrides = sweep.run_overrides(variant, seed)
    cmd = [*command, "--config", str(sweep.base), *overrides]
    # Each run is its own single-process job: launcher variables of this process (a sweep started
    # under torchrun, or after init_distributed in the same interpreter) must not make the child
    # believe it is one rank of a larger job.
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_path = run_dir.parent / f"seed{seed}.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=(lambda: os.nice(nice)) if nice else None)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{variant.name} seed {seed} failed (exit {proc.returncode}), see {log_path}: {tail[0]}")
    return {"variant": variant.name, "method": variant.method, "seed": seed,
            "target_rate": variant.target_rate, "overrides_key": overrides_key(overrides),
            "overrides": [*sweep.overrides, *variant.overrides], **final_metrics(run_dir), **run_summary(run_dir),
            "wall_s": round(wall, 1), "run_dir": str(run_dir)}


def pending_runs(sweep: Sweep, records: Iterable[dict]) -> list[tuple[Variant, int]]:
    """Grid cells without a matching record (same variant, seed and overrides)."""
    done = {(r.get("variant"), r.get("seed"), r.get("overrides_key")) for r in records}
    return [(v, s) for v, s in sweep.runs()
            if (v.name, s, overrides_key(sweep.run_overrides(v, s))) not in done]


def run_sweep(sweep: Sweep, jobs: int = 1, threads: int = 1, nice: int = 10, progress: bool = True,
              command: Sequence[str] = TRAIN_COMMAND) -> list[dict]:
    """Run every pending cell of the grid, ``jobs`` processes at a time; return all current records.

    Records are appended to ``results.jsonl`` as each run finishes (one line, flushed), so killing
    the sweep loses at most the runs in flight. A failed run is reported and skipped; the others go on.
    """
    from tqdm import tqdm

    if jobs < 1 or threads < 1:
        raise SweepError(f"--jobs and --threads must be >= 1, got {jobs}, {threads}")
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    results_path = sweep.out_dir / RESULTS
    records = read_jsonl(results_path, drop_torn=True)  # the appends below start on a line of their own
    todo = pending_runs(sweep, records)
    total = len(sweep.runs())
    failures = []
    bar = tqdm(total=total, initial=total - len(todo), desc="sweep", unit="run", disable=not progress)
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool, open(results_path, "a") as out:
        futures = {pool.submit(run_one, sweep, v, s, threads, nice, command): (v, s) for v, s in todo}
        for fut in cf.as_completed(futures):
            v, s = futures[fut]
            try:
                record = fut.result()
            except Exception as exc:  # one bad run must not stop the grid
                failures.append(str(exc))
                bar.write(f"FAILED: {exc}")
            else:
                out.write(json.dumps(record) + "\n")
                out.flush()
                records.append(record)
                bar.set_postfix_str(f"{v.name} s{s}: top1 {record['top1']:.1f} %")
            bar.update(1)
    bar.close()
    if failures:
        print(f"{len(failures)} run(s) failed; rerun the same command to retry them", file=sys.stderr)
    return records


# ------------------------------------------------------------------------------------------ report
def summarize(values: Sequence[float]) -> dict:
    """n, mean, sample std (0 for one value), min, max."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def current_records(sweep: Sweep, records: Iterable[dict]) -> dict[str, list[dict]]:
    """Per variant (sweep order), the latest record of each seed that matches today's overrides."""
    by_variant: dict[str, dict[int, dict]] = {v.name: {} for v in sweep.variants}
    keys = {(v.name, s): overrides_key(sweep.run_overrides(v, s)) for v, s in sweep.runs()}
    for r in records:
        if keys.get((r.get("variant"), r.get("seed"))) == r.get("overrides_key"):
            by_variant[r["variant"]][r["seed"]] = r
    return {name: [seeds[s] for s in sorted(seeds)] for name, seeds in by_variant.items()}


def write_comparison(sweep: Sweep, records: Iterable[dict]) -> Path:
    """Write ``comparison.md`` (the ``compare`` section's matched-cost report) from the records
    that match today's overrides; a partial grid is labelled so in the report's first lines."""
    assert sweep.compare is not None
    current = [r for rs in current_records(sweep, records).values() for r in rs]
    text = C.full_report(current, sweep.compare.baseline, sweep.out_dir, sweep.compare.mac_ratios,
                         expected_runs=len(sweep.runs()), title=sweep.compare.title,
                         source=str(sweep.out_dir / RESULTS))
    path = sweep.out_dir / COMPARISON
    path.write_text(text)
    return path


def write_report(sweep: Sweep, records: Iterable[dict]) -> Path:
    """Write ``report.md`` and the PNG plots next to ``results.jsonl``; returns the report path."""
    grouped = current_records(sweep, records)
    lines = [f"# Sweep `{sweep.path.name}`", "",
             f"Base config `{sweep.base.name}`, seeds {sweep.seeds}, shared overrides: "
             + (", ".join(f"`{o}`" for o in sweep.overrides) or "none") + ".", "",
             "Mean ± sample std over seeds, [min, max]. MAC ratio = dynamic / static MACs of the "
             "gated network; exec. rate = mean fraction of executed blocks (validation set).", "",
             "| variant | method | t | n | " + " | ".join(label for _, label, _ in REPORTED) + " |",
             "|---|---|---|---|" + "---|" * len(REPORTED)]
    for v in sweep.variants:
        recs = grouped[v.name]
        if not recs:
            lines.append(f"| {v.name} | {v.method} | {_fmt_rate(v.target_rate)} | 0 |" + " — |" * len(REPORTED))
            continue
        cells = []
        for key, _, digits in REPORTED:
            s = summarize([r[key] for r in recs])
            cells.append(f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]")
        lines.append(f"| {v.name} | {v.method} | {_fmt_rate(v.target_rate)} | {len(recs)} | " + " | ".join(cells) + " |")
    lines += ["", "Per-variant overrides:", ""]
    lines += [f"- `{v.name}`: " + (", ".join(f"`{o}`" for o in v.overrides) or "none") for v in sweep.variants]
    lines += ["", f"Plots: `{PLOT_ACC_MACS}`, `{PLOT_SPREAD}`. Raw records: `{RESULTS}`.", ""]
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    report = sweep.out_dir / REPORT
    report.write_text("\n".join(lines))
    write_plots(sweep, grouped)
    return report


def _fmt_rate(rate: Optional[float]) -> str:
    return "—" if rate is None else f"{rate:g}"


def write_plots(sweep: Sweep, grouped: dict[str, list[dict]]) -> list[Path]:
    """Accuracy vs MAC ratio (a point per seed, a line per method) and top-1 seed spread per variant."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(v.method for v in sweep.variants))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in methods:
        means = []
        for v in (v for v in sweep.variants if v.method == method):
            recs = grouped[v.name]
            if not recs:
                continue
            xs, ys = [r["mac_ratio"] for r in recs], [r["top1"] for r in recs]
            ax.scatter(xs, ys, color=colours[method], alpha=0.45, s=18)
            means.append((statistics.fmean(xs), statistics.fmean(ys)))
        if means:
            means.sort()
            ax.plot(*zip(*means), "-o", color=colours[method], label=method, markersize=6)
    ax.set_xlabel("MAC ratio (dynamic / static)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("accuracy vs computation (dots: seeds, line: mean)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    paths.append(sweep.out_dir / PLOT_ACC_MACS)
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    names = [v.name for v in sweep.variants]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4.5))
    for i, v in enumerate(sweep.variants):
        ys = [r["top1"] for r in grouped[v.name]]
        if not ys:
            continue
        ax.scatter([i] * len(ys), ys, color=colours[v.method], alpha=0.6, s=22)
        s = summarize(ys)
        ax.errorbar([i + 0.15], [s["mean"]], yerr=[s["std"]], fmt="s", color=colours[v.method], capsize=4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("seed spread (dots: seeds, square: mean ± std)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(sweep.out_dir / PLOT_SPREAD)
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------ CLI
def cli(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="spnet-sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring of spnet_dist.sweep for the file format.")
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--out-dir", default=None, help="overrides the file's out_dir")
    p.add_argument("--jobs", type=int, default=1, help="training processes at a time (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads per process (default 1)")
    p.add_argument("--nice", type=int, default=10, help="niceness added to each run (default 10; 0 = none)")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and plots from results.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.out_dir)
        if args.report_only:
            records = read_results(sweep.out_dir / RESULTS)
        else:
            records = run_sweep(sweep, args.jobs, args.threads, args.nice, progress=not args.no_progress)
    except SweepError as exc:
        print(f"spnet-sweep: {exc}", file=sys.stderr)
        return 2
    print(write_report(sweep, records))
    if sweep.compare is not None:
        try:
            print(write_comparison(sweep, records))
        except C.CompareError as exc:  # e.g. every baseline run failed: the sweep's report stands
            print(f"spnet-sweep: {sweep.path}: compare: {exc}", file=sys.stderr)
            return 2
    return 0 if not pending_runs(sweep, records) else 1


if __name__ == "__main__":
    sys.exit(cli())
