"""spnet-export of a run that evaluated several times: the exported ``measured`` figures (execution
rates, MACs, top-1: what the capacity skip strategy and the model card read) are the LAST
evaluation's, i.e. those of the weights exported, never an earlier epoch's."""
import json
from pathlib import Path

import pytest
import torch

from spnet_dist import checkpoint as C
from spnet_dist import export
from spnet_dist.config import save_config, to_dict
from spnet_dist.export.inference import load_model
from spnet_dist.execution import execution_plan
from spnet_dist.models.from_config import build_model
from spnet_dist.run_dir import RunDirectory

MEASURED = ("epoch", "step", "top1", "gmacs", "gmacs_paper", "static_gmacs", "mac_ratio", "exec_rate", "exec_rates",
            "images")


def _record(epoch: int, num_blocks: int) -> dict:
    """An evaluation record whose every measured figure depends on the epoch."""
    rates = [round(0.9 - 0.05 * epoch - 0.01 * b, 4) for b in range(num_blocks)]
    return {"epoch": epoch, "step": 5 * epoch, "top1": 40.0 + 10 * epoch, "gmacs": 0.01 * epoch,
            "gmacs_paper": 0.02 * epoch, "static_gmacs": 0.05, "mac_ratio": 0.2 * epoch,
            "exec_rate": sum(rates) / num_blocks, "exec_rates": rates, "images": 300 + epoch,
            "loss": {"total": 1.0 / epoch}, "images_per_sec": 100.0, "lr": 0.1 / epoch}


def _zero0_run(cfg, run: Path, step: int) -> None:
    """A run directory as the trainer leaves it (ZeRO 0: the student in the model-state file), no training."""
    save_config(cfg, run / "config.yaml")
    model = build_model(cfg)
    ckpt_dir = run / "checkpoints"
    tag = C.step_tag(step)
    tmp = ckpt_dir / C.tmp_dir_name(tag)
    tmp.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tmp / C.MODEL_STATES)
    C.write_json(tmp / C.STATE_FILE, {"train_state": {"epoch": 3, "step": step}, "config": to_dict(cfg),
                                      "world_size": 1})
    C.write_json(tmp / C.rank_file(0), {"loader": {}})
    C.publish(ckpt_dir, tmp, tag, step)
    C.point_alias(ckpt_dir, "final", tag)
    return model.num_blocks


def test_export_copies_the_last_of_several_evaluation_records(tiny_config, tmp_path):
    cfg = tiny_config("engine.zero_stage=0")
    run = Path(cfg.run.out_dir)
    num_blocks = _zero0_run(cfg, run, step=15)
    records = [_record(epoch, num_blocks) for epoch in (1, 2, 3)]
    for record in records:
        RunDirectory(run).append_metrics(record)
    out = export.export(run, tmp_path / "export")
    measured = json.loads((out / "config.json").read_text())["measured"]
    assert {k: measured[k] for k in MEASURED} == {k: records[-1][k] for k in MEASURED}
    # the capacity skip strategy sizes each block from the exported rates: the last epoch's
    assert list(execution_plan(load_model(out)).capacity_rates) == records[-1]["exec_rates"]


@pytest.mark.parametrize("tag,expected_top1", [
    ("step_00000015", 75.0),  # two records at step 15 (the step was evaluated again): the newest
    ("step_00000010", 60.0),  # an earlier epoch-end checkpoint: its own evaluation, not the last one
    ("step_00000012", 75.0),  # a mid-epoch checkpoint has no record of its own: the last one
], ids=["newest-at-the-step", "earlier-checkpoint", "mid-epoch"])
def test_the_record_exported_is_the_newest_at_the_checkpoints_step_else_the_last(tmp_path, tag, expected_top1):
    """writer.record_of: which evaluation record an export of checkpoint ``tag`` carries (the test
    above has one record per step, the last at the exported step, so it cannot tell the branches
    apart: ``at_step[0]`` or ``records[0]`` there passed the fast suite)."""
    from spnet_dist.export.writer import record_of

    run = RunDirectory(tmp_path / "run")
    run.root.mkdir()
    for step, top1 in ((5, 50.0), (10, 60.0), (15, 70.0), (15, 75.0)):
        run.append_metrics({"epoch": step // 5, "step": step, "top1": top1})
    assert record_of(run.root, run.root / "checkpoints" / tag)["top1"] == expected_top1


@pytest.mark.slow
def test_a_real_run_of_three_evaluations_exports_the_last(tiny_config, own_process_group, tmp_path):
    """The trainer writes one record per epoch (3 here); the export of `final` carries the third."""
    from spnet_dist.data.fake import make_fake_imagenet
    from spnet_dist.training import Trainer

    # 32 training images in 1 step per epoch: three epochs, three evaluations, little compute
    root = make_fake_imagenet(tmp_path / "data", classes=4, per_class=8, val_per_class=2, long_side_range=(24, 40))
    cfg = tiny_config("data.format=imagefolder", f"data.root={root}", "data.backend=torchvision",
                      "model.num_classes=4", "schedule.epochs=3", "run.max_steps=null", "run.tensorboard=false")
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer._undo_deterministic()
    run = Path(cfg.run.out_dir)
    records = RunDirectory(run).read_metrics()
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 1), (2, 2), (3, 3)]
    config = json.loads((export.export(run, tmp_path / "export") / "config.json").read_text())
    assert {k: config["measured"][k] for k in MEASURED} == {k: records[-1][k] for k in MEASURED}
    assert config["source"]["checkpoint"] == C.resolve_checkpoint(run, "final").name == C.step_tag(3)
