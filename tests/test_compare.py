"""spnet_dist.compare against hand computations: curves, paired differences, bootstrap, selection, persistence."""
import json
import statistics

import numpy as np
import pytest

from spnet_dist import compare as C


def rec(method, target, seed, mac, top1, **kw):
    """A record whose final and best-val epochs coincide unless ``kw`` says otherwise."""
    return {"method": method, "target": target, "seed": seed, "final_top1": top1, "final_mac_ratio": mac,
            "bestval_top1": kw.pop("bestval_top1", top1), "bestval_mac_ratio": kw.pop("bestval_mac_ratio", mac),
            "besttest_top1": kw.pop("besttest_top1", top1), **kw}


# Two methods x 2 seeds x 3 targets; (MAC ratio, top-1) chosen so every number below is by hand.
HAND = [
    rec("spnet", 0.3, 0, 0.30, 80.0), rec("spnet", 0.5, 0, 0.50, 84.0), rec("spnet", 0.7, 0, 0.70, 86.0),
    rec("base", 0.3, 0, 0.35, 82.0), rec("base", 0.5, 0, 0.55, 85.0), rec("base", 0.7, 0, 0.75, 87.0),
    rec("spnet", 0.3, 1, 0.32, 81.0), rec("spnet", 0.5, 1, 0.52, 85.0), rec("spnet", 0.7, 1, 0.72, 88.0),
    rec("base", 0.3, 1, 0.30, 80.0), rec("base", 0.5, 1, 0.50, 83.0), rec("base", 0.7, 1, 0.70, 86.0),
]


# ----------------------------------------------------------------------------- (a) curves

def test_interpolation_by_hand():
    curve = C.seed_curve(HAND, "base", 0)
    assert curve == [(0.35, 82.0), (0.55, 85.0), (0.75, 87.0)]
    assert C.interpolate(curve, 0.5) == pytest.approx(82 + 3 * 0.15 / 0.2)   # 84.25
    assert C.interpolate(curve, 0.7) == pytest.approx(85 + 2 * 0.15 / 0.2)   # 86.5
    assert C.interpolate(curve, 0.35) == 82.0 and C.interpolate(curve, 0.75) == 87.0  # the ends themselves
    assert C.interpolate(curve, 0.34) is None and C.interpolate(curve, 0.76) is None  # never extrapolated
    assert C.interpolate([(0.4, 70.0)], 0.4) == 70.0 and C.interpolate([], 0.4) is None


def test_seed_curve_sorts_by_achieved_mac_and_averages_ties():
    records = [rec("m", 0.3, 0, 0.45, 70.0), rec("m", 0.5, 0, 0.40, 72.0), rec("m", 0.7, 0, 0.45, 80.0)]
    # t = 0.5 landed below t = 0.3: the curve follows the achieved MAC ratio, not the target
    assert C.seed_curve(records, "m", 0) == [(0.40, 72.0), (0.45, 75.0)]


def test_method_curve_is_the_mean_over_seeds_per_target():
    points = C.method_curve(HAND, "spnet")
    assert [p.target for p in points] == [0.3, 0.5, 0.7] and all(p.n == 2 for p in points)
    mid = points[1]
    assert mid.mac_ratio == pytest.approx(0.51) and mid.top1 == pytest.approx(84.5)
    assert mid.top1_sd == pytest.approx(statistics.stdev([84.0, 85.0]))
    assert mid.mac_ratio_sd == pytest.approx(statistics.stdev([0.50, 0.52]))


# ----------------------------------------------------------------------------- (b) paired differences

def test_paired_difference_by_hand():
    at = {d.mac_ratio: d for d in C.paired_difference(HAND, "spnet", "base", (0.3, 0.5, 0.7))}
    # seed 0 at 0.5: spnet 84, base 84.25 -> -0.25; seed 1: spnet 81 + 4 * 0.18 / 0.2 = 84.6, base 83 -> +1.6
    mid = at[0.5]
    assert mid.seeds == (0, 1) and mid.differences == pytest.approx((-0.25, 1.6))
    assert mid.mean == pytest.approx(0.675) and mid.message is None
    assert mid.top1_a == pytest.approx((84 + 84.6) / 2) and mid.top1_b == pytest.approx((84.25 + 83) / 2)
    # two seeds: the resampled means are -0.25 (p 1/4), 0.675 (1/2), 1.6 (1/4): the 95 % interval is [min, max]
    assert (mid.low, mid.high) == pytest.approx((-0.25, 1.6))
    # seed 0 at 0.7: 86 - 86.5 = -0.5; seed 1: 85 + 3 * 0.18 / 0.2 = 87.7, minus 86 = +1.7
    assert at[0.7].differences == pytest.approx((-0.5, 1.7)) and at[0.7].mean == pytest.approx(0.6)
    # spnet's seeds cover 0.32-0.70, base's 0.35-0.70: 0.3 lies outside the overlap 0.35-0.70
    low = at[0.3]
    assert low.mean is None and low.n == 0 and low.overlap == pytest.approx((0.35, 0.70))
    assert "outside the overlap" in low.message and "0.350-0.700" in low.message


def test_a_ratio_just_outside_the_overlap_is_compared_at_its_nearest_end_and_labelled():
    # HAND's overlap is 0.35-0.70. 0.33 is 0.02 below it (within SNAP = 0.03): compared at 0.35, where
    # seed 0 reads spnet 80 + 4 * 0.05 / 0.2 = 81.0 vs base 82.0 (-1.0) and seed 1 reads
    # 81 + 4 * 0.03 / 0.2 = 81.6 vs base 80 + 3 * 0.05 / 0.2 = 80.75 (+0.85)
    low, high, far = C.paired_difference(HAND, "spnet", "base", (0.33, 0.72, 0.3))
    assert low.compared_at == pytest.approx(0.35) and low.mac_ratio == 0.33
    assert low.differences == pytest.approx((-1.0, 0.85)) and low.mean == pytest.approx(-0.075)
    assert "compared at 0.350, the overlap's low end (0.020 from 0.33" in low.message
    # 0.72 is 0.02 above the high end 0.70: read at 0.70 (the by-hand values of the 0.7 comparison)
    assert high.compared_at == pytest.approx(0.70) and high.differences == pytest.approx((-0.5, 1.7))
    assert "the overlap's high end" in high.message
    # 0.3 is 0.05 below: no number
    assert far.mean is None and far.compared_at is None and "outside the overlap" in far.message
    # inside the overlap nothing is moved or labelled; snap=0 refuses 0.33
    inside = C.paired_difference(HAND, "spnet", "base", (0.5,))[0]
    assert inside.compared_at == 0.5 and inside.message is None
    assert C.paired_difference(HAND, "spnet", "base", (0.33,), snap=0.0)[0].mean is None
    # the power table carries the label next to the numbers
    rows = {p.where: p for p in C.power_table(HAND, "base", (0.33,)) if p.method == "spnet"}
    assert rows["MAC ratio 0.33"].mean == pytest.approx(-0.075) and "compared at 0.350" in rows["MAC ratio 0.33"].message


def test_pairing_uses_the_same_seed_only():
    # seed 2 of spnet alone does not enter: nothing to pair it with
    extra = HAND + [rec("spnet", t, 2, t, 99.0) for t in (0.3, 0.5, 0.7)]
    assert C.paired_difference(extra, "spnet", "base", (0.5,))[0].seeds == (0, 1)
    with pytest.raises(C.CompareError, match="no seed in common"):
        C.paired_difference([rec("a", 0.5, 0, 0.5, 1.0), rec("b", 0.5, 1, 0.5, 1.0)], "a", "b", (0.5,))
    with pytest.raises(C.CompareError, match="no records of method 'c'"):
        C.paired_difference(HAND, "spnet", "c")


def test_no_overlap_is_a_clear_message():
    records = [rec("a", t, 0, x, 70.0) for t, x in ((0.3, 0.2), (0.5, 0.4))] + \
              [rec("b", t, 0, x, 75.0) for t, x in ((0.3, 0.6), (0.5, 0.8))]
    for d in C.paired_difference(records, "a", "b", (0.3, 0.5, 0.7)):
        assert d.mean is None and d.low is None
        assert d.message.startswith(f"MAC ratio {d.mac_ratio:g} is outside the overlap")
        assert "a 0.200-0.400, b 0.600-0.800; the overlap is empty" in d.message


def test_one_paired_seed_has_a_mean_but_no_interval():
    one = [r for r in HAND if r["seed"] == 0]
    d = C.paired_difference(one, "spnet", "base", (0.5,))[0]
    assert d.mean == pytest.approx(-0.25) and d.low is None and "no interval" in d.message


def test_best_val_selection_uses_its_own_points():
    records = [rec("a", t, s, t, 80.0, bestval_top1=81.0, bestval_mac_ratio=t + 0.01) for t in (0.3, 0.7) for s in (0, 1)]
    records += [rec("b", t, s, t, 79.0, bestval_top1=79.5) for t in (0.3, 0.7) for s in (0, 1)]
    final = C.paired_difference(records, "a", "b", (0.5,), "final")[0]
    best = C.paired_difference(records, "a", "b", (0.5,), "best_val")[0]
    assert final.mean == pytest.approx(1.0) and best.mean == pytest.approx(1.5)
    assert best.overlap == pytest.approx((0.31, 0.70))


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_contains_the_mean_narrows_with_seeds_and_is_seeded():
    draws = np.random.default_rng(0).normal(size=64)
    widths = []
    for n in (4, 16, 64):
        part = draws[:n]
        values = (1.0 + 2.0 * (part - part.mean()) / part.std(ddof=1)).tolist()  # mean 1, sd 2 at every n
        low, high = C.bootstrap_interval(values, resamples=10_000, seed=0)
        assert low < statistics.fmean(values) < high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # the standard error halves when n quadruples: so does the width, roughly
    assert 0.3 < widths[2] / widths[1] < 0.7
    assert C.bootstrap_interval(draws[:8].tolist(), seed=3) == C.bootstrap_interval(draws[:8].tolist(), seed=3)
    assert C.bootstrap_interval(draws[:8].tolist(), seed=3) != C.bootstrap_interval(draws[:8].tolist(), seed=4)
    assert C.bootstrap_interval([2.5, 2.5, 2.5]) == (2.5, 2.5)


def test_bootstrap_resamples_n_of_n_by_hand():
    # Two values: a resample of two has mean 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4), so the central
    # 40 % (quantiles 0.3 and 0.7) is the single value 0.5; the 95 % interval is [0, 1].
    assert C.bootstrap_interval([0.0, 1.0], level=0.4) == (0.5, 0.5)
    assert C.bootstrap_interval([0.0, 1.0], level=0.95) == (0.0, 1.0)


def test_bootstrap_interval_matches_the_normal_approximation():
    values = np.random.default_rng(1).normal(0.0, 1.0, size=200).tolist()
    low, high = C.bootstrap_interval(values, resamples=20_000, seed=0)
    half = 1.96 * statistics.stdev(values) / len(values) ** 0.5
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)


# ----------------------------------------------------------------------------- (c) selection

def test_selection_table_side_by_side():
    records = [rec("a", 0.5, s, 0.5, top1, bestval_top1=top1 + 1, bestval_mac_ratio=0.52, besttest_top1=top1 + 2)
               for s, top1 in ((0, 80.0), (1, 82.0))]
    (row,) = C.selection_table(records)
    assert (row.method, row.target, row.n) == ("a", 0.5, 2)
    assert (row.final_top1, row.bestval_top1, row.besttest_top1) == pytest.approx((81.0, 82.0, 83.0))
    assert row.final_top1_sd == pytest.approx(2 ** 0.5) and row.bestval_mac_ratio == pytest.approx(0.52)
    report = C.markdown_report(HAND + records[:0], "base")
    assert "best-on-test (optimistic)" in report and "best-validation epoch" in report and "final epoch" in report


# ----------------------------------------------------------------------------- (d) persistence

def test_persistence_by_hand():
    a0 = rec("a", 0.5, 0, 0.5, 80.0, path_flips=[0.1, 0.2], path_flips_chance=[0.2, 0.4])
    a1 = rec("a", 0.5, 1, 0.5, 80.0, path_flips=[0.3], path_flips_chance=[0.3])
    a2 = rec("a", 0.7, 0, 0.7, 80.0)  # no path records (yet)
    assert C.persistence_ratio(a0) == pytest.approx(0.3 / 0.6) and C.persistence_ratio(a1) == pytest.approx(1.0)
    assert C.persistence_ratio(a2) is None
    (p,) = C.persistence_by_method([a0, a1, a2])
    assert p.ratio == pytest.approx((0.3 + 0.3) / (0.6 + 0.3))  # pooled over runs, not the mean of ratios
    assert p.run_mean == pytest.approx(0.75) and p.missing == 1 and len(p.runs) == 2
    # paired against a baseline per (t, seed): only pairs where both have path records
    b0 = rec("b", 0.5, 0, 0.5, 80.0, path_flips=[0.4], path_flips_chance=[0.5])
    b1 = rec("b", 0.5, 1, 0.5, 80.0, path_flips=[0.1], path_flips_chance=[0.4])
    b2 = rec("b", 0.7, 0, 0.7, 80.0, path_flips=[0.1], path_flips_chance=[0.2])
    pairs, diffs = C.persistence_difference([a0, a1, a2, b0, b1, b2], "a", "b")
    assert pairs == [(0.5, 0), (0.5, 1)] and diffs == pytest.approx([0.5 - 0.8, 1.0 - 0.25])
    report = C.markdown_report([a0, a1, a2, b0, b1, b2], "b", (0.5,), resamples=10)
    hw = 12.706 * statistics.stdev([-0.3, 0.75]) / 2 ** 0.5
    assert f"| a | 2 | +0.225 | {statistics.stdev([-0.3, 0.75]):.3f} | [{0.225 - hw:+.3f}, {0.225 + hw:+.3f}] |" in report
    with pytest.raises(C.CompareError, match="path_flips has 2 values, path_flips_chance 1"):
        C.as_record(rec("a", 0.5, 0, 0.5, 80.0, path_flips=[0.1, 0.2], path_flips_chance=[0.2]))
    with pytest.raises(C.CompareError, match="path_steps 1"):
        C.as_record(rec("a", 0.5, 0, 0.5, 80.0, path_flips=[0.1, 0.2], path_flips_chance=[0.2, 0.1], path_steps=[5]))
    assert C.as_record(rec("a", 0.5, 0, 0.5, 80.0, path_flips=[0.1], path_flips_chance=[0.2], path_steps=[5])).path_steps == (5,)


# ----------------------------------------------------------------------------- records and CLI

def test_record_format_errors_name_the_record():
    with pytest.raises(C.CompareError, match=r"record 1: missing \['bestval_top1'\]"):
        bad = dict(HAND[1])
        del bad["bestval_top1"]
        C.as_records([HAND[0], bad])
    with pytest.raises(C.CompareError, match="given twice .*spnet-sweep --report-only"):
        C.as_records([HAND[0], HAND[0]])
    alias = dict(HAND[0])
    alias["target_rate"] = alias.pop("target")
    assert C.as_record(alias).target == 0.3


def test_cli_prints_the_report(tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in HAND) + "\n")
    assert C.cli([str(path), "--baseline", "base", "--mac-ratios", "0.5", "--resamples", "1000"]) == 0
    out = capsys.readouterr().out
    assert "| spnet | 0.5 | final epoch | 2 | +0.67 | 1.31 | [-0.25, +1.60] |" in out  # 0.675 in binary: 0.67499...
    assert C.cli([str(path), "--baseline", "nobody"]) == 2


# ----------------------------------------------------------------------------- (e) target adherence

def test_target_table_by_hand():
    records = [rec("a", 0.5, 0, 0.52, 80.0, final_exec_rate=0.51, exec_rate=0.500, test_paper_rule_exec_rate=0.62,
                   calibration_converged=True),
               rec("a", 0.5, 1, 0.55, 81.0, final_exec_rate=0.535, exec_rate=0.502, test_paper_rule_exec_rate=0.66,
                   calibration_converged=False),
               rec("a", 0.3, 0, 0.33, 78.0, final_exec_rate=0.27, exec_rate=0.3, calibration_converged=True)]
    low, mid = C.target_table(records)
    assert (mid.method, mid.target, mid.n) == ("a", 0.5, 2)
    assert mid.exec_rate == pytest.approx(0.5225) and mid.exec_rate_sd == pytest.approx(statistics.stdev([0.51, 0.535]))
    assert mid.val_exec_rate == pytest.approx(0.501) and mid.paper_rule_exec_rate == pytest.approx(0.64)
    assert mid.max_deviation == pytest.approx(0.035) and mid.within is False  # one seed 0.035 off: the cell fails
    assert mid.converged == 1
    assert low.max_deviation == pytest.approx(0.03) and low.within is True  # exactly at the tolerance passes
    assert low.paper_rule_exec_rate is None
    (bare,) = C.target_table([rec("b", 0.5, 0, 0.5, 70.0)])  # records without the rates: dashes, no error
    assert bare.exec_rate is None and bare.within is None


def test_target_table_reads_the_paper_rule_rate_of_the_reported_split():
    # A run without a test split (digits) reports its validation split: the paper's-rule column must
    # show the validation record's rate, not a dash; a run with a test split keeps the test one.
    val_only = rec("a", 0.5, 0, 0.52, 80.0, reported_split="val", paper_rule_exec_rate=0.61)
    with_test = rec("b", 0.5, 0, 0.52, 80.0, reported_split="test", paper_rule_exec_rate=0.61,
                    test_paper_rule_exec_rate=0.66)
    by_method = {row.method: row for row in C.target_table([val_only, with_test])}
    assert by_method["a"].paper_rule_exec_rate == pytest.approx(0.61)
    assert by_method["b"].paper_rule_exec_rate == pytest.approx(0.66)


# ----------------------------------------------------------------------------- (f) intervals and power

def test_t_quantiles_and_half_width_by_hand():
    assert C.t_quantile_975(1) == 12.706 and C.t_quantile_975(5) == 2.571 and C.t_quantile_975(30) == 2.042
    assert C.t_quantile_975(60) == pytest.approx(2.000, abs=0.002)  # tables: 2.000
    assert C.t_quantile_975(120) == pytest.approx(1.980, abs=0.002)
    # values 1, 2, 3: sd 1, n 3, df 2 -> 4.303 / sqrt(3)
    assert C.t_half_width([1.0, 2.0, 3.0]) == pytest.approx(4.303 / 3 ** 0.5)
    assert C.t_half_width([1.0]) is None
    with pytest.raises(C.CompareError, match="df >= 1"):
        C.t_quantile_975(0)


def test_seeds_for_half_width_by_hand():
    # sd 2: n = 17 gives 2.120 * 2 / sqrt(17) = 1.028 > 1; n = 18 gives 2.110 * 2 / sqrt(18) = 0.995
    assert C.seeds_for_half_width(2.0, 1.0) == 18
    # sd 1: n = 6 gives 2.571 / sqrt(6) = 1.050; n = 7 gives 2.447 / sqrt(7) = 0.925
    assert C.seeds_for_half_width(1.0, 1.0) == 7
    assert C.seeds_for_half_width(0.0) == 2 and C.seeds_for_half_width(100.0, 0.01, limit=50) is None


def test_accuracy_table_intervals():
    _, a5, _ = C.accuracy_table(HAND, "final")[:3]  # spnet first: the records' order
    assert (a5.method, a5.target, a5.n) == ("spnet", 0.5, 2)
    assert a5.top1 == pytest.approx(84.5) and a5.top1_hw == pytest.approx(12.706 * statistics.stdev([84, 85]) / 2 ** 0.5)
    assert a5.mac_ratio == pytest.approx(0.51)


def test_power_at_a_target_and_at_a_mac_ratio_by_hand():
    rows = {p.where: p for p in C.power_table(HAND, "base", (0.5,), "final", goal=1.0)}
    # at t = 0.5, no interpolation: seed 0 84 - 85 = -1, seed 1 85 - 83 = +2
    t5 = rows["t = 0.5"]
    assert t5.n == 2 and t5.mean == pytest.approx(0.5) and t5.sd == pytest.approx(statistics.stdev([-1, 2]))
    assert t5.half_width == pytest.approx(12.706 * t5.sd / 2 ** 0.5) and t5.within is False
    assert t5.seeds_needed == C.seeds_for_half_width(t5.sd, 1.0)
    # at MAC ratio 0.5 the interpolated differences of test_paired_difference_by_hand
    m5 = rows["MAC ratio 0.5"]
    assert m5.mean == pytest.approx(0.675) and m5.n == 2
    assert set(rows) == {"MAC ratio 0.5", "t = 0.3", "t = 0.5", "t = 0.7"}


# ----------------------------------------------------------------------------- (g) path files

def _line(step, epoch, rows):
    """A paths.jsonl line (training.paths format) from 0/1 rows (images x blocks)."""
    blocks = len(rows[0])
    return {"step": step, "epoch": epoch, "images": len(rows),
            "exec_rates": [sum(r[b] for r in rows) / len(rows) for b in range(blocks)],
            "paths": [sum(1 << b for b, v in enumerate(r) if v) for r in rows]}


# 4 images x 2 blocks, 3 snapshots; rates away from 0.5 (at 0.5 the chance term is 0.5 whatever the other rate)
S0 = [[1, 1], [1, 1], [1, 0], [0, 0]]   # rates (0.75, 0.5)
S1 = [[1, 1], [1, 0], [1, 0], [1, 0]]   # (1.0, 0.25): image 1 flips block 1, image 3 block 0: 2 flips of 8
S2 = [[1, 1], [1, 0], [0, 0], [1, 0]]   # (0.75, 0.25): image 2 flips block 0: 1 flip of 8
PATH_LINES = [_line(0, 0, S0), _line(10, 0, S1), _line(20, 1, S2)]


def test_path_history_by_hand():
    h = C.path_history(PATH_LINES)
    assert h.intervals == 2 and h.changes == (0, 1, 1, 1) and h.epochs == (0, 1)
    assert h.flips == pytest.approx((2 / 8, 1 / 8))
    # interval 1: p = (0.75, 0.5), q = (1, 0.25): c_0 = 0.75 * 0 + 0.25 * 1 = 0.25, c_1 = 0.5 * 0.75 + 0.5 * 0.25 = 0.5
    # interval 2: p = (1, 0.25), q = (0.75, 0.25): c_0 = 1 * 0.25 = 0.25, c_1 = 0.25 * 0.75 + 0.75 * 0.25 = 0.375
    assert h.flips_chance == pytest.approx((0.375, 0.3125))
    # chance of a path change per image: 1 - 0.75 * 0.5 = 0.625, then 1 - 0.75 * 0.625 = 0.53125
    assert h.chance_changes == pytest.approx(1.15625)
    assert C.change_histogram(h.changes) == pytest.approx([0.25, 0.75, 0, 0, 0, 0])
    assert C.change_histogram([0, 2, 4, 7, 12], ((0, 0), (1, 3), (4, None))) == pytest.approx([0.2, 0.2, 0.6])
    assert C.path_history(PATH_LINES[:1]).intervals == 0
    with pytest.raises(C.CompareError, match="step 10: 3 images x 2 blocks, the first has 4 x 2"):
        C.path_history([PATH_LINES[0], _line(10, 0, S1[:3])])


def test_path_history_agrees_with_the_trainers_metric():
    torch = pytest.importorskip("torch")
    from spnet_dist.training.paths import path_metrics
    h = C.path_history(PATH_LINES)
    for (a, b), flips, chance in zip(((S0, S1), (S1, S2)), h.flips, h.flips_chance):
        m = path_metrics(torch.tensor(a), torch.tensor(b))
        assert m["path_flips"] == pytest.approx(flips) and m["path_flips_chance"] == pytest.approx(chance)


def _sweep_dir(tmp_path):
    """A results.jsonl with sweep-layout run directories: baseline and spnet, 2 seeds, t = 0.5 only
    for spnet seed 1 (a partial sweep)."""
    out = tmp_path / "sweep"
    records = []
    for method, variant, seeds in (("baseline", "baseline_t0.5", (0, 1)), ("SP-Net", "spnet_t0.5", (0, 1))):
        for seed in seeds:
            top1 = 80.0 + seed + (1.5 if method == "SP-Net" else 0.0)
            records.append(rec(method, 0.5, seed, 0.52, top1, variant=variant, final_exec_rate=0.5 + 0.01 * seed,
                               exec_rate=0.5, test_paper_rule_exec_rate=0.6, calibration_converged=True,
                               run_dir=f"nowhere/{variant}/seed{seed}"))
            run = out / "runs" / variant / f"seed{seed}"
            run.mkdir(parents=True)
            lines = PATH_LINES if method == "SP-Net" else [PATH_LINES[0], _line(10, 0, S2), _line(20, 1, S0)]
            (run / "paths.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (out / "results.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return out


def test_path_summaries_find_the_files_of_the_sweep_layout(tmp_path):
    out = _sweep_dir(tmp_path)
    base, spnet = C.path_summaries(C.load_records(out / "results.jsonl"), out)
    assert spnet.runs == 2 and spnet.missing == 0 and spnet.intervals == 2
    assert spnet.ratio == pytest.approx((3 / 8) / 0.6875)  # (2/8 + 1/8) / (0.375 + 0.3125), equal runs
    assert spnet.changes_mean == pytest.approx(0.75) and spnet.chance_changes_mean == pytest.approx(1.15625)
    assert [e for e, _, _ in spnet.by_epoch] == [0, 1]
    assert [v for _, f, c in spnet.by_epoch for v in (f, c)] == pytest.approx([0.25, 0.375, 0.125, 0.3125])
    # baseline: S0 -> S2 -> S0: images 1, 2, 3 change twice each (image 0 never)
    assert base.changes_mean == pytest.approx(1.5) and base.histogram[2] == pytest.approx(0.75)
    assert C.path_summaries(C.load_records(out / "results.jsonl"), tmp_path / "elsewhere")[0].missing == 2


def test_cli_writes_the_full_report_and_labels_it_partial(tmp_path):
    out = _sweep_dir(tmp_path)
    report = tmp_path / "docs" / "report.md"
    assert C.cli([str(out / "results.jsonl"), "--baseline", "baseline", "--out", str(report),
                  "--expected-runs", "72", "--resamples", "200"]) == 0
    text = report.read_text()
    assert "**PARTIAL: 4 of 72 runs finished**" in text
    assert "| SP-Net | 0.5 | 2 | 0.500 | 0.505 ± 0.007 | 0.010 | yes | 0.600 | 2/2 |" in text
    # SP-Net - baseline at t = 0.5: +1.5 on both seeds (sd 0): within ±1 with 2 seeds
    assert "- SP-Net − baseline at t = 0.5: +1.50 ± 0.00 points over 2 seeds (sd 0.00): within ±1" in text
    assert "## Path stability" in text and "| SP-Net | 2 | 2 | 0.545 | 0.75 | 1.16 |" in text
    assert "epoch 0" in text and "0.2500 / 0.3750" in text
    # records copied away from their runs (docs/sweeps/...): the path files are found through --runs-dir
    (tmp_path / "docs" / "results.jsonl").write_text((out / "results.jsonl").read_text())
    assert C.cli([str(tmp_path / "docs" / "results.jsonl"), "--baseline", "baseline", "--out", str(report),
                  "--resamples", "200"]) == 0
    assert "## Path stability" not in report.read_text()
    assert C.cli([str(tmp_path / "docs" / "results.jsonl"), "--baseline", "baseline", "--out", str(report),
                  "--resamples", "200", "--runs-dir", str(out)]) == 0
    assert "| SP-Net | 2 | 2 | 0.545 | 0.75 | 1.16 |" in report.read_text()
    assert f"--runs-dir {out} --out" in report.read_text()
    assert C.cli([str(out / "results.jsonl"), "--baseline", "nobody", "--out", str(report)]) == 2
    # before the first run finishes: a status-only report, not an error
    (out / "empty.jsonl").write_text("")
    assert C.cli([str(out / "empty.jsonl"), "--baseline", "baseline", "--out", str(report), "--expected-runs", "72"]) == 0
    assert "**PARTIAL: 0 of 72 runs finished**" in report.read_text()


def test_router_confidence_by_hand():
    hist = [0] * 20
    hist[5], hist[6], hist[13], hist[14] = 10, 30, 20, 40  # bins 6..13 are [0.3, 0.7): 50 of 100
    calibrated = [0] * 20
    calibrated[0], calibrated[10] = 90, 10
    assert C.middle_share(hist) == pytest.approx(0.5) and C.middle_share([0] * 20) is None
    assert C.middle_share([1, 2, 3, 4], 0.25, 0.75) == pytest.approx(0.5)
    with pytest.raises(C.CompareError, match="edges of 4 bins"):
        C.middle_share([1, 2, 3, 4], 0.3, 0.7)
    records = [rec("a", 0.5, s, 0.5, 80.0, paper_rule_gate_prob_hist=hist, gate_prob_hist=calibrated) for s in (0, 1)]
    (row,) = C.confidence_table(records)
    assert row.n == 2 and row.paper_rule_middle == pytest.approx(0.5) and row.calibrated_middle == pytest.approx(0.1)
    assert C.confidence_table([rec("b", 0.5, 0, 0.5, 80.0)])[0].paper_rule_middle is None
