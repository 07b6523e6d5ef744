"""Which training heads and aligners a gated ResNet builds (issue 11, findings 3 and 4)."""
from __future__ import annotations

import pytest
import torch

from spnet_dist.models import create_model


def test_without_aux_heads_only_the_final_head_exists():
    model = create_model("spnet_cifar_resnet20", num_classes=5, aux_heads=False).train()
    assert model.aux_heads is None
    out = model(torch.randn(2, 3, 16, 16))
    assert len(out.stage_logits) == 1 and out.stage_logits[0] is out.logits
    assert len(out.stage_features) == 1


def test_one_block_aligner_per_stage_identity_for_the_last():
    model = create_model("spnet_cifar_resnet20", num_classes=5, block_align=True)
    assert len(model.block_aligners) == model.num_stages == 3
    assert isinstance(model.block_aligners[2], torch.nn.Identity)
    assert [m.in_features for m in model.block_aligners[:2]] == [16, 32]


def test_a_skipped_block_gives_a_zero_feature_difference():
    # All gates closed: a block with an identity shortcut returns relu(x) = x, so consecutive
    # block features of a stage are equal, raw and aligned (one aligner per stage, not per block).
    model = create_model("spnet_cifar_resnet20", num_classes=5, block_align=True).eval()
    model.set_gate_override(False)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16))
    for a, b in ((0, 1), (1, 2), (3, 4), (4, 5), (6, 7), (7, 8)):  # blocks of the same stage
        assert torch.equal(out.block_pooled[a], out.block_pooled[b])
        torch.testing.assert_close(out.block_features[a], out.block_features[b], rtol=0, atol=0)
    assert [f.shape[1] for f in out.block_pooled] == [16] * 3 + [32] * 3 + [64] * 3
    assert all(f.shape[1] == 64 for f in out.block_features)


def test_under_bf16_autocast_the_heads_pool_in_fp32():
    # Issue 19 finding 10: the heads are fp32 with autocast off, but the pooling ran on the bf16
    # feature map before .float(), so "fp32 heads" saw features rounded to 8 mantissa bits
    # (about 1e-3 apart from the fp32 mean here).
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20", num_classes=5).train()
    maps = []
    for stage in model.stages:  # a stage's output is its last block's (the blocks are called one by one)
        stage[-1].register_forward_hook(lambda module, args, out: maps.append(out[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 16, 16))
    assert [m.dtype for m in maps] == [torch.bfloat16] * 3  # the trunk does run in bf16
    pooled = [m.float().mean(dim=(2, 3)) for m in maps]  # fp32 pooling of the bf16 maps
    torch.testing.assert_close(out.stage_features[-1], pooled[-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.logits, model.fc(pooled[-1]), rtol=1e-6, atol=1e-6)
    for head, feature, logits, stage_pooled in zip(model.aux_heads, out.stage_features, out.stage_logits, pooled):
        torch.testing.assert_close(feature, head.align(stage_pooled), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logits, head.fc(feature), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Seed pairing (issue 20): the same run.seed starts every Table 3 row from the same network.
# --------------------------------------------------------------------------------------------
def _initial_state(config_name: str, seed: int) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from spnet_dist.config import load_config
    from spnet_dist.models.from_config import build_model
    from spnet_dist.training.reproducibility import seed_everything

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "fashion" / f"{config_name}.yaml",
                      check_paths=False, world_size=1)
    seed_everything(seed)  # what Trainer._set_up does right before build_model
    return build_model(cfg).state_dict()


def test_the_same_seed_gives_every_method_bit_identical_shared_weights():
    # baseline (no heads), EXP-1 (no heads), EXP-2 (stage heads), SP-Net (stage heads + L_evo):
    # every parameter and buffer they share starts bit-identical. Before the heads were built
    # after _init_weights, the stage heads' Linear layers drew from the RNG first and every
    # convolution of EXP-2 / SP-Net differed from the baseline's.
    states = {name: _initial_state(name, seed=3) for name in ("baseline", "exp1", "exp2", "spnet")}
    shared = set.intersection(*(set(s) for s in states.values()))
    assert any(k.startswith("layer1.0.conv1") for k in shared) and any(".router.fc1" in k for k in shared)
    assert "fc.weight" in shared
    assert any(k.startswith("aux_heads.") for k in states["spnet"]) and not any(
        k.startswith("aux_heads.") for k in states["baseline"])
    assert shared == set(states["baseline"])  # the baseline's whole network is shared
    for name in ("exp1", "exp2", "spnet"):
        different = [k for k in sorted(shared) if not torch.equal(states[name][k], states["baseline"][k])]
        assert not different, f"{name}: {different[:4]} differ from the baseline's"
    # and the seed matters (the equality above is not that of a constant initialisation)
    other = _initial_state("baseline", seed=4)
    assert not torch.equal(other["layer1.0.conv1.weight"], states["baseline"]["layer1.0.conv1.weight"])


def test_the_shared_parts_keep_their_initial_distribution():
    # Building the heads later must not change how the backbone is initialised: Kaiming-normal
    # (fan_out) convolutions, BN weight 1 / bias 0, routers' bias (0.1, 2.0).
    model = create_model("spnet_cifar_resnet20", num_classes=10)
    w = model.layer3[2].conv2.weight  # 64 x 64 x 3 x 3: fan_out = 576
    assert w.std().item() == pytest.approx((2.0 / 576) ** 0.5, rel=0.05)
    assert torch.equal(model.layer2[0].bn1.weight, torch.ones(32))
    assert model.layer1[0].router.fc2.bias.tolist() == pytest.approx([0.1, 2.0])
