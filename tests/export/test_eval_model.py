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


# ----------------------------------------------------------------------------- issue 19, findings 7 and 10

@pytest.fixture(scope="module")
def small_export(digits_root, tmp_path_factory):
    """An untrained tiny demo network with non-trivial BatchNorm statistics, exported (no trainer)."""
    import torch

    from spnet_dist.config import load_config
    from spnet_dist.export.writer import export_module
    from spnet_dist.models.from_config import build_model

    from ..conftest import tiny_overrides
    from .conftest import DEMO

    tmp = tmp_path_factory.mktemp("small_export")
    cfg = load_config(DEMO, [*tiny_overrides(digits_root, tmp / "run"), "data.image_size=16"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with torch.no_grad():
        for _ in range(4):  # running statistics away from (0, 1), so that folding BN changes weights
            model(torch.randn(32, 3, 16, 16) * 2 + 0.3)
    return model.eval(), export_module(model, cfg, tmp / "export")


def test_as_trained_reproduces_the_trainers_bf16_logits_bit_for_bit(small_export):
    # Issue 19 finding 10: spnet-eval ran the run's bf16 autocast on the BN-folded, channels-last
    # export, which rounds differently from the trainer's conv + BN (measured: logits 0.016 apart).
    import torch

    from spnet_dist.execution import set_execution

    model, export = small_export
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    set_execution(model, "skip")  # what the trainer's evaluate() runs
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            trainer = model(images)
            exported = eval_model.load_for_eval(export, torch.device("cpu"), as_trained=True)(images)
    finally:
        set_execution(model, "masked")
    assert torch.equal(exported.gate_decisions, trainer.gate_decisions)
    assert torch.equal(exported.logits, trainer.logits)


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_spnet_eval_feeds_like_training_and_reports_model_time_apart(small_export, digits_root, monkeypatch, loader):
    # Issue 19 finding 7: spnet-eval decoded every JPEG with PIL in its main process
    # (num_workers=0), so its images/s was the decoder's.
    import torch

    from spnet_dist.data.dali import DaliEvalLoader

    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    _, export = small_export
    used, real = [], eval_model.evaluate
    monkeypatch.setattr(eval_model, "evaluate", lambda model, batches, *a, **k: used.append(batches) or real(model, batches, *a, **k))
    report = eval_model.run_eval(export, digits_root, 64, torch.device("cpu"), loader=loader, workers=2)
    if loader == "dali":
        assert isinstance(used[0], DaliEvalLoader) and used[0]._reader.num_threads == 2
        assert report["loader"] == {"backend": "dali", "dali_device": "cpu", "threads": 2}
    else:
        assert used[0]._loader.num_workers == 2  # DataLoader worker processes decode
        assert report["loader"] == {"backend": "torchvision", "workers": 2}
    assert report["images"] == 360 and len(report["macs_per_image"]["values"]) == 360
    seconds = report["seconds"]
    assert 0 < seconds["model"] <= seconds["total"] and 0 <= seconds["data"] <= seconds["total"]
    assert report["model_images_per_sec"] == pytest.approx(360 / seconds["model"])


def test_spnet_eval_reads_per_image_macs_once_not_per_batch(small_export, digits_root):
    # Issue 19 finding 7: .tolist() of every batch's MACs was a host sync per batch on CUDA.
    import torch

    from spnet_dist.device_audit import HostSyncCounter

    _, export = small_export
    reads = []
    for batch_size in (8, 64):  # 45 and 6 batches
        with HostSyncCounter(patch_accelerator=False) as syncs:
            report = eval_model.run_eval(export, digits_root, batch_size, torch.device("cpu"),
                                         loader="torchvision", workers=0)
        reads.append(syncs.counts["tolist"])
        assert report["images"] == 360
    assert reads[0] == reads[1]


def test_auto_reads_with_the_backend_the_run_evaluated_with(monkeypatch):
    monkeypatch.setattr("spnet_dist.data.loaders.dali_available", lambda: True)
    run = lambda **data: {"run_config": {"data": data}}  # noqa: E731
    assert eval_model.run_loader_backend(run(format="imagefolder", backend="auto")) == "dali"
    assert eval_model.run_loader_backend(run(format="imagefolder", backend="torchvision")) == "torchvision"
    assert eval_model.run_loader_backend(run(format="digits", backend="auto")) == "torchvision"
    assert eval_model.run_loader_backend(run(format="cifar", backend="auto")) == "torchvision"
    monkeypatch.setattr("spnet_dist.data.loaders.dali_available", lambda: False)
    assert eval_model.run_loader_backend(run(format="imagefolder", backend="dali")) == "torchvision"
