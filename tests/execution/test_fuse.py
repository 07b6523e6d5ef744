"""Inference rewrites (execution/fuse.py): BN folding and subsampled projections keep the function."""
import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spnet_dist.flops import _macs

from spnet_dist.execution import FoldedBatchNorm, PointwiseConv, optimize_for_inference, set_execution
from spnet_dist.models import create_model

from ..models.test_resnet import _mixed_routers, _randomize_bn


@pytest.mark.parametrize("name,size", [("spnet_resnet50", 64), ("spnet_cifar_resnet20", 32)])
@pytest.mark.parametrize("execution", ["masked", "skip"])
def test_optimised_model_computes_the_same_function(name, size, execution):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, aux_heads=False)
    x = torch.randn(6, 3, size, size)
    _randomize_bn(model)  # non-trivial BN scales and shifts: folding them must matter
    _mixed_routers(model, x)  # every BN's statistics from x; decisions differ between samples
    set_execution(model, execution)
    optimised = optimize_for_inference(copy.deepcopy(model))
    with torch.no_grad():
        want, got = model(x), optimised(x)
    assert (want.gate_decisions.sum(0) % x.shape[0] != 0).any(), "some block must be open for part of the batch"
    assert torch.equal(got.gate_decisions, want.gate_decisions)
    # fp32 rounding only: relative to the largest value (BN statistics of 6 samples make some
    # 1 / sqrt(var) large, so folded weights round differently; measured ~1e-5)
    for name_, a, b in (("gate logits", got.gate_logits, want.gate_logits), ("logits", got.logits, want.logits)):
        assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item(), name_
    # every BatchNorm is folded away; every 1x1 convolution is a PointwiseConv, the strided projections subsampled
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in optimised.modules())
    assert sum(isinstance(m, FoldedBatchNorm) for m in optimised.modules()) == \
        sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if name == "spnet_resnet50":
        pointwise = [m for m in optimised.modules() if isinstance(m, PointwiseConv)]
        assert len(pointwise) == 4 + 2 * 16  # projections, and conv1 / conv3 of the 16 bottlenecks
        assert sorted(m.subsample for m in pointwise).count((2, 2)) == 3


def _onednn_calls(fn) -> int:
    """How many times ``fn`` calls the raw oneDNN convolution op directly."""
    real, calls = torch.ops.aten.mkldnn_convolution, []
    with mock.patch.object(torch.ops.aten, "mkldnn_convolution", side_effect=lambda *a: calls.append(a) or real(*a)):
        fn()
    return len(calls)


def _slow_conv_ran(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.key == "aten::_slow_conv2d_forward" for e in prof.key_averages())


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_is_the_conv_run_on_onednn_on_the_cpu(stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 1, stride=stride, bias=True)
    x = torch.randn(3, 8, 15, 14).contiguous(memory_format=torch.channels_last)  # odd and even sizes
    pointwise = copy.deepcopy(conv)
    pointwise.subsample = pointwise.stride
    pointwise.__class__ = PointwiseConv
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            want = conv(x)
            # why: F.conv2d sends a 1x1 convolution of < 16 images on one thread to ATen's im2col path
            assert _slow_conv_ran(lambda: conv(x)) == (stride == 1)
            # a subsampled (strided) view stays with F.conv2d: oneDNN would copy it first
            assert _onednn_calls(lambda: pointwise(x)) == (stride == 1)
            assert _slow_conv_ran(lambda: pointwise(x)) == (stride == 2)
            assert _onednn_calls(lambda: pointwise(x.repeat(6, 1, 1, 1))) == 0  # 16 and more: F.conv2d picks oneDNN
            got = pointwise(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # the raw oneDNN op would not cast
                assert _onednn_calls(lambda: pointwise(x)) == 0 and pointwise(x).dtype == torch.bfloat16
            for capture in ("torch.compiler.is_compiling", "torch.jit.is_tracing"):  # compile / export / ONNX, jit.trace
                with mock.patch(capture, return_value=True):
                    assert _onednn_calls(lambda: pointwise(x)) == 0
    finally:
        torch.set_num_threads(threads)
    subsampled = F.conv2d(x[:, :, ::stride, ::stride], conv.weight, conv.bias)  # what the module computed before
    assert got.shape == want.shape and got.stride() == subsampled.stride()
    assert (got - want).abs().max().item() < 1e-6
    # The MAC counter (FlopCounterMode) counts the oneDNN call like the convolution it replaces.
    assert _macs(pointwise, x) == _macs(conv, x) > 0


def test_optimised_model_refuses_training_and_needs_eval_mode():
    model = create_model("spnet_cifar_resnet20", num_classes=10)
    with pytest.raises(ValueError, match="eval mode"):
        optimize_for_inference(model)
    optimised = optimize_for_inference(model.eval())
    with pytest.raises(RuntimeError, match="optimize=False"):
        optimised.train()
    assert optimised.eval() is optimised and not optimised.training
