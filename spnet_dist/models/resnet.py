"""Gated ResNets for SP-Net: CIFAR ResNet-20/32/56/110 and ImageNet ResNet-50/101 (v1.5).

Layout (paper §3, design.md §3):
* every residual block has a router (blocks.py), the first block of each stage included; its
  shortcut (projection or option-A) always runs;
* after every stage k a classifier c_k reads the pooled stage feature through an alignment
  layer a_k: Linear(C_k, D) to the last stage's width D (the official code's ``cc1..cc3``);
  a_K is the identity and c_K is the ordinary ``fc``, the only head kept for inference;
* ``forward`` returns an :class:`SPNetOutput`, never a tuple.

The ImageNet models keep torchvision's parameter names (conv1, bn1, layer1.0.conv1, ...,
layer1.0.downsample.0, fc), so a torchvision state dict loads with only router and auxiliary
head keys missing (:func:`load_torchvision_weights` checks every other key strictly).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import GatedBasicBlock, GatedBlock, GatedBottleneck, check_skip_strategy
from .gates import GateOutput, any_overflow, autocast_off, global_pool
from .output import SPNetOutput
from .spare import Spare, batch_view

_Result = TypeVar("_Result")

PER_IMAGE_STAGES = ("auto", "off")


def check_per_image_stages(mode: str) -> str:
    """``mode`` if it is one of :data:`PER_IMAGE_STAGES`, else a one-line ``ValueError``."""
    if mode not in PER_IMAGE_STAGES:
        raise ValueError(f"per_image_stages: must be one of {PER_IMAGE_STAGES}, got {mode!r}")
    return mode


# Keys a torchvision ResNet does not have: routers and the training-only heads.
SPNET_ONLY_KEY_MARKERS = (".router.", "aux_heads.", "block_aligners.")


class StageHead(nn.Module):
    """Training-only head of an intermediate stage: alignment a_k, then classifier c_k."""

    def __init__(self, in_channels: int, align_dim: int, num_classes: int) -> None:
        super().__init__()
        self.align = nn.Linear(in_channels, align_dim)
        self.fc = nn.Linear(align_dim, num_classes)


@dataclasses.dataclass
class _Trunk:
    """What the stem and a run of stages produce for a batch (or a part of one)."""

    x: Tensor  # the last stage's output
    gates: list[GateOutput]  # one per block run
    stage_pooled: list[Tensor]  # (B, C_k) per stage run but the last (when recorded and the model has stage heads)
    block_pooled: list[Tensor]  # (B, C_k) per block run (when recorded and the model has block aligners)
    pooled: Optional[Tensor] = None  # global_pool(x) when a block passed it on: the next router's input

    @staticmethod
    def join(x: Tensor, parts: Sequence["_Trunk"]) -> "_Trunk":
        """The trunk of a batch from those of its consecutive parts, whose outputs were copied into ``x``."""
        return _Trunk(
            x=x,
            gates=[GateOutput.cat(g) for g in zip(*(p.gates for p in parts))],
            stage_pooled=[torch.cat(t) for t in zip(*(p.stage_pooled for p in parts))],
            block_pooled=[torch.cat(t) for t in zip(*(p.block_pooled for p in parts))],
        )

    def then(self, later: "_Trunk") -> "_Trunk":
        """This trunk followed by the stages that ran on its output."""
        return _Trunk(later.x, self.gates + later.gates, self.stage_pooled + later.stage_pooled,
                      self.block_pooled + later.block_pooled, later.pooled)


# The batch the per-image stages are joined into: the largest tensor of such a forward (51 MB at
# batch 32 for ResNet-50 at 224 px), more than glibc serves from its heap (32 MB at most), so a new
# one came from a fresh mmap whose 12.5k pages the kernel zeroed on first touch, ~15 ms a forward.
_JOIN = Spare()


class GatedResNet(nn.Module):
    """A ResNet whose residual blocks are executed or skipped per sample.

    Subclasses build the stem (``_stem``) and say how large an input must be.

    Args:
        block_cls: GatedBasicBlock or GatedBottleneck.
        layers: blocks per stage.
        stage_planes: ``planes`` argument of each stage's blocks.
        stem_channels: channels leaving the stem.
        num_classes: classifier outputs.
        in_chans: input image channels.
        aux_heads: build the intermediate stage classifiers and alignment layers (training);
            exported inference models and runs without stage heads (Table 3 baseline, EXP-1)
            are built without them (``spnet_dist.losses.needs_aux_heads`` decides).
        block_align: also record every block's pooled output, raw and mapped by one alignment
            layer per stage (Identity for the last stage), needed only by the L_evo strategies
            over blocks (paper Table 5 EXP-1/2, official CIFAR code). One aligner per stage,
            not per block: consecutive blocks of a stage are compared in the same space, and a
            skipped block (output = input) gives exactly a zero difference.
        router_hidden, router_dropout, router_bias, gumbel_tau, gumbel_noise: see Router.
    """

    min_input_size = 8
    stem_stride = 1  # input pixels per stem-output pixel along each side
    # Inference schedule (set_per_image_stages): "auto" runs the stem and the leading stages whose
    # output holds at least ``per_image_min_bytes`` per image one image at a time when the input
    # is on the CPU; "off" always runs whole batches.
    per_image_stages: str = "off"
    per_image_min_bytes: int = 1 << 20

    def __init__(
        self,
        block_cls: type[GatedBlock],
        layers: Sequence[int],
        stage_planes: Sequence[int],
        stem_channels: int,
        num_classes: int = 1000,
        in_chans: int = 3,
        aux_heads: bool = True,
        block_align: bool = False,
        router_hidden: int = 128,
        router_dropout: float = 0.4,
        router_bias: Sequence[float] = (0.1, 2.0),
        gumbel_tau: float = 1.0,
        gumbel_noise: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"model.num_classes: must be >= 1, got {num_classes}")
        if in_chans < 1:
            raise ValueError(f"in_chans: must be >= 1, got {in_chans}")
        if not 0.0 <= router_dropout < 1.0:
            raise ValueError(f"model.router_dropout: must be in [0, 1), got {router_dropout}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        router_kwargs = dict(hidden=router_hidden, dropout=router_dropout, init_bias=tuple(router_bias),
                             tau=gumbel_tau, noise=gumbel_noise)
        self._stem(in_chans, stem_channels)

        in_planes = stem_channels
        stage_widths, block_stage = [], []
        for stage_idx, (n_blocks, planes) in enumerate(zip(layers, stage_planes)):
            stride = 1 if stage_idx == 0 else 2
            blocks = []
            for i in range(n_blocks):
                block = block_cls(in_planes, planes, stride if i == 0 else 1, router_kwargs)
                in_planes = block.out_channels
                blocks.append(block)
                block_stage.append(stage_idx)
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
            stage_widths.append(in_planes)
        self.stage_widths = tuple(stage_widths)
        self.num_stages = len(layers)
        self.block_stage = tuple(block_stage)
        self.num_features = feature_dim = stage_widths[-1]  # D, timm's name for the head width
        self.fc = nn.Linear(feature_dim, num_classes)
        self.aux_heads = (
            nn.ModuleList(StageHead(w, feature_dim, num_classes) for w in stage_widths[:-1]) if aux_heads else None
        )
        self.block_aligners = (
            nn.ModuleList(nn.Identity() if w == feature_dim else nn.Linear(w, feature_dim) for w in stage_widths)
            if block_align
            else None
        )
        self._init_weights()

    # ---------------------------------------------------------------- construction helpers
    def _stem(self, in_chans: int, stem_channels: int) -> None:
        raise NotImplementedError

    def forward_stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def gated_blocks(self) -> Iterator[GatedBlock]:
        """The N gated blocks in execution order."""
        for stage in self.stages:
            yield from stage  # type: ignore[misc]

    @property
    def num_blocks(self) -> int:
        return len(self.block_stage)

    # ---------------------------------------------------------------- gate control
    def set_gate_override(self, value: Optional[bool]) -> None:
        """Force every gate open (True), closed (False), or back to the routers (None)."""
        for block in self.gated_blocks():
            block.router.force = value

    def set_execution(self, mode: str) -> None:
        """"masked" (compute every block, multiply by the gate) or "skip" (in eval mode, run a
        block's residual branch only on the samples whose gate is open)."""
        if mode not in ("masked", "skip"):
            raise ValueError(f"execution mode must be 'masked' or 'skip', got {mode!r}")
        for block in self.gated_blocks():
            block.execution = mode

    def set_skip_strategy(self, strategy: str) -> None:
        """How the "skip" execution runs (spnet_dist.models.blocks): "gather" (exact work, one
        host sync per block on CUDA), "capacity" (a fixed number of samples per block, one host
        sync per forward, exact fallback on overflow) or "auto" (capacity on CUDA, gather elsewhere)."""
        check_skip_strategy(strategy)
        for block in self.gated_blocks():
            block.skip_strategy = strategy

    def set_skip_capacity(self, rates: Union[float, Sequence[float], None] = None, margin: Optional[float] = None,
                          multiple: Optional[int] = None) -> None:
        """Set the capacity rule of the capacity skip strategy (``blocks.skip_capacity``).

        Args:
            rates: expected execution rate of every block (one value for all, or one per block in
                execution order), each in [0, 1]; None keeps the current ones.
            margin: binomial standard deviations added to the expected open count (>= 0); None keeps it.
            multiple: capacities are rounded up to a multiple of it (>= 1); None keeps it.
        """
        blocks = list(self.gated_blocks())
        if rates is not None:
            values = [float(rates)] * len(blocks) if isinstance(rates, (int, float)) else [float(r) for r in rates]
            if len(values) != len(blocks):
                raise ValueError(f"rates: {len(values)} values for {len(blocks)} gated blocks")
            bad = [r for r in values if not 0.0 <= r <= 1.0]
            if bad:
                raise ValueError(f"rates: execution rates must be in [0, 1], got {bad[0]}")
        if margin is not None and not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin: must be a finite number >= 0, got {margin}")
        if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
            raise ValueError(f"multiple: must be an integer >= 1, got {multiple!r}")
        for i, block in enumerate(blocks):
            if rates is not None:
                block.expected_rate = values[i]
            if margin is not None:
                block.capacity_margin = float(margin)
            if multiple is not None:
                block.capacity_multiple = multiple

    def skip_capacities(self, batch: int, device: Union[str, torch.device] = "cpu") -> list[int]:
        """Every block's capacity for a batch of ``batch`` on ``device`` (capacity strategy)."""
        return [block.skip_capacity(batch, torch.device(device)) for block in self.gated_blocks()]

    def set_per_image_stages(self, mode: str, min_bytes: Optional[int] = None) -> None:
        """"auto": in eval mode on the CPU, run the stem and the leading stages whose output holds
        at least ``min_bytes`` per image one image at a time, then the rest on the whole batch
        (ResNet-50 at 224 px: stem, stages 1 and 2 per image); "off": whole batches everywhere.

        Why: at batch 32 those activations are 50-100 MB tensors. glibc maps every allocation
        that large fresh from the kernel, which zeroes each page on first touch, and a pass over
        100 MB misses every cache; one image's 1.6-3.2 MB tensors are reused from the heap and
        stay in cache. Measured on ResNet-50, batch 32, 1 CPU thread, routers open for half
        the samples (tools/bench_inference.py): the dense forward 2.43 -> 2.09 s, the skipping
        forward 1.54 -> 1.22 s; a skipping block at batch 1 needs no gather at all. The later
        stages keep the batch: their weights are large next to one image's activations (a
        ResNet-50 stage-3 block per image was 15 % slower, the first one 3 % of the whole dense
        forward). Outputs are the same up to float rounding (in eval mode every layer works per
        sample). GPUs want whole batches: "auto" leaves CUDA inputs alone. Without autograd the
        batch the images are joined into is kept for the next forward (one per thread, 51 MB at
        batch 32 here): a fresh one cost ~15 ms of page zeroing per forward.

        Args:
            mode: "auto" | "off".
            min_bytes: per-image size of a stage's output from which it runs per image; None
                keeps the current one (1 MiB).
        """
        check_per_image_stages(mode)
        if min_bytes is not None and (isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0):
            raise ValueError(f"min_bytes: must be an integer >= 0, got {min_bytes!r}")
        self.per_image_stages = mode
        if min_bytes is not None:
            self.per_image_min_bytes = min_bytes

    def count_per_image_stages(self, x: Tensor) -> int:
        """How many leading stages (with the stem) run one image at a time for input ``x``.

        0 while a graph is captured (torch.compile, torch.export and the ONNX exporter, jit
        tracing): the per-image loop would unroll at the traced batch size.
        """
        if self.per_image_stages == "off" or self.training or x.device.type != "cpu" or x.shape[0] == 1:
            return 0
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return 0
        height, width = x.shape[-2:]
        stride, count = self.stem_stride, 0
        for stage_idx, channels in enumerate(self.stage_widths):
            stride *= 1 if stage_idx == 0 else 2
            output_bytes = channels * math.ceil(height / stride) * math.ceil(width / stride) * x.element_size()
            if output_bytes < self.per_image_min_bytes:
                break
            count += 1
        return count

    # ---------------------------------------------------------------- forward
    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans or min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"input of shape {tuple(x.shape)}: {type(self).__name__} expects (B, {self.in_chans}, H, W) "
                f"with H, W >= {self.min_input_size}"
            )

    def _exact(self, run: Callable[[Tensor, Optional[str]], tuple[_Result, Optional[Tensor]]], x: Tensor) -> _Result:
        """``run(x, None)``, redone as ``run(x, "gather")`` if a capacity block overflowed.

        The OR of the blocks' device-side overflow flags is read here, once per forward: the
        only host sync of a capacity-strategy forward (none at all when no block has fewer
        slots than the batch). An overflow means some open sample did not run its residual,
        so the whole forward is recomputed with exact gathers (the in-place block sums have
        overwritten the intermediate activations, so it cannot resume mid-network).
        """
        result, overflow = run(x, None)
        if overflow is not None and bool(overflow):
            result, _ = run(x, "gather")
        return result

    def forward_features(self, x: Tensor) -> Tensor:
        """timm-style: the final feature map (B, D, h, w); gate information is discarded."""
        self.check_input(x)
        return self._exact(self._features_once, x)

    def _features_once(self, x: Tensor, skip_strategy: Optional[str]) -> tuple[Tensor, Optional[Tensor]]:
        trunk = self._trunk(x, skip_strategy, record=False)
        return trunk.x, any_overflow(trunk.gates)

    def _trunk(self, x: Tensor, skip_strategy: Optional[str], record: bool) -> _Trunk:
        """The stem and every stage, the leading ones image by image when ``count_per_image_stages`` says so.

        Args:
            x: the input images.
            skip_strategy: None (every block's own) or the strategy forced on every block.
            record: also return the pooled outputs the training heads read: those of every stage
                but the last for the stage classifiers, those of every block for the block aligners.
        """
        every_stage = range(self.num_stages)
        per_image = self.count_per_image_stages(x)
        if per_image == 0:
            return self._run_stages(self.forward_stem(x), every_stage, skip_strategy, record)
        parts, pools, joined = [], [], None
        batch_stages = every_stage[per_image:]
        for i in range(x.shape[0]):
            part = self._run_stages(self.forward_stem(x[i:i + 1]), every_stage[:per_image], skip_strategy, record)
            if joined is None:
                flat = _JOIN.take(x.shape[0] * part.x[0].numel(), part.x)
                joined = batch_view(flat, x.shape[0], part.x)
            joined[i:i + 1].copy_(part.x)  # while still in cache: measured ~25 % cheaper than one torch.cat at the end
            if batch_stages:
                # The next router's pool, while the image is in cache (bitwise what pooling the joined
                # batch gives: 6 ms of a batch-32 ResNet-50 forward that way, under 1.5 ms here).
                pools.append(part.pooled if part.pooled is not None else global_pool(part.x))
            parts.append(dataclasses.replace(part, x=joined, pooled=None))  # the image's own output can go now
        pooled = torch.cat(pools) if pools else None
        trunk = _Trunk.join(joined, parts).then(self._run_stages(joined, batch_stages, skip_strategy, record, pooled))
        if trunk.x.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
            _JOIN.give(flat)  # else the joined batch is the result (every stage ran per image): the caller's now
        return trunk

    def _run_stages(self, x: Tensor, stage_indices: range, skip_strategy: Optional[str], record: bool,
                    pooled: Optional[Tensor] = None) -> _Trunk:
        """The stages ``stage_indices`` on ``x``; ``pooled`` is ``global_pool(x)`` if known."""
        gates, stage_pooled, block_pooled = [], [], []
        for stage_idx in stage_indices:
            for block in self.stages[stage_idx]:
                x, gate, pooled = block.forward_pooled(x, skip_strategy, pooled)
                gates.append(gate)
                if record and self.block_aligners is not None:
                    block_pooled.append(x.mean(dim=(2, 3)))  # (B, C_k)
            if record and self.aux_heads is not None and stage_idx < self.num_stages - 1:
                stage_pooled.append(x.mean(dim=(2, 3)))  # (B, C_k)
        return _Trunk(x, gates, stage_pooled, block_pooled, pooled)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))  # (B, D)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> SPNetOutput:
        self.check_input(x)
        return self._exact(self._forward_once, x)

    def _forward_once(self, x: Tensor, skip_strategy: Optional[str]) -> tuple[SPNetOutput, Optional[Tensor]]:
        """One forward; also the OR of the capacity overflow flags (None: no block can overflow).

        Args:
            x: the input images.
            skip_strategy: None (every block's own) or the strategy forced on every block.
        """
        trunk = self._trunk(x, skip_strategy, record=True)
        x, gates, stage_pooled, block_pooled = trunk.x, trunk.gates, trunk.stage_pooled, trunk.block_pooled
        block_features = []
        if self.block_aligners is not None:
            block_features = [self.block_aligners[stage_idx](pooled)  # (B, D)
                              for stage_idx, pooled in zip(self.block_stage, block_pooled)]

        # Heads in fp32 with autocast off: the losses compare their logits (and the exported fp32
        # model's argmax) to bf16 rounding otherwise; they are a few Linear layers on pooled features.
        with autocast_off(x.device):
            final = x.mean(dim=(2, 3)).float()  # (B, D); a_K is the identity
            logits = self.fc(final)
            stage_features, stage_logits = [], []
            if self.aux_heads is not None:
                for head, pooled in zip(self.aux_heads, stage_pooled):
                    aligned = head.align(pooled.float())  # (B, D)
                    stage_features.append(aligned)
                    stage_logits.append(head.fc(aligned))
        stage_features.append(final)
        stage_logits.append(logits)
        output = SPNetOutput(
            logits=logits,
            stage_logits=stage_logits,
            gate_probs=torch.stack([g.prob for g in gates], dim=1),  # (B, N)
            gate_decisions=torch.stack([g.decision for g in gates], dim=1),  # (B, N)
            gate_logits=torch.stack([g.logits for g in gates], dim=1),  # (B, N, 2)
            stage_features=stage_features,
            block_features=block_features if self.block_aligners is not None else None,
            block_stage=self.block_stage,
            block_pooled=block_pooled if self.block_aligners is not None else None,
        )
        return output, any_overflow(gates)

    # ---------------------------------------------------------------- export
    def inference_copy(self) -> "GatedResNet":
        """A copy without the training-only heads and block aligners (what gets exported)."""
        model = copy.deepcopy(self)
        model.aux_heads = None
        model.block_aligners = None
        return model


class GatedCifarResNet(GatedResNet):
    """He et al.'s CIFAR ResNet-(6n+2): 3x3 stem, stages of 16/32/64 channels, option-A shortcuts."""

    min_input_size = 8

    def __init__(self, depth: int, **kwargs) -> None:
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        super().__init__(GatedBasicBlock, [n, n, n], [16, 32, 64], stem_channels=16, **kwargs)

    def _stem(self, in_chans: int, stem_channels: int) -> None:
        self.conv1 = nn.Conv2d(in_chans, stem_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class GatedImageNetResNet(GatedResNet):
    """torchvision-compatible ResNet v1.5 (stride on the 3x3 conv of the bottleneck)."""

    min_input_size = 32  # five stride-2 steps
    stem_stride = 4  # stride-2 convolution, stride-2 max-pool

    def __init__(self, layers: Sequence[int], **kwargs) -> None:
        super().__init__(GatedBottleneck, layers, [64, 128, 256, 512], stem_channels=64, **kwargs)

    def _stem(self, in_chans: int, stem_channels: int) -> None:
        self.conv1 = nn.Conv2d(in_chans, stem_channels, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward_stem(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        if self.training:
            return self.maxpool(self.relu(x))
        # Max-pooling and ReLU commute (ReLU is monotone), so inference pools first and runs the
        # ReLU on a 4x smaller tensor: the same values, 0.67 -> 0.44 ms per 224 px image on CPU.
        return self.relu(self.maxpool(x))


def load_torchvision_weights(model: GatedResNet, weights: Union[str, Path, Mapping[str, Tensor]]) -> None:
    """Load a torchvision ResNet state dict into a gated ResNet.

    Every key of the gated model except routers and training-only heads must be present, and
    every key of the file must be used; anything else is an error (no silent ``strict=False``).

    Args:
        model: the gated model.
        weights: a state dict, or a path to a ``.safetensors`` file or a torch ``.pth`` file
            (read with ``weights_only=True``: loading weights never unpickles arbitrary objects).
    """
    if isinstance(weights, (str, Path)):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"model.torchvision_weights: no such file: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = dict(weights)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(m in f".{k}" for m in SPNET_ONLY_KEY_MARKERS)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"torchvision weights do not match {type(model).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )
