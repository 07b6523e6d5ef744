"""Gated ResNets for SP-Net: CIFAR ResNet-20/32/56/110 and ImageNet ResNet-50/101 (v1.5).

Layout (SP-Net (ECCV 2022) §3):
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
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import GatedBasicBlock, GatedBlock, GatedBottleneck
from .gates import GateOutput, autocast_off
from .output import SPNetOutput

# Keys a torchvision ResNet does not have: routers and the training-only heads.
SPNET_ONLY_KEY_MARKERS = (".router.", "aux_heads.", "block_aligners.")


class StageHead(nn.Module):
    """Training-only head of an intermediate stage: alignment a_k, then classifier c_k."""

    def __init__(self, in_channels: int, align_dim: int, num_classes: int) -> None:
        super().__init__()
        self.align = nn.Linear(in_channels, align_dim)
        self.fc = nn.Linear(align_dim, num_classes)


@dataclasses.dataclass
class Trunk:
    """What the stem and a run of stages produce for a batch (or a part of one)."""

    x: Tensor  # the last stage's output
    gates: list[GateOutput]  # one per block run
    stage_pooled: list[Tensor]  # (B, C_k) per stage run but the last (when recorded and the model has stage heads)
    block_pooled: list[Tensor]  # (B, C_k) per block run (when recorded and the model has block aligners)


# How one block runs inside a run of stages: (block, its input) -> (its output, the router's verdict).
BlockStep = Callable[[GatedBlock, Tensor], "tuple[Tensor, GateOutput]"]


def call_block(block: GatedBlock, x: Tensor) -> tuple[Tensor, GateOutput]:
    """The block's own forward: the :data:`BlockStep` of the masked forward."""
    return block(x)


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
        # The training-only heads are built AFTER the shared parts are initialised: building a
        # Linear draws from the global RNG, so heads built before _init_weights would shift the
        # convolutions' draws, and the same run.seed would start SP-Net and its baseline (no heads)
        # from different backbones. Built here, every shared parameter is bit-identical across
        # methods (tests/models/test_resnet_heads.py) and its distribution is unchanged; the
        # heads hold no Conv2d / BatchNorm, so _init_weights would not have touched them.
        self.aux_heads: Optional[nn.ModuleList] = None
        self.block_aligners: Optional[nn.ModuleList] = None
        self._init_weights()
        if aux_heads:
            self.aux_heads = nn.ModuleList(StageHead(w, feature_dim, num_classes) for w in stage_widths[:-1])
        if block_align:
            self.block_aligners = nn.ModuleList(
                nn.Identity() if w == feature_dim else nn.Linear(w, feature_dim) for w in stage_widths)

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

    def set_gate_threshold(self, threshold: float) -> None:
        """Evaluation rule of every router: execute iff logit1 - logit0 > ``threshold`` (0: the paper's)."""
        for block in self.gated_blocks():
            block.router.threshold = float(threshold)

    @property
    def gate_threshold(self) -> float:
        """The routers' shared evaluation threshold (see :meth:`set_gate_threshold`)."""
        values = {block.router.threshold for block in self.gated_blocks()}
        if len(values) != 1:
            raise ValueError(f"the routers hold different thresholds {sorted(values)}; set one with set_gate_threshold")
        return values.pop()

    def bake_gate_threshold(self) -> None:
        """Move the evaluation threshold into every router's bias (inference copies only, see Router.bake_threshold)."""
        for block in self.gated_blocks():
            block.router.bake_threshold()

    # ---------------------------------------------------------------- forward
    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans or min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"input of shape {tuple(x.shape)}: {type(self).__name__} expects (B, {self.in_chans}, H, W) "
                f"with H, W >= {self.min_input_size}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """timm-style: the final feature map (B, D, h, w); gate information is discarded."""
        self.check_input(x)
        return self._run_stages(self.forward_stem(x), range(self.num_stages), record=False).x

    def forward(self, x: Tensor) -> SPNetOutput:
        self.check_input(x)
        return self._output(self._run_stages(self.forward_stem(x), range(self.num_stages), record=True))

    def _run_stages(self, x: Tensor, stage_indices: range, record: bool, step: BlockStep = call_block) -> Trunk:
        """The stages ``stage_indices`` on ``x``, each block run by ``step``.

        Args:
            x: the input of the first of the stages.
            stage_indices: consecutive stage indices.
            record: also return the pooled outputs the training heads read: those of every stage
                but the last for the stage classifiers, those of every block for the block aligners.
            step: how a block runs (:func:`call_block`: its masked forward).
        """
        gates, stage_pooled, block_pooled = [], [], []
        for stage_idx in stage_indices:
            for block in self.stages[stage_idx]:
                x, gate = step(block, x)
                gates.append(gate)
                if record and self.block_aligners is not None:
                    block_pooled.append(x.mean(dim=(2, 3)))  # (B, C_k)
            if record and self.aux_heads is not None and stage_idx < self.num_stages - 1:
                # fp32 accumulation and result (no fp32 copy of the map): the stage heads are fp32.
                stage_pooled.append(x.mean(dim=(2, 3), dtype=torch.float32))  # (B, C_k)
        return Trunk(x, gates, stage_pooled, block_pooled)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))  # (B, D)
        return x if pre_logits else self.fc(x)

    def _output(self, trunk: Trunk) -> SPNetOutput:
        """The heads on a recorded trunk of every stage, and everything the losses read."""
        x, gates, stage_pooled, block_pooled = trunk.x, trunk.gates, trunk.stage_pooled, trunk.block_pooled
        block_features = []
        if self.block_aligners is not None:
            block_features = [self.block_aligners[stage_idx](pooled)  # (B, D)
                              for stage_idx, pooled in zip(self.block_stage, block_pooled)]

        # Heads in fp32 with autocast off: the losses compare their logits (and the exported fp32
        # model's argmax) to bf16 rounding otherwise; they are a few Linear layers on pooled features.
        # The pooling is fp32 too: a bf16 mean rounds the feature to 8 mantissa bits before .float().
        with autocast_off(x.device):
            final = x.mean(dim=(2, 3), dtype=torch.float32)  # (B, D); a_K is the identity
            logits = self.fc(final)
            stage_features, stage_logits = [], []
            if self.aux_heads is not None:
                for head, pooled in zip(self.aux_heads, stage_pooled):
                    aligned = head.align(pooled)  # (B, D), pooled in fp32 by _run_stages
                    stage_features.append(aligned)
                    stage_logits.append(head.fc(aligned))
        stage_features.append(final)
        stage_logits.append(logits)
        return SPNetOutput(
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
