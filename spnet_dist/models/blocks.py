"""Gated residual blocks: out = relu(shortcut(x) + v * residual(x)), every block gated.

Each block exposes ``residual``, ``shortcut`` and ``router`` separately so the MAC profiler can
measure them one by one and the skipping inference path can run ``residual`` on a subset of
the batch. Parameter names follow torchvision (conv1/bn1/.../downsample) so torchvision
ResNet weights load into the gated ImageNet models.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gates import GateOutput, Router


class GatedBlock(nn.Module):
    """Base class: routing, the masked (training) path and the skipping (inference) path."""

    router: Router
    # "masked": residual computed for every sample and multiplied by the 0/1 gate (training
    # needs it: the router's gradient is proportional to residual(x), paper eq. 3).
    # "skip": in eval mode only the samples whose gate is open run the residual branch.
    execution: str = "masked"

    def residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def shortcut(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, GateOutput]:
        gate = self.router(x)
        if self.execution == "skip" and not self.training:
            return self._forward_skip(x, gate), gate
        res = self.residual(x)
        out = self.shortcut(x) + res * gate.decision.view(-1, 1, 1, 1).to(res.dtype)
        return F.relu(out), gate

    # True when shortcut(x) >= 0 for every block input x. Block inputs are ReLU outputs (the
    # stem and every block end with a ReLU), so identity and option-A shortcuts keep the sign
    # and a closed block's relu(shortcut(x)) is shortcut(x) itself: no pass over the tensor.
    shortcut_nonnegative: bool = False

    def _forward_skip(self, x: Tensor, gate: GateOutput) -> Tensor:
        """relu(shortcut(x) + v * residual(x)) computing ``residual`` only where v = 1.

        Open samples run together: gather -> residual -> scatter-add
        (index_add_). Without autograd the sums are formed in place (the block input is the
        previous block's output, owned by the network), so a partly open block allocates only
        the gathered batch and its residual. The open-sample list is read on the host
        (``nonzero``): free on CPU; on CUDA it is one synchronisation per block, the price
        of launching the residual kernels on exactly the open samples.
        """
        out = self.shortcut(x)  # the shortcut always runs (projection included)
        open_idx = gate.decision.nonzero().squeeze(1)  # (B_open,)
        n_open = open_idx.numel()
        in_place = not torch.is_grad_enabled()
        if n_open == 0:
            return out if self.shortcut_nonnegative else F.relu(out, inplace=in_place)
        if n_open == x.shape[0]:
            res = self.residual(x)
            if in_place and res.dtype == out.dtype:
                return res.add_(out).relu_()
            return F.relu(out + res)  # promotes like the masked path (bf16 residual, fp32 shortcut)
        # x[idx], not index_select: advanced indexing keeps a channels_last layout
        res = self.residual(x[open_idx])  # (B_open, C, H, W)
        dtype = torch.promote_types(out.dtype, res.dtype)
        if not (in_place and out.dtype == dtype):
            out = out.to(dtype, copy=True)
        return out.index_add_(0, open_idx, res.to(dtype)).relu_()


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
        out = F.relu(self.bn1(self.conv1(x)))
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
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

