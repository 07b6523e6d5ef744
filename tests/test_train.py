"""spnet-train end to end in one process: the real entry point on the real digits data."""
import json
import math
from pathlib import Path

import pytest
import torch

from spnet_dist import train
from spnet_dist.config import load_config
from spnet_dist.data import build_eval_loader
from spnet_dist.evaluate import evaluate
from spnet_dist.flops import profile_macs

from .conftest import REPO_ROOT, tiny_overrides

pytestmark = pytest.mark.usefixtures("own_process_group")


def test_cli_runs_and_writes_the_run_directory(digits_root, tmp_path, capsys):
    out_dir = tmp_path / "run"
    train.cli(["--config", str(REPO_ROOT / "configs" / "demo.yaml"), *tiny_overrides(digits_root, out_dir)])
    printed = capsys.readouterr().out
    assert "val top-1" in printed and "per-block rates" in printed  # the final table
    assert "step 2 " in printed and "\r" not in printed  # plain progress lines, no bar redraws
    assert (out_dir / "config.yaml").is_file()
    saved = load_config(out_dir / "config.yaml", check_paths=False)
    assert saved.run.max_steps == 6 and saved.data.image_size == 8
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    rec = records[0]
    for key in ("epoch", "step", "top1", "gmacs", "gmacs_paper", "exec_rates", "loss", "images_per_sec", "mac_ratio"):
        assert key in rec, key
    assert rec["step"] == 6 and rec["epoch"] == 1
    assert len(rec["exec_rates"]) == 9 and all(0.0 <= r <= 1.0 for r in rec["exec_rates"])
    assert set(rec["loss"]) == {"cls", "path", "logits", "evo", "cost", "total"}
    assert all(math.isfinite(v) for v in rec["loss"].values())
    assert rec["gmacs_paper"] == pytest.approx(2 * rec["gmacs"])
    assert rec["images"] == 360  # every validation image, once
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_trainer_updates_teacher_once_per_optimizer_step(tiny_config):
    cfg = tiny_config("engine.grad_accum=2", "run.max_steps=3")
    trainer = train.Trainer(cfg)
    record = trainer.fit()
    assert trainer.state.step == 3 == record["step"]
    assert trainer.teacher.num_updates == 3  # 6 micro-batches, 3 optimizer steps
    assert trainer.engine.global_steps == 3


def test_eval_record_matches_a_fresh_evaluation_of_the_weights(tiny_config):
    cfg = tiny_config()
    trainer = train.Trainer(cfg)
    record = trainer.fit()
    model = train.build_model(cfg)
    model.load_state_dict(trainer.model.state_dict())
    _, val_set = train.build_datasets(cfg.data)
    again = evaluate(model, build_eval_loader(val_set, 100), profile_macs(model, (8, 8)), torch.device("cpu"))
    for key in ("top1", "gmacs", "exec_rates", "images"):
        assert again[key] == record[key], key


def test_baseline_config_trains_without_teacher(tiny_config):
    cfg = tiny_config("teacher.enabled=false", "loss.alpha=0", "loss.beta=0", "loss.stage_heads=false",
                      "loss.evo_strategy=none", "loss.cost_weight=0", "loss.target_rate=null")
    trainer = train.Trainer(cfg)
    record = trainer.fit()
    assert trainer.teacher is None
    assert set(record["loss"]) == {"cls", "total"}


def test_block_evolution_strategy_builds_block_aligners(tiny_config):
    trainer = train.Trainer(tiny_config("loss.evo_strategy=blocks_within_stage", "run.max_steps=2"))
    assert trainer.model.block_aligners is not None
    assert "evo" in trainer.fit()["loss"]


def test_bad_config_fails_before_anything_is_created(tmp_path, capsys):
    out_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        train.cli(["--config", str(REPO_ROOT / "configs" / "demo.yaml"), "engine.zero_stage=3", f"run.out_dir={out_dir}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "engine.zero_stage" in err
    assert not out_dir.exists()


def test_an_existing_run_directory_is_never_overwritten_with_resume_never(tiny_config):
    cfg = tiny_config("run.max_steps=2")
    train.main(cfg)
    out_dir = Path(cfg.run.out_dir)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}
    cfg.run.resume = "never"
    with pytest.raises(FileExistsError, match="run.out_dir"):
        train.main(cfg)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()} == before
