"""spnet_dist.models.from_config: the student a config describes, with only the heads its loss reads."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from spnet_dist.config import load_config
from spnet_dist.models.from_config import build_model


def _cfg(*overrides):
    return load_config("configs/demo.yaml", ["run.out_dir=/tmp/unused", *overrides], check_paths=False)


@pytest.mark.parametrize("overrides, aux, blocks", [
    ((), True, False),                                                                # full SP-Net
    (("loss.stage_heads=false", "loss.evo_strategy=none"), False, False),             # Table 3 EXP-1
    (("teacher.enabled=false", "loss.stage_heads=false", "loss.evo_strategy=none"), False, False),
    (("loss.evo_strategy=code_cifar", "loss.stage_heads=false"), False, True),
    (("loss.evo_strategy=blocks",), True, True),
])
def test_build_model_builds_only_the_heads_the_loss_reads(overrides, aux, blocks):
    model = build_model(_cfg(*overrides))
    assert (model.aux_heads is not None) is aux
    assert (model.block_aligners is not None) is blocks


def test_any_object_with_the_model_and_loss_fields_will_do():
    # The models never import the config schema: a duck-typed config builds the same network.
    cfg = _cfg()
    duck = SimpleNamespace(model=SimpleNamespace(**vars(cfg.model)), loss=SimpleNamespace(**vars(cfg.loss)))
    assert build_model(duck).state_dict().keys() == build_model(cfg).state_dict().keys()
