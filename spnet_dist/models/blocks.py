"""Gated residual blocks: out = relu(shortcut(x) + v * residual(x)), every block gated.

Each block exposes ``residual``, ``shortcut`` and ``router`` separately so the MAC profiler can
measure them one by one and the skipping inference path can run ``residual`` on a subset of
the batch. Parameter names follow torchvision (conv1/bn1/.../downsample) so torchvision
ResNet weights load into the gated ImageNet models.

The skipping path has two strategies (``GatedBlock.skip_strategy``):

* ``"gather"``: the open samples are listed with ``nonzero()`` and only they run the residual.
  Exact work, but the host must read the list to size the gathered batch: one host-device
  synchronisation per block on CUDA (free on CPU, where nothing runs asynchronously).
* ``"capacity"`` (mixture-of-experts style): the residual runs on a fixed number C of samples,
  chosen on the host from the batch size alone (:func:`skip_capacity`), open samples first;
  closed samples that fill the capacity are multiplied by their 0 gate (the masked path's
  arithmetic). Nothing is read from the device per block, so CUDA kernels queue back to back
  and every block sees a shape known in advance. A block whose open samples exceed C raises a
  device-side overflow flag; the network reads the OR of all flags once per forward and redoes
  the forward with ``"gather"`` if any is set, so the output is always exact.

``"auto"`` picks capacity for CUDA inputs and gather elsewhere: the default of exported models
(``load_model``, timm ``pretrained=True``). Models built by ``create_model`` default to gather,
so the trainer's evaluation and eval-mode teacher keep their documented behaviour.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gates import GateOutput, Router, global_pool
from .spare import Spare, batch_view

SKIP_STRATEGIES = ("auto", "gather", "capacity")

# The open samples a skipping block gathers (up to a batch-sized activation, 26 MB in ResNet-50's
# stage 3 at batch 32), kept between blocks and forwards instead of allocated each time (spare.py).
_GATHERED = Spare()


def check_skip_strategy(strategy: str) -> str:
    """``strategy`` if it is one of :data:`SKIP_STRATEGIES`, else a one-line ``ValueError``."""
    if strategy not in SKIP_STRATEGIES:
        raise ValueError(f"skip_strategy: must be one of {SKIP_STRATEGIES}, got {strategy!r}")
    return strategy


def resolve_skip_strategy(strategy: str, device: torch.device) -> str:
    """``"auto"`` -> ``"capacity"`` on CUDA (no per-block host sync), ``"gather"`` elsewhere.

    Args:
        strategy: "auto" | "gather" | "capacity".
        device: the device of the block input.
    """
    if strategy == "auto":
        return "capacity" if device.type == "cuda" else "gather"
    return check_skip_strategy(strategy)


def skip_capacity(batch: int, rate: float, margin: float = 3.0, multiple: int = 1) -> int:
    """Samples a block's residual runs on under the capacity strategy, from the batch size alone.

    C = min(B, round_up(ceil(B r + k sqrt(B r (1 - r))), m)): the expected number of open
    samples plus ``margin`` binomial standard deviations, so with independent decisions at the
    block's measured rate a batch overflows rarely (k = 3: ~0.1 % per block), and an overflow
    costs a recomputation, never a wrong result.

    Args:
        batch: B.
        rate: r, the block's expected execution rate in [0, 1] (1: C = B, never overflows).
        margin: k, in binomial standard deviations.
        multiple: m; C is rounded up to a multiple of it (8 on CUDA: tensor-core friendly
            batch sizes, and fewer distinct shapes for cuDNN's autotuner).
    """
    mean = batch * rate
    # the tiny epsilon keeps float noise (10 * 0.3 = 3.0000000000000004) from adding a sample
    need = math.ceil(mean + margin * math.sqrt(max(mean * (1.0 - rate), 0.0)) - 1e-9)
    need = -(-need // multiple) * multiple
    return max(0, min(batch, need))


def _sample_rows(x: Tensor) -> Optional[Tensor]:
    """A (B, C*H*W) view of ``x`` when each sample is one contiguous block of memory (NCHW or
    channels_last), else None. Row gathers and scatters on it are plain row copies: on CPU,
    ``index_select``/``index_add_`` on it ran 1.5x/4x faster than advanced indexing and
    ``index_add_`` on the 4-D channels_last tensor (ResNet-50 stage 1, batch 32, 17 rows)."""
    if x.is_contiguous():
        return x.view(x.shape[0], -1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # a view: NHWC memory is contiguous
    return None


def gather_samples(x: Tensor, index: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``x[index]`` along the batch dimension, in ``x``'s memory format.

    Args:
        x: (B, ...) samples.
        index: (n,) sample indices.
        out: a flat tensor of at least n samples' elements to gather into (a :class:`Spare`'s);
            None allocates.
    """
    rows = _sample_rows(x)
    if rows is None:
        return x[index]  # advanced indexing keeps a channels_last layout (index_select would not)
    if out is None:
        picked = rows.index_select(0, index)
    else:
        picked = torch.index_select(rows, 0, index, out=out[:index.numel() * rows.shape[1]].view(-1, rows.shape[1]))
    return batch_view(picked.view(-1), index.numel(), x)  # rows back to (n, C, H, W) in x's layout


def scatter_samples_(out: Tensor, index: Tensor, values: Tensor, accumulate: bool) -> Tensor:
    """``out[index] += values`` (``accumulate``) or ``out[index] = values``, in place; returns ``out``."""
    rows_out, rows_values = _sample_rows(out), _sample_rows(values)
    same_layout = out.is_contiguous() == values.is_contiguous()
    if rows_out is None or rows_values is None or not same_layout:
        return out.index_add_(0, index, values) if accumulate else out.index_copy_(0, index, values)
    if accumulate:
        rows_out.index_add_(0, index, rows_values)
    else:
        rows_out.index_copy_(0, index, rows_values)
    return out


class GatedBlock(nn.Module):
    """Base class: routing, the masked (training) path and the skipping (inference) path."""

    router: Router
    # "masked": residual computed for every sample and multiplied by the 0/1 gate (training
    # needs it: the router's gradient is proportional to residual(x), paper eq. 3).
    # "skip": in eval mode only the samples whose gate is open run the residual branch.
    execution: str = "masked"
    # How "skip" runs (module docstring): "auto" | "gather" | "capacity".
    skip_strategy: str = "gather"
    # Capacity rule (skip_capacity): expected execution rate r (1.0: capacity = batch, never
    # overflows, saves nothing; load_model sets the export's measured rates), margin k, and
    # rounding multiple m (None: 8 on CUDA, 1 elsewhere).
    expected_rate: float = 1.0
    capacity_margin: float = 3.0
    capacity_multiple: Optional[int] = None

    def residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def shortcut(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, skip_strategy: Optional[str] = None) -> tuple[Tensor, GateOutput]:
        """relu(shortcut(x) + v * residual(x)) and the router's verdict.

        Args:
            x: the block input (B, C, H, W).
            skip_strategy: overrides ``self.skip_strategy`` for this call (the network's exact
                fallback passes "gather").
        """
        out, gate, _ = self.forward_pooled(x, skip_strategy)
        return out, gate

    def forward_pooled(self, x: Tensor, skip_strategy: Optional[str] = None, pooled: Optional[Tensor] = None
                       ) -> tuple[Tensor, GateOutput, Optional[Tensor]]:
        """:meth:`forward`, passing the routers' global pools along a chain of blocks.

        Args:
            x: the block input (B, C, H, W).
            skip_strategy: as in :meth:`forward`.
            pooled: ``global_pool(x)`` if known (the previous block's third result), else None.

        Returns:
            The block output, the router's verdict, and ``global_pool(output)`` when the
            gather skip path got it for less than a pass over the output (an identity shortcut
            leaves closed samples unchanged, so only the open ones are pooled), else None.
        """
        gate = self.router(x, pooled)
        if self.execution == "skip" and not self.training:
            if resolve_skip_strategy(skip_strategy or self.skip_strategy, x.device) == "capacity":
                return self._forward_capacity(x, gate), gate, None
            return self._forward_skip(x, gate)
        return self._forward_masked(x, gate.decision), gate, None

    def _forward_masked(self, x: Tensor, decision: Tensor) -> Tensor:
        """relu(shortcut(x) + v * residual(x)) with the residual computed for every sample."""
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

    def _closed(self, out: Tensor, in_place: bool) -> Tensor:
        """relu(shortcut) of a block closed for every sample."""
        return out if self.shortcut_nonnegative else F.relu(out, inplace=in_place)

    @staticmethod
    def _add_rows_relu(out: Tensor, index: Tensor, res: Tensor, in_place: bool) -> Tensor:
        """relu(out with ``res`` added to rows ``index``), promoting like the masked path; in place
        on ``out`` when autograd is off and no promotion is needed."""
        dtype = torch.promote_types(out.dtype, res.dtype)
        if not (in_place and out.dtype == dtype):
            out = out.to(dtype, copy=True)
        return scatter_samples_(out, index, res.to(dtype), accumulate=True).relu_()

    # True when shortcut(x) >= 0 for every block input x. Block inputs are ReLU outputs (the
    # stem and every block end with a ReLU), so identity and option-A shortcuts keep the sign
    # and a closed block's relu(shortcut(x)) is shortcut(x) itself: no pass over the tensor.
    shortcut_nonnegative: bool = False

    def _forward_skip(self, x: Tensor, gate: GateOutput) -> tuple[Tensor, GateOutput, Optional[Tensor]]:
        """relu(shortcut(x) + v * residual(x)) computing ``residual`` only where v = 1.

        Open samples run together: gather -> residual -> scatter-add
        (index_add_). Without autograd the sums are formed in place (the block input is the
        previous block's output, owned by the network), so a partly open block allocates only
        the gathered batch and its residual. The open-sample list is read on the host
        (``nonzero``): free on CPU; on CUDA it is one synchronisation per block, the price
        of launching the residual kernels on exactly the open samples.

        Returns:
            The output, ``gate``, and ``global_pool(output)`` when the router reported the pool
            of ``x`` and the shortcut is the identity (closed samples keep their pool, open
            ones are pooled from their new rows), else None.
        """
        out = self.shortcut(x)  # the shortcut always runs (projection included)
        pooled = gate.pooled
        keeps_pool = pooled is not None and out is x  # closed samples leave the block unchanged
        open_idx = gate.decision.nonzero().squeeze(1)  # (B_open,)
        n_open = open_idx.numel()
        in_place = not torch.is_grad_enabled()
        if n_open == 0:
            return self._closed(out, in_place), gate, pooled if keeps_pool else None
        if n_open == x.shape[0]:
            res = self.residual(x)
            if in_place and res.dtype == out.dtype:
                return res.add_(out).relu_(), gate, None
            return F.relu(out + res), gate, None  # promotes like the masked path (bf16 residual, fp32 shortcut)
        # sized for the batch: any count fits. CPU only: CUDA's caching allocator reuses memory itself.
        spare = _GATHERED.take(x.numel(), x) if in_place and x.device.type == "cpu" else None
        x_open = gather_samples(x, open_idx, out=spare)  # (B_open, C, H, W)
        res = self.residual(x_open)
        if in_place and self.shortcut_nonnegative and res.dtype == out.dtype:
            # The closed rows of a non-negative shortcut are final already (relu is the
            # identity there): only the open rows are written, no pass over the whole batch.
            shortcut_open = x_open if out is x else gather_samples(out, open_idx)
            rows = res.add_(shortcut_open).relu_()
            pooled_out = pooled.index_copy(0, open_idx, global_pool(rows)) if keeps_pool else None
            out, pooled = scatter_samples_(out, open_idx, rows, accumulate=False), pooled_out
        else:
            out, pooled = self._add_rows_relu(out, open_idx, res, in_place), None
        if spare is not None:
            _GATHERED.give(spare)  # x_open is dead: nothing returned views it
        return out, gate, pooled

    def skip_capacity(self, batch: int, device: torch.device) -> int:
        """This block's capacity C for a batch of ``batch`` on ``device`` (:func:`skip_capacity`)."""
        multiple = self.capacity_multiple or (8 if device.type == "cuda" else 1)
        return skip_capacity(batch, self.expected_rate, self.capacity_margin, multiple)

    def _forward_capacity(self, x: Tensor, gate: GateOutput) -> Tensor:
        """relu(shortcut(x) + v * residual(x)) with ``residual`` run on a fixed C samples, open first.

        No device value is read: C comes from the batch size (``skip_capacity``), the open
        samples are moved to the front by a stable argsort of the decisions (a device op), and
        the first C are gathered. Their residual is multiplied by their gate, so closed samples
        that fill the capacity add exactly 0, as in the masked path. If more than C samples are
        open, the rest are dropped here and ``gate.overflow`` (a device bool, never read in the
        block) tells the network to redo the forward with the gather strategy.
        """
        decision = gate.decision  # (B,)
        batch = x.shape[0]
        capacity = self.skip_capacity(batch, x.device)
        if capacity >= batch:  # nothing to gather: every sample runs, closed ones times 0
            return self._forward_masked(x, decision)
        out = self.shortcut(x)  # the shortcut always runs (projection included)
        in_place = not torch.is_grad_enabled()
        gate.overflow = decision.sum() > capacity  # 0-dim bool on the device
        if capacity == 0:
            return self._closed(out, in_place)
        take = torch.argsort(decision, descending=True, stable=True)[:capacity]  # (C,) open first
        res = self.residual(gather_samples(x, take))  # (C, C_out, H, W)
        factor = decision[take].view(-1, 1, 1, 1).to(res.dtype)
        res = res.mul_(factor) if in_place else res * factor
        return self._add_rows_relu(out, take, res, in_place)


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

