"""Gated residual blocks: out = relu(shortcut(x) + v * residual(x)), every block gated.

Each block exposes ``router``, ``residual`` and ``shortcut`` separately so the MAC profiler can
measure them one by one and inference code can run ``residual`` on a subset of the batch
(``spnet_dist.execution``). Parameter names follow torchvision (conv1/bn1/.../downsample) so
torchvision ResNet weights load into the gated ImageNet models.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gates import GateOutput, Router


class GatedBlock(nn.Module):
    """Base class: the router, the two branches and the masked forward.

    The residual branch is computed for every sample and multiplied by its 0/1 gate: training
    needs it (the router's gradient is proportional to residual(x), SP-Net (ECCV 2022) eq. 3).
    """

    router: Router
    # True when shortcut(x) >= 0 for every block input x. Block inputs are ReLU outputs (the
    # stem and every block end with a ReLU), so identity and option-A shortcuts keep the sign
    # and a closed block's relu(shortcut(x)) is shortcut(x) itself.
    shortcut_nonnegative: bool = False

    def residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def shortcut(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, GateOutput]:
        """relu(shortcut(x) + v * residual(x)) and the router's verdict on the block input ``x`` (B, C, H, W)."""
        gate = self.router(x)
        return self.forward_masked(x, gate.decision), gate

    def forward_masked(self, x: Tensor, decision: Tensor) -> Tensor:
        """relu(shortcut(x) + v * residual(x)) with the residual computed for every sample.

        Args:
            x: the block input (B, C, H, W).
            decision: (B,) the gate v of every sample.
        """
        res = self.residual(x)
        factor = decision.view(-1, 1, 1, 1).to(res.dtype)
        out = self.shortcut(x)
        if not torch.is_grad_enabled() and res.dtype == out.dtype:
            # Inference: the same arithmetic in place on the fresh residual (res * v + s is
            # bit for bit s + res * v), without three more activation-sized tensors per block
            # (measured 1.26x slower at batch 32 on CPU). This is the dense baseline skipping is
            # measured against, so it must not be slower than it needs to be.
            return res.mul_(factor).add_(out).relu_()
        return F.relu(out + res * factor)  # promotes: bf16 residual + fp32 shortcut -> fp32


def _router(in_channels: int, router_kwargs: Optional[dict]) -> Router:
    return Router(in_channels, **(router_kwargs or {}))


class GatedBasicBlock(GatedBlock):
    """CIFAR ResNet basic block (two 3x3 convs) with the option-A shortcut of He et al.:
    stride-2 subsampling and zero-padded channels, no parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, router_kwargs: Optional[dict] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.router = _router(in_planes, router_kwargs)
        self.stride = stride
        self.pad_channels = planes - in_planes
        self.out_channels = planes
        self.shortcut_nonnegative = True  # subsampling and zero channels keep the sign

    def residual(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # a fresh tensor (torchvision: ReLU(inplace=True))
        return self.bn2(self.conv2(out))

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            half = self.pad_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))
        return x


class GatedBottleneck(GatedBlock):
    """ImageNet ResNet v1.5 bottleneck (stride on the 3x3 conv, as torchvision)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, router_kwargs: Optional[dict] = None):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )
        self.router = _router(in_planes, router_kwargs)
        self.out_channels = out_planes
        self.shortcut_nonnegative = self.downsample is None  # a projection (conv + BN) may be negative

    def residual(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # a fresh tensor (torchvision: ReLU(inplace=True))
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return self.bn3(self.conv3(out))

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

