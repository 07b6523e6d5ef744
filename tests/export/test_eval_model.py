"""spnet-eval: an export evaluated on 1 and 2 ranks reproduces the trainer's final evaluation."""
import json

import pytest

from spnet_dist.export import eval_model

from ..dist_helpers import run_torchrun


@pytest.mark.slow
@pytest.mark.multiprocess
def test_spnet_eval_reproduces_the_trainers_final_evaluation(zero2_run, zero2_export, digits_root, tmp_path):
    record = json.loads((zero2_run / "metrics.jsonl").read_text().splitlines()[-1])
    one = tmp_path / "one"
    eval_model.cli(["--model", str(zero2_export), "--data", str(digits_root), "--batch-size", "50",
                    "--device", "cpu", "--out", str(one)])
    two = tmp_path / "two"
    run_torchrun("-m", 2, ["spnet_dist.export.eval_model", "--model", str(zero2_export), "--data", str(digits_root),
                           "--batch-size", "64", "--device", "cpu", "--out", str(two)])
    for out in (one, two):
        report = json.loads((out / "report.json").read_text())
        for key in ("top1", "gmacs", "gmacs_paper", "static_gmacs", "exec_rates", "images"):
            assert report[key] == record[key], (out.name, key)
        assert len(report["macs_per_image"]["values"]) == 360
        assert (out / "exec_rates.png").stat().st_size > 0 and (out / "macs_hist.png").stat().st_size > 0
    assert json.loads((two / "report.json").read_text())["world_size"] == 2
