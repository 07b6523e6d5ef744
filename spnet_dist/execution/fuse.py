"""Inference-only rewrites of a trained gated ResNet that keep its function and cut its time.

The rewrites compute the same function up to float rounding (max |logit difference| ~1e-7 to
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
* **1x1 convolutions on oneDNN** (:class:`PointwiseConv`) below 16 images on the CPU, where
  ``F.conv2d`` would take ATen's own path and spend as long filling the output with the bias
  as on the GEMM (64 -> 256 channels at 56x56 inside a ResNet-50 forward).

The BN modules become :class:`FoldedBatchNorm` (an identity), so the module code
(``self.bn1(self.conv1(x))``) runs unchanged and the MAC profiler sees the same convolutions.
Training needs the BN statistics: an optimised model refuses ``train()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..models.blocks import GatedBasicBlock, GatedBlock, GatedBottleneck
from ..models.resnet import GatedResNet

# (layer, BN) attribute pairs where the BN directly follows the layer in the block's forward
_BLOCK_PAIRS = {
    GatedBottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    GatedBasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
}


def _block_pairs(block: GatedBlock) -> tuple[tuple[str, str], ...]:
    """The (layer, BN) pairs of ``block``, whose class may be a skipping subclass (network.py)."""
    return next(pairs for cls, pairs in _BLOCK_PAIRS.items() if isinstance(block, cls))


class FoldedBatchNorm(nn.Identity):
    """A BatchNorm that was folded into the layer before it."""


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution that runs on oneDNN on the CPU; stride s is ``x[:, :, ::s, ::s]`` then stride 1.

    Same parameters and state-dict keys as the ``nn.Conv2d`` it replaces. ``F.conv2d`` sends a
    1x1 convolution of fewer than 16 images on one CPU thread to its own im2col + GEMM path (a
    heuristic in ATen's ``use_mkldnn``), which first fills its output with the bias, a pass over
    it the GEMM then reads again: 0.8 ms of a 1.6 ms 64 -> 256-channel 56x56 convolution inside
    a ResNet-50 forward. oneDNN adds the bias in its GEMM. A subsampled input stays with
    ``F.conv2d``: oneDNN would first copy the strided view (ResNet-50's stage-2 projection at
    batch 1: 1.4 against 1.2 ms). So do batches of 16 and more (``F.conv2d`` picks oneDNN itself),
    other devices, autocast, and graph capture (torch.compile, torch.export, the ONNX exporter,
    jit tracing). The results agree to float rounding.
    """

    subsample: tuple[int, int] = (1, 1)

    def forward(self, x: Tensor) -> Tensor:
        step_h, step_w = self.subsample
        if (step_h, step_w) != (1, 1):
            return F.conv2d(x[:, :, ::step_h, ::step_w], self.weight, self.bias)
        if _use_onednn(x, self.weight):
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, (0, 0), (1, 1), (1, 1), 1)
        return F.conv2d(x, self.weight, self.bias)


if torch.ops.aten.mkldnn_convolution.default not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(torch.ops.aten.mkldnn_convolution)
    def _onednn_conv_flops(x_shape, w_shape, _bias, _padding, _stride, _dilation, _groups, *, out_shape=None, **_):
        """FlopCounterMode (``spnet_dist.flops``) knows ``aten.convolution`` only; without this it
        would count PointwiseConv's oneDNN calls as 0 MACs."""
        return flop_counter.conv_flop_count(x_shape, w_shape, out_shape)


def _use_onednn(x: Tensor, weight: Tensor) -> bool:
    if x.shape[0] >= 16 or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False  # (bf16: F.conv2d picks oneDNN itself where the CPU supports it)
    if not torch.backends.mkldnn.is_available() or torch.is_autocast_enabled("cpu"):
        return False  # autocast casts for F.conv2d, not for the raw oneDNN op
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


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


def _pointwise(conv: nn.Module) -> None:
    if type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.padding == (0, 0) \
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros":
        conv.subsample = conv.stride
        conv.__class__ = PointwiseConv


def optimize_for_inference(model: GatedResNet) -> GatedResNet:
    """Fold every BatchNorm into the layer before it and make every 1x1 convolution a
    :class:`PointwiseConv` (strided projections subsampled), in place.

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
        pairs = _block_pairs(block)
        for layer_name, bn_name in pairs:
            _fold(block, layer_name, bn_name)
        downsample = getattr(block, "downsample", None)
        if downsample is not None:
            _fold(downsample, "0", "1")
            _pointwise(downsample[0])
        for layer_name, _ in pairs:
            _pointwise(getattr(block, layer_name))
        _fold(block.router, "fc1", "bn")
    model.train = _refuse_train.__get__(model)  # type: ignore[method-assign]
    return model


def _refuse_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError("this model is optimised for inference (BatchNorm folded): load it with "
                           "optimize=False to train or fine-tune")
    return nn.Module.train(self, False)
