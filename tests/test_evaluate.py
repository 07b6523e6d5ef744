"""spnet_dist.evaluate.evaluate against a hand computation from logits and gate decisions, on
one rank and on two ranks holding unequal shards."""
import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from spnet_dist.data import build_eval_loader
from spnet_dist.evaluate import evaluate
from spnet_dist.flops import profile_macs

from .dist_helpers import WORKERS, assert_evaluation_matches, eval_problem, hand_evaluation, run_torchrun


def test_evaluate_matches_a_hand_computation_from_logits_and_decisions():
    model, images, targets = eval_problem(7, seed=1)  # seed 0: a stage head happens to score 4/7 too
    profile = profile_macs(model, (8, 8))
    expected = hand_evaluation(model, images, targets, profile)
    # The problem is built so that the wrong readings give other numbers:
    assert expected["top1"] == pytest.approx(100.0 * 4 / 7)  # final head right on indices 0, 2, 4, 6
    with torch.no_grad():
        out = model(images)
    for head in out.stage_logits[:-1]:  # a stage head's top-1 is something else
        assert 100.0 * (head.argmax(1) == targets).sum().item() / 7 != pytest.approx(expected["top1"])
    assert any(0.0 < r < 1.0 for r in expected["exec_rates"])  # blocks really are skipped
    prob_rates = out.gate_probs.double().mean(0).tolist()
    assert prob_rates != pytest.approx(expected["exec_rates"], abs=1e-3)  # rates from probabilities differ

    model.train()  # evaluate() switches to eval mode and back
    loader = build_eval_loader(TensorDataset(images, targets), batch_size=3)  # batches of 3, 3, 1
    record = evaluate(model, loader, profile, torch.device("cpu"))
    assert model.training
    assert_evaluation_matches(record, expected)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_with_unequal_shards_report_the_ratio_of_summed_counts(tmp_path):
    # 7 images over 2 ranks: rank 0 reads indices 0, 2, 4, 6 (all right), rank 1 reads 1, 3, 5
    # (all wrong). Top-1 is 4/7 = 57.1 %; averaging the ranks' accuracies would give 50 %.
    out = tmp_path / "record.json"
    run_torchrun(WORKERS / "evaluate.py", 2, ["--out", str(out), "--images", "7", "--batch-size", "3"])
    record = json.loads(out.read_text())
    assert record["shard_images"] == [4, 3]
    model, images, targets = eval_problem(7)
    expected = hand_evaluation(model, images, targets, profile_macs(model, (8, 8)))
    assert (100.0 + 0.0) / 2 != pytest.approx(expected["top1"])
    assert_evaluation_matches(record, expected)


def test_the_timer_tells_data_time_from_model_time(monkeypatch):
    # Issue 19 finding 7: spnet-eval reported one images/s for decoding and model together. A fake
    # clock (no wall-clock assertion): the loader takes 3 ticks per batch, the forward 1 tick.
    from spnet_dist import evaluate as E

    clock = [0.0]
    monkeypatch.setattr(E.time, "perf_counter", lambda: clock[0])
    model, images, targets = eval_problem(7)
    profile = profile_macs(model, (8, 8))
    loader = build_eval_loader(TensorDataset(images, targets), batch_size=3)  # 3 batches

    class SlowLoader:
        def __iter__(self):
            for batch in loader:
                clock[0] += 3.0
                yield batch

    def forward_tick(module, args, out):
        clock[0] += 1.0

    model.register_forward_hook(forward_tick)
    timer = E.EvalTimer(torch.device("cpu"))
    E.evaluate(model, SlowLoader(), profile, torch.device("cpu"), timer=timer)
    assert (timer.data_seconds, timer.model_seconds) == (9.0, 3.0)


# --------------------------------------------------------------------------------------------
# Calibrating the routers' threshold to the target execution rate (issue 20)
# --------------------------------------------------------------------------------------------
from spnet_dist.evaluate import (Calibration, calibrate_threshold, evaluate_calibrated,  # noqa: E402
                                 threshold_for_rate)

EDGES = (-2.0, 2.0, 4)  # bins (-2,-1], (-1,0], (0,1], (1,2], plus below and above


def test_threshold_for_rate_by_hand():
    # 10 differences: 1 below -2, 2 in (-2,-1], 3 in (-1,0], 2 in (0,1], 1 in (1,2], 1 above 2.
    counts = [1, 2, 3, 2, 1, 1]
    # 30 % above d: the bin above 2 holds 1, (1,2] holds 1, so 1 more of the 2 in (0,1]: d in the
    # middle of that bin (uniform within a bin).
    assert threshold_for_rate(counts, 0.3, EDGES) == pytest.approx(0.5)
    assert threshold_for_rate(counts, 0.2, EDGES) == pytest.approx(1.0)   # exactly the top two bins
    assert threshold_for_rate(counts, 0.5, EDGES) == pytest.approx(-1.0 + 2.0 / 3.0)  # 1 of the 3 in (-1,0]
    assert threshold_for_rate(counts, 0.1, EDGES) == 2.0   # the open bin above: its finite edge
    assert threshold_for_rate(counts, 1.0, EDGES) == -2.0


def test_calibration_finds_the_rate_of_a_known_response_by_bisection():
    # A response in which the logits DO move with the threshold (as downstream routers do): the
    # histogram's proposal is off, bisection must still land within the tolerance.
    def measure(d):
        rate = 1.0 / (1.0 + math.exp(1.7 * (d - 0.8)))  # r(0.8) = 0.5, falls with d
        return rate, None  # no histogram: bracketing steps and bisection only

    result = calibrate_threshold(measure, 0.5, tol=1e-3, max_passes=30)
    assert isinstance(result, Calibration) and result.converged
    assert result.threshold == pytest.approx(0.8, abs=0.01)
    assert result.passes[0][0] == 0.0  # the paper's rule is measured first
    assert abs(result.rate - 0.5) <= 1e-3


def test_calibration_follows_the_histogram_when_it_is_right():
    # Fixed logit differences (no dependence on the paths): the proposal is exact in one step.
    diffs = torch.linspace(-3, 3, 601)

    def measure(d):
        counts = torch.bincount(torch.bucketize(diffs, torch.linspace(-20, 20, 4001)), minlength=4002)
        return (diffs > d).double().mean().item(), counts

    result = calibrate_threshold(measure, 0.3, tol=0.002)
    assert len(result.passes) == 2 and result.converged
    assert result.threshold == pytest.approx(diffs.quantile(0.7).item(), abs=0.02)


def test_calibration_returns_the_closest_pass_when_it_cannot_converge():
    rates = {0.0: 0.9}

    def measure(d):  # a step function: no threshold gives 0.5 exactly
        return (0.9 if d < 1.0 else 0.1), None

    result = calibrate_threshold(measure, 0.5, tol=0.01, max_passes=5)
    assert not result.converged and len(result.passes) == 5
    assert abs(result.rate - 0.5) == pytest.approx(0.4)
    assert rates  # (kept for readability of the response above)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_evaluate_calibrated_meets_the_target_and_records_the_paper_rule(target):
    model, images, targets = eval_problem(200, seed=1)
    profile = profile_macs(model, (8, 8))
    loader = build_eval_loader(TensorDataset(images, targets), batch_size=64)
    paper = evaluate(model, loader, profile, torch.device("cpu"), threshold=0.0)
    record = evaluate_calibrated(model, loader, profile, torch.device("cpu"), target)
    assert abs(record["exec_rate"] - target) <= 0.005
    assert model.gate_threshold == record["gate_threshold"] != 0.0  # left on the model for the next passes
    assert record["paper_rule_exec_rate"] == paper["exec_rate"] and record["paper_rule_top1"] == paper["top1"]
    assert record["paper_rule_gate_prob_hist"] == paper["gate_prob_hist"]
    assert sum(record["gate_prob_hist"]) == 200 * model.num_blocks
    # the calibrated record is a plain evaluation at that threshold
    again = evaluate(model, loader, profile, torch.device("cpu"))
    assert again["exec_rates"] == record["exec_rates"] and again["top1"] == record["top1"]


def _path_dependent_response(target_shift: float = 0.3, gain: float = 0.5):
    # Downstream routers see the blocks before them, so moving d also moves the logit differences:
    # the measured rate is that of diffs > gain * d + shift, while the histogram reports the
    # differences at d = 0 -- its proposal is off, only measured slopes find the target quickly.
    diffs = torch.linspace(-3, 3, 601)
    edges = torch.linspace(-20, 20, 4001)

    def measure(d):
        moved = diffs - (gain * d + target_shift)
        counts = torch.bincount(torch.bucketize(moved + d, edges), minlength=4002)  # as if static
        return (moved > 0).double().mean().item(), counts

    return measure


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_calibration_converges_in_few_passes_when_the_histogram_is_off(target):
    result = calibrate_threshold(_path_dependent_response(), target, tol=0.005, max_passes=8)
    assert result.converged and abs(result.rate - target) <= 0.005
    # histogram guess, then secant steps on a (nearly) linear response: a handful of passes
    # (bisection from the first bracket alone needs about 8 at this tolerance)
    assert len(result.passes) <= 4, result.passes


def test_a_flat_secant_does_not_throw_the_threshold_to_a_saturated_end():
    # r = 0.9 on a wide plateau near 0, then falls: the secant through two plateau-ish points is
    # nearly flat and would jump hundreds of logits; the clamp keeps the step within 4x the last.
    def measure(d):
        rate = 0.9 - 1e-4 * d if d < 20.0 else max(0.0, 0.9 - 1e-4 * d - 0.1 * (d - 20.0))
        return rate, None

    result = calibrate_threshold(measure, 0.5, tol=0.005, max_passes=12)
    assert result.converged
    assert max(abs(d) for d, _ in result.passes) <= 64.0, result.passes
