"""configs/fashion/: Table 3's rows on Fashion-MNIST, and the sweep file that runs them at three targets."""
import dataclasses
from pathlib import Path

import pytest

from spnet_dist.config import load_config
from spnet_dist.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO / "configs" / "fashion"
ROWS = {  # file -> (teacher A, stage heads B, L_evo C)
    "baseline": (False, False, False),
    "exp1": (True, False, False),
    "exp2": (True, True, False),
    "exp3": (True, True, True),
    "spnet": (True, True, True),
}


def load(name, *overrides):
    return load_config(FASHION / f"{name}.yaml", list(overrides), check_paths=False, world_size=1)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_table3_components(name):
    cfg = load(name)
    a, b, c = ROWS[name]
    assert cfg.teacher.enabled is a and cfg.loss.stage_heads is b and (cfg.loss.evo_strategy != "none") is c
    if not a:
        assert cfg.loss.alpha == cfg.loss.beta == 0
    assert cfg.data.format == "fashion_mnist" and cfg.model.name == "spnet_cifar_resnet20"
    assert cfg.data.split_seed == 0 and cfg.data.val_size == 5000  # every row selects on the same images
    assert cfg.loss.cost_weight > 0 and cfg.loss.target_rate == 0.5
    for t in (0.3, 0.5, 0.7):
        assert load(name, f"loss.target_rate={t}").loss.target_rate == t


def test_rows_differ_only_in_their_components():
    base = dataclasses.asdict(load("spnet"))
    for name in ROWS:
        other = dataclasses.asdict(load(name))
        changed = {f"{s}.{k}" for s in base for k in base[s] if base[s][k] != other[s][k]}
        assert changed <= {"teacher.enabled", "loss.stage_heads", "loss.evo_strategy", "loss.alpha", "loss.beta",
                           "run.out_dir"}, name


def test_sweep_variants_are_the_config_files():
    sweep = load_sweep(REPO / "docs" / "sweeps" / "fashion.yaml")
    assert len(sweep.runs()) == 72 and sweep.seeds == list(range(6))
    files = {"baseline": "baseline", "EXP-1 (A)": "exp1", "EXP-2 (A+B)": "exp2", "SP-Net": "spnet"}
    for variant in sweep.variants:
        via_sweep = load_config(sweep.base, [*sweep.overrides, *variant.overrides], check_paths=False, world_size=1)
        via_file = load(files[variant.method], f"loss.target_rate={variant.target_rate}")
        a, b = dataclasses.asdict(via_sweep), dataclasses.asdict(via_file)
        a["run"].pop("out_dir"), b["run"].pop("out_dir")
        assert a == b, variant.name
    assert {v.target_rate for v in sweep.variants} == {0.3, 0.5, 0.7}


def test_every_method_reads_the_same_training_batches(tmp_path):
    # Seed pairing, data side: the order and augmentation come from run.seed alone, so the
    # baseline and EXP-1/2/3 of one seed train on the same batches in the same order.
    import torch

    from spnet_dist.config import micro_batch_size
    from spnet_dist.data import build_loaders

    from .data.helpers import make_fashion_mnist

    root = make_fashion_mnist(tmp_path / "fm", n_train=300, n_test=10)
    first = {}
    for name in ("baseline", "exp1", "exp2", "spnet"):
        cfg = load(name, f"data.root={root}", "data.val_size=50", "data.train_subset=200", "run.seed=5")
        train, _ = build_loaders(cfg.data, micro_batch_size(cfg, 1), 0, 1, cfg.run.seed)
        train.set_epoch(1)
        first[name] = [b for _, b in zip(range(2), train)]
    for name in ("exp1", "exp2", "spnet"):
        for (xa, ya), (xb, yb) in zip(first[name], first["baseline"]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb), name
