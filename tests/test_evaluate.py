"""spnet_dist.evaluate.evaluate against a hand computation from logits and gate decisions, on
one rank and on two ranks holding unequal shards."""
import json

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
