"""Which training heads and aligners a gated ResNet builds (issue 11, findings 3 and 4)."""
from __future__ import annotations

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
