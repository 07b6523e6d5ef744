"""spnet-sweep: parsing, the grid, resumability, the report's statistics, the plots.

The trainer is replaced by tests/workers/fake_sweep_train.py (instant, deterministic metrics);
one slow test runs the real spnet-train for two steps per run.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from spnet_dist import sweep as S

FAKE = (sys.executable, str(Path(__file__).parent / "workers" / "fake_sweep_train.py"))


def write_sweep(tmp_path: Path, body: str) -> Path:
    (tmp_path / "base.yaml").write_text("model: {name: spnet_cifar_resnet20}\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(body)
    return path


GRID = """
base: base.yaml
seeds: [0, 1, 2]
overrides: [schedule.epochs=1]
variants:
  base_t0.3: {method: baseline, overrides: [loss.target_rate=0.3]}
  sp_t0.3:   {method: SP-Net, overrides: [loss.target_rate=0.3, teacher.enabled=true]}
  sp_t0.5:   {method: SP-Net, seeds: [0, 1], overrides: [loss.target_rate=0.5]}
"""


@pytest.fixture
def fake_log(tmp_path, monkeypatch):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TRAIN_LOG", str(log))
    return log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_grid_order_per_variant_seeds_and_overrides(tmp_path):
    sw = S.load_sweep(write_sweep(tmp_path, GRID), out_dir=str(tmp_path / "out"))
    assert [(v.name, s) for v, s in sw.runs()] == [
        ("base_t0.3", 0), ("sp_t0.3", 0), ("sp_t0.5", 0), ("base_t0.3", 1), ("sp_t0.3", 1), ("sp_t0.5", 1),
        ("base_t0.3", 2), ("sp_t0.3", 2)]
    v = sw.variants[1]
    assert sw.run_overrides(v, 2) == ["schedule.epochs=1", "loss.target_rate=0.3", "teacher.enabled=true",
                                      "run.seed=2", f"run.out_dir={tmp_path / 'out/runs/sp_t0.3/seed2'}",
                                      "run.progress=none"]
    assert [v.target_rate for v in sw.variants] == [0.3, 0.3, 0.5]


@pytest.mark.parametrize("body, match", [
    ("seeds: [0]\nvariants: {a: {}}\n", "'base'"),
    ("base: nope.yaml\nvariants: {a: {}}\n", "no such config"),
    ("base: base.yaml\nseeds: [0, 0]\nvariants: {a: {}}\n", "duplicates"),
    ("base: base.yaml\nvariants: {}\n", "variants"),
    ("base: base.yaml\nvariants: {a: {overrides: [run.seed=3]}}\n", "set by the sweep"),
    ("base: base.yaml\nvariants: {a: {overrides: [lr]}}\n", "section.key=value"),
    ("base: base.yaml\nseeds: [0]\nvariants: {a: {seeds: [1]}}\n", "subset"),
    ("base: base.yaml\nvariants: {a: {colour: red}}\n", "expected keys"),
    ("base: base.yaml\nvariant: {}\n", "unknown key"),
    ("base: base.yaml\nvariants: {a: {method: m}}\ncompare: {baseline: b}\n", r"compare\.baseline: 'b'"),
    ("base: base.yaml\nvariants: {a: {method: m}}\ncompare: {baseline: m, mac_ratios: [0]}\n", r"compare\.mac_ratios"),
    ("base: base.yaml\nvariants: {a: {method: m}}\ncompare: {baseline: m, colour: red}\n", "compare: expected keys"),
])
def test_bad_sweep_files_name_the_key(tmp_path, body, match):
    with pytest.raises(S.SweepError, match=match):
        S.load_sweep(write_sweep(tmp_path, body))


def test_sweep_runs_every_cell_once_and_resumes(tmp_path, fake_log):
    sw = S.load_sweep(write_sweep(tmp_path, GRID), out_dir=str(tmp_path / "out"))
    records = S.run_sweep(sw, progress=False, nice=0, command=FAKE)
    assert len(records) == len(calls(fake_log)) == 8
    assert S.pending_runs(sw, records) == []
    # Resumed: nothing is run again, and the results file is not duplicated.
    S.run_sweep(sw, progress=False, nice=0, command=FAKE)
    assert len(calls(fake_log)) == 8
    assert len(S.read_results(sw.out_dir / S.RESULTS)) == 8
    # Changing one variant's overrides re-runs exactly that variant's seeds.
    sw.variants[2] = S.Variant("sp_t0.5", "SP-Net", ("loss.target_rate=0.5", "loss.beta=1"), 0.5, (0, 1))
    assert [(v.name, s) for v, s in S.pending_runs(sw, S.read_results(sw.out_dir / S.RESULTS))] == [
        ("sp_t0.5", 0), ("sp_t0.5", 1)]


def test_interrupted_run_directory_is_moved_aside_not_reused(tmp_path, fake_log):
    sw = S.load_sweep(write_sweep(tmp_path, GRID), out_dir=str(tmp_path / "out"))
    stale = sw.run_dir(sw.variants[0], 0)
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"epoch": 0}\n')  # a killed run's partial output
    S.run_sweep(sw, progress=False, nice=0, command=FAKE)
    aside = stale.with_name("seed0.incomplete-0")
    assert (aside / "metrics.jsonl").read_text() == '{"epoch": 0}\n'
    assert (stale / "metrics.jsonl").read_text().count("\n") == 2


def test_a_failed_run_is_reported_and_retried_next_time(tmp_path, fake_log, capsys):
    body = GRID.replace("overrides: [schedule.epochs=1]", "overrides: [schedule.epochs=1, fail.seed=1]")
    sw = S.load_sweep(write_sweep(tmp_path, body), out_dir=str(tmp_path / "out"))
    records = S.run_sweep(sw, progress=False, nice=0, command=FAKE)
    assert sorted({r["seed"] for r in records}) == [0, 2]
    assert "3 run(s) failed" in capsys.readouterr().err
    assert {s for _, s in S.pending_runs(sw, records)} == {1}


def test_a_sweep_killed_while_appending_its_results_continues_cleanly(tmp_path, fake_log):
    sw = S.load_sweep(write_sweep(tmp_path, GRID), out_dir=str(tmp_path / "out"))
    S.run_sweep(sw, progress=False, nice=0, command=FAKE)
    results = sw.out_dir / S.RESULTS
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # killed during the last append
    with pytest.warns(UserWarning, match="torn last line"):
        S.run_sweep(sw, progress=False, nice=0, command=FAKE)  # re-runs that cell, appends on a new line
    assert len(calls(fake_log)) == 9
    assert len(S.read_results(results)) == 8  # no warning, no error: the fragment is gone


def test_final_metrics_follow_the_run_directorys_rule(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    record = {"top1": 50.0, "mac_ratio": 0.5, "exec_rate": 0.6, "gmacs": 1.0, "static_gmacs": 2.0, "epoch": 3}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n" + '{"top1": 7')
    with pytest.warns(UserWarning, match="torn last line"):
        assert S.final_metrics(run) == record
    (run / "metrics.jsonl").write_text('{"top1": 7\n' + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a JSON record"):
        S.final_metrics(run)


def test_report_statistics_and_plots(tmp_path, fake_log):
    sw = S.load_sweep(write_sweep(tmp_path, GRID), out_dir=str(tmp_path / "out"))
    records = S.run_sweep(sw, progress=False, nice=0, command=FAKE)
    # A stale record of an older override set must not count.
    records.append({"variant": "base_t0.3", "seed": 0, "overrides_key": "old", "top1": 0.0,
                    "mac_ratio": 0.0, "exec_rate": 0.0})
    report = S.write_report(sw, records).read_text()
    # fake top-1 = 0.5 + 0.1 t + 0.01 seed -> t = 0.3, seeds 0..2: 53 %, 54 %, 55 %
    tops = [53.0, 54.0, 55.0]
    line = next(l for l in report.splitlines() if l.startswith("| sp_t0.3 "))
    assert f"{statistics.fmean(tops):.2f} ± {statistics.stdev(tops):.2f} [53.00, 55.00]" in line
    assert "| 3 |" in line
    line = next(l for l in report.splitlines() if l.startswith("| sp_t0.5 "))
    assert "55.50 ± 0.71 [55.00, 56.00]" in line and "0.550 ± 0.000" in line and "| 2 |" in line
    for name in (S.PLOT_ACC_MACS, S.PLOT_SPREAD):
        assert (sw.out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarize_by_hand():
    s = S.summarize([1.0, 2.0, 4.0])
    assert (s["n"], s["min"], s["max"]) == (3, 1.0, 4.0)
    assert s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) ** 0.5 / 2 ** 0.5)
    assert S.summarize([5.0])["std"] == 0.0


def test_cli_report_only_and_bad_file(tmp_path, fake_log, capsys):
    path = write_sweep(tmp_path, GRID)
    out = str(tmp_path / "out")
    assert S.cli([str(path), "--out-dir", out, "--report-only"]) == 1  # nothing run yet: pending
    assert "| base_t0.3 | baseline | 0.3 | 0 |" in (tmp_path / "out" / S.REPORT).read_text()
    assert S.cli([str(tmp_path / "missing.yaml")]) == 2
    assert "no such sweep file" in capsys.readouterr().err


COMPARED = """
base: base.yaml
seeds: [0, 1]
variants:
  base_t0.3: {method: baseline, overrides: [loss.target_rate=0.3]}
  base_t0.5: {method: baseline, overrides: [loss.target_rate=0.5]}
  sp_t0.3:   {method: SP-Net, overrides: [loss.target_rate=0.3, fake.bonus=2]}
  sp_t0.5:   {method: SP-Net, overrides: [loss.target_rate=0.5, fake.bonus=2]}
compare: {baseline: baseline, title: Fake at matched cost, mac_ratios: [0.45]}
"""


def test_comparison_mode_writes_the_matched_cost_report(tmp_path, fake_log, capsys):
    # The fake gives both methods MAC ratios 0.35 / 0.55 and SP-Net 2 points more top-1 at each:
    # at MAC ratio 0.45 (inside the overlap) the paired difference is +2.00 for both seeds.
    path = write_sweep(tmp_path, COMPARED)
    out = tmp_path / "out"
    sw = S.load_sweep(path, out_dir=str(out))
    assert sw.compare == S.Comparison("baseline", "Fake at matched cost", (0.45,))
    S.run_sweep(sw, progress=False, nice=0, command=FAKE)
    # a record of an older override set of a cell that ran again: the comparison must not count it
    # (spnet-compare would refuse the same method, target and seed twice)
    with (out / S.RESULTS).open("a") as f:
        f.write(json.dumps({"variant": "sp_t0.5", "method": "SP-Net", "seed": 0, "target_rate": 0.5,
                            "overrides_key": "old", "final_top1": 0.0, "final_mac_ratio": 0.5, "bestval_top1": 0.0,
                            "bestval_mac_ratio": 0.5, "besttest_top1": 0.0}) + "\n")
    assert S.cli([str(path), "--out-dir", str(out), "--report-only"]) == 0
    assert str(out / S.COMPARISON) in capsys.readouterr().out
    report = (out / S.COMPARISON).read_text()
    assert report.startswith("# Fake at matched cost") and "8 runs of 8 (complete)" in report
    assert "| SP-Net | 0.45 | final epoch | 2 | +2.00 | 0.00 | [+2.00, +2.00] |" in report


@pytest.mark.slow
def test_real_trainer_two_steps_per_run(tmp_path):
    body = """
base: {base}
seeds: [0]
overrides: [schedule.epochs=2, schedule.warmup_epochs=0, run.max_steps=2, run.tensorboard=false]
variants:
  baseline: {{method: baseline, overrides: [teacher.enabled=false, loss.stage_heads=false, loss.evo_strategy=none]}}
""".format(base=Path("configs/demo.yaml").resolve())
    path = tmp_path / "real.yaml"
    path.write_text(body)
    sw = S.load_sweep(path, out_dir=str(tmp_path / "out"))
    (record,) = S.run_sweep(sw, progress=False, nice=0)
    assert 0.0 <= record["top1"] <= 100.0 and 0.0 < record["mac_ratio"] <= 1.0
    assert (tmp_path / "out" / "runs" / "baseline" / "seed0" / "metrics.jsonl").is_file()


DOC_SWEEPS = sorted((Path(__file__).resolve().parents[1] / "docs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", DOC_SWEEPS, ids=[p.stem for p in DOC_SWEEPS])
def test_every_documented_sweep_builds_a_valid_config_for_each_run(path):
    """A sweep file in docs/ that a user reruns must not fail at its 20th run on a misspelt override."""
    from spnet_dist.config import load_config

    sweep = S.load_sweep(path)
    assert sweep.runs()
    for variant, seed in sweep.runs():
        cfg = load_config(sweep.base, sweep.run_overrides(variant, seed), check_paths=False, world_size=1)
        assert cfg.run.seed == seed and (variant.target_rate is None or cfg.loss.target_rate == variant.target_rate)
