"""spnet_dist.checkpoint.resume: which checkpoint a run continues from, which config changes it accepts."""
import pytest

from spnet_dist import checkpoint as C
from spnet_dist.config import Config, save_config, to_dict

from .helpers import fake_checkpoint as _fake_checkpoint


def test_config_differences_lists_only_unsafe_fields():
    a, b = Config(), Config()
    b.schedule.epochs, b.data.root, b.run.log_every, b.engine.timeout_min = 400, "/elsewhere", 7, 1.0
    assert C.config_differences(to_dict(a), to_dict(b)) == []
    b.optim.lr, b.run.seed = 0.2, 3
    assert C.config_differences(to_dict(a), to_dict(b)) == ["optim.lr: 0.1 -> 0.2", "run.seed: 0 -> 3"]
    a.schedule.kind = c_kind = "cosine"
    b = Config()
    b.schedule.kind, b.schedule.epochs = c_kind, 10  # a cosine schedule's length is its shape
    assert C.config_differences(to_dict(a), to_dict(b)) == ["schedule.epochs: 320 -> 10"]


def test_a_field_added_after_the_checkpoint_compares_as_its_default():
    # A checkpoint written before optim.lr_scaling existed resumes with the default ('none') and
    # is refused with any other value.
    saved = to_dict(Config())
    del saved["optim"]["lr_scaling"]
    assert C.config_differences(saved, to_dict(Config())) == []
    linear = Config()
    linear.optim.lr_scaling = "linear"
    assert C.config_differences(saved, to_dict(linear)) == ["optim.lr_scaling: 'none' -> 'linear'"]


def test_plan_resume_rules(tmp_path):
    out = tmp_path / "run"
    cfg = Config()
    cfg.engine.zero_stage = 0  # the checkpoints below are ZeRO 0 checkpoints
    assert C.plan_resume(out, "auto", to_dict(cfg)).checkpoint is None  # empty: fresh
    out.mkdir()
    save_config(cfg, out / "config.yaml")  # a run that died in set-up
    plan = C.plan_resume(out, "auto", to_dict(cfg))
    assert plan.checkpoint is None and plan.existing
    with pytest.raises(FileExistsError, match="run.out_dir"):
        C.plan_resume(out, "never", to_dict(cfg))
    other = Config()
    other.engine.zero_stage = 0
    other.loss.beta = 0.0
    with pytest.raises(C.ResumeMismatch, match=r"loss.beta: 0.5 -> 0.0"):
        C.plan_resume(out, "auto", to_dict(other))
    ckpt = _fake_checkpoint(out / "checkpoints", 3)
    assert C.plan_resume(out, "auto", to_dict(cfg)).checkpoint == ckpt
    assert C.plan_resume(out, "step_00000003", to_dict(cfg)).checkpoint == ckpt.resolve()
    elsewhere = _fake_checkpoint(tmp_path / "other" / "checkpoints", 3)
    with pytest.raises(C.CheckpointError, match="run.resume: .* not inside"):
        C.plan_resume(out, str(elsewhere), to_dict(cfg))
