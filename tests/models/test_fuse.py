"""Inference rewrites (models/fuse.py): BN folding and subsampled projections keep the function."""
import copy

import pytest
import torch
from torch import nn

from spnet_dist.models import create_model
from spnet_dist.models.fuse import FoldedBatchNorm, SubsampledPointwiseConv, optimize_for_inference

from .test_resnet import _mixed_routers, _randomize_bn


@pytest.mark.parametrize("name,size", [("spnet_resnet50", 64), ("spnet_cifar_resnet20", 32)])
@pytest.mark.parametrize("execution", ["masked", "skip"])
def test_optimised_model_computes_the_same_function(name, size, execution):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, aux_heads=False)
    x = torch.randn(6, 3, size, size)
    _randomize_bn(model)  # non-trivial BN scales and shifts: folding them must matter
    _mixed_routers(model, x)  # every BN's statistics from x; decisions differ between samples
    model.set_execution(execution)
    optimised = optimize_for_inference(copy.deepcopy(model))
    with torch.no_grad():
        want, got = model(x), optimised(x)
    assert (want.gate_decisions.sum(0) % x.shape[0] != 0).any(), "some block must be open for part of the batch"
    assert torch.equal(got.gate_decisions, want.gate_decisions)
    # fp32 rounding only: relative to the largest value (BN statistics of 6 samples make some
    # 1 / sqrt(var) large, so folded weights round differently; measured ~1e-5)
    for name_, a, b in (("gate logits", got.gate_logits, want.gate_logits), ("logits", got.logits, want.logits)):
        assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item(), name_
    # every BatchNorm is folded away; every strided 1x1 projection is subsampled
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in optimised.modules())
    assert sum(isinstance(m, FoldedBatchNorm) for m in optimised.modules()) == \
        sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if name == "spnet_resnet50":
        assert sum(isinstance(m, SubsampledPointwiseConv) for m in optimised.modules()) == 3


def test_subsampled_pointwise_conv_equals_the_strided_conv_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 1, stride=2, bias=True)
    x = torch.randn(3, 8, 15, 14).contiguous(memory_format=torch.channels_last)  # odd and even sizes
    want = conv(x)
    conv.subsample = conv.stride
    conv.__class__ = SubsampledPointwiseConv
    got = conv(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-6


def test_optimised_model_refuses_training_and_needs_eval_mode():
    model = create_model("spnet_cifar_resnet20", num_classes=10)
    with pytest.raises(ValueError, match="eval mode"):
        optimize_for_inference(model)
    optimised = optimize_for_inference(model.eval())
    with pytest.raises(RuntimeError, match="optimize=False"):
        optimised.train()
    assert optimised.eval() is optimised and not optimised.training
