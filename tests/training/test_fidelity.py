"""Paper-fidelity wiring of the trainer (issue 11): the official code's gradient clamp and choice fields."""
from __future__ import annotations

import pytest

from spnet_dist import training
from spnet_dist.config import ConfigError, load_config


def _cfg(*overrides):
    return load_config("configs/demo.yaml", ["run.out_dir=/tmp/unused", *overrides], check_paths=False)


def test_grad_clamp_needs_zero_stage_0():
    assert _cfg("loss.grad_clamp=0.5").loss.grad_clamp == 0.5
    with pytest.raises(ConfigError, match="loss.grad_clamp"):
        _cfg("loss.grad_clamp=0.5", "engine.zero_stage=1")
    with pytest.raises(ConfigError, match="loss.grad_clamp"):
        _cfg("loss.grad_clamp=0")


@pytest.mark.parametrize("field", ["loss.cost_reduction", "loss.cost_rate", "loss.cls_form"])
def test_new_choice_fields_are_validated(field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(f"{field}=bogus")


def test_grad_clamp_bounds_the_first_sgd_step(tiny_config, own_process_group):
    # No weight decay, first SGD step (momentum buffer = gradient): |Δθ| = lr · |clamped grad|.
    limit, lr = 1e-3, 0.1
    cfg = tiny_config(f"loss.grad_clamp={limit}", "engine.zero_stage=0", "optim.weight_decay=0",
                      f"optim.lr={lr}", "run.max_steps=1", "engine.precision=fp32")
    trainer = training.Trainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.fit()
    moved = {k: (v.detach() - before[k]).abs().max().item() for k, v in trainer.model.named_parameters()}
    assert max(moved.values()) <= lr * limit + 1e-6  # + fp32 rounding of θ ± 1e-4
    assert sum(m > 0 for m in moved.values()) > 10  # the step did happen
