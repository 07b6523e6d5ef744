"""Inference-only rewrites of a trained gated ResNet that keep its function and cut its time.

Both rewrites compute the same function up to float rounding (max |logit difference| ~1e-7 to
1e-6 on the models tested) and matter most at batch 1 on CPU, where the fixed layers (stem,
projection shortcuts, routers, head), which every sample pays whatever its gates say, were 18-19 %
of an all-open ResNet-50 forward for 12 % of its MACs (tools/bench_inference.py):

* **BatchNorm folding.** In eval mode BN is a per-channel affine map, so it folds into the
  convolution or Linear feeding it (torch's own ``torch.nn.utils.fusion`` helpers): one pass
  over every activation fewer per BN. The 256-channel 56x56 projection BN of ResNet-50 alone took
  ~1.7 ms at batch 1, more than the 1x1 convolution before it.
* **Strided 1x1 projections as subsample + 1x1 convolution.** A 1x1 convolution with stride 2
  reads only every other pixel, so ``conv(x, stride=2) == conv(x[:, :, ::2, ::2], stride=1)``
  exactly; oneDNN runs the second form faster (all four ResNet-50 projections: 15.7 -> 13.8 ms
  for the all-closed forward at batch 1).

The BN modules become :class:`FoldedBatchNorm` (an identity), so the module code
(``self.bn1(self.conv1(x))``) runs unchanged and the MAC profiler sees the same convolutions.
Training needs the BN statistics: an optimised model refuses ``train()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .blocks import GatedBasicBlock, GatedBottleneck
from .resnet import GatedResNet

# (layer, BN) attribute pairs where the BN directly follows the layer in the block's forward
_BLOCK_PAIRS = {
    GatedBottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    GatedBasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
}


class FoldedBatchNorm(nn.Identity):
    """A BatchNorm that was folded into the layer before it."""


class SubsampledPointwiseConv(nn.Conv2d):
    """A 1x1 convolution with stride s computed as ``x[:, :, ::s, ::s]`` then stride 1.

    Same parameters and state-dict keys as the ``nn.Conv2d`` it replaces.
    """

    def forward(self, x: Tensor) -> Tensor:
        step_h, step_w = self.subsample
        return F.conv2d(x[:, :, ::step_h, ::step_w], self.weight, self.bias)


def _fold(owner: nn.Module, layer_name: str, bn_name: str) -> None:
    layer, bn = getattr(owner, layer_name), getattr(owner, bn_name)
    if isinstance(bn, FoldedBatchNorm):
        return  # already folded
    fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
    fused = fuse(layer, bn)
    if isinstance(layer, nn.Conv2d) and layer.weight.is_contiguous(memory_format=torch.channels_last):
        fused.weight.data = fused.weight.data.contiguous(memory_format=torch.channels_last)  # keep NHWC
    setattr(owner, layer_name, fused)
    setattr(owner, bn_name, FoldedBatchNorm())


def _subsample_pointwise(conv: nn.Conv2d) -> None:
    if conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 \
            and conv.stride != (1, 1) and type(conv) is nn.Conv2d:
        conv.subsample = conv.stride
        conv.__class__ = SubsampledPointwiseConv


def optimize_for_inference(model: GatedResNet) -> GatedResNet:
    """Fold every BatchNorm into the layer before it and rewrite strided 1x1 projections, in place.

    Covers the stem, the residual branches, the projection shortcuts and the routers' BN1d (which
    follows their first Linear). ``model`` must be in eval mode and stays in it.

    Returns:
        ``model``.
    """
    if model.training:
        raise ValueError("optimize_for_inference: the model must be in eval mode (folding uses the running statistics)")
    if hasattr(model, "bn1"):
        _fold(model, "conv1", "bn1")  # stem
    for block in model.gated_blocks():
        for layer_name, bn_name in _BLOCK_PAIRS[type(block)]:
            _fold(block, layer_name, bn_name)
        downsample = getattr(block, "downsample", None)
        if downsample is not None:
            _fold(downsample, "0", "1")
            _subsample_pointwise(downsample[0])
        _fold(block.router, "fc1", "bn")
    model.train = _refuse_train.__get__(model)  # type: ignore[method-assign]
    return model


def _refuse_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError("this model is optimised for inference (BatchNorm folded): load it with "
                           "optimize=False to train or fine-tune")
    return nn.Module.train(self, False)
