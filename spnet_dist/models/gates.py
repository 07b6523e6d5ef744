"""The router: the only place that knows how a block's execute/skip decision is made.

SP-Net (and ConvNet-AIG before it) puts one router in front of every residual block:
global-average-pool of the block input -> Linear(C, 128) -> BN1d -> ReLU -> Dropout(0.4)
-> Linear(128, 2). Channel 0 scores "skip", channel 1 "execute".

* Training: Gumbel-softmax with temperature tau and hard straight-through, so the forward value
  is exactly 0 or 1 while the gradient is that of the soft sample (paper §3.1, official code).
* Inference: no noise; execute iff logit1 - logit0 > threshold. Deterministic, works at batch
  size 1. ``threshold`` is 0 (the paper's rule, logit1 > logit0) unless an evaluation calibrated
  it (``spnet_dist.evaluate.calibrate_threshold``: one offset shared by all blocks so that the
  evaluated execution rate meets the target); training never reads it, and an export adds it to
  ``fc2.bias[0]`` (:meth:`Router.bake_threshold`), so exported models keep the plain rule.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region that computes in fp32 even inside an autocast region (no-op where autocast does not exist).

    Args:
        device: the device of the region's inputs.
    """
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. 'meta' (the CPU device-bug guard runs models there)


@dataclass
class GateOutput:
    """One router's verdict for a batch.

    Attributes:
        logits: (B, 2) raw router logits, fp32.
        prob: (B,) execution probability softmax(logits)[:, 1], no noise, differentiable.
        decision: (B,) the factor the residual branch is multiplied by: exactly 0 or 1 in the
            forward pass; in training it carries the straight-through gradient.
    """

    logits: Tensor
    prob: Tensor
    decision: Tensor


def global_pool(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C) spatial mean in fp32: what a router looks at."""
    return x.float().mean(dim=(2, 3))


class Router(nn.Module):
    """Per-block execution router (SP-Net (ECCV 2022) §3.1).

    Args:
        in_channels: channels of the block input it looks at.
        hidden: width of the hidden layer (128 in the paper and code).
        dropout: dropout before the last layer (0.4).
        init_bias: initial bias of the last layer as (skip, execute); (0.1, 2.0) opens blocks
            with probability ~0.87 at start, so training begins close to the static ResNet.
        tau: Gumbel-softmax temperature.
        noise: with False, training uses the hard argmax with a straight-through softmax and
            no Gumbel noise (deterministic training, used by the gradient-equivalence tests).
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int = 128,
        dropout: float = 0.4,
        init_bias: Sequence[float] = (0.1, 2.0),
        tau: float = 1.0,
        noise: bool = True,
    ) -> None:
        super().__init__()
        if len(init_bias) != 2:
            raise ValueError(f"model.router_bias: expected 2 values (skip, execute), got {list(init_bias)}")
        if tau <= 0:
            raise ValueError(f"model.gumbel_tau: must be > 0, got {tau}")
        self.fc1 = nn.Linear(in_channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 2)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor([float(b) for b in init_bias]))
        self.tau = tau
        self.noise = noise
        # None: learned decisions; True / False force every sample open / closed (tests, MAC
        # measurement, the "all blocks open == static ResNet" check).
        self.force: Optional[bool] = None
        # Evaluation only: execute iff logit1 - logit0 > threshold. A plain attribute, not a
        # buffer: checkpoints and exports keep their keys; an export bakes it into fc2.bias.
        self.threshold: float = 0.0

    def forward(self, x: Tensor) -> GateOutput:
        """The verdict on block input ``x`` (B, C, H, W)."""
        return self.decide(global_pool(x))

    def decide(self, pooled: Tensor) -> GateOutput:
        """The verdict on a block input from its global pool ``pooled`` (B, C), fp32."""
        # The whole router runs in fp32 with autocast off: under bf16 autocast, fc1/fc2 would
        # round their outputs to 8 mantissa bits before any .float(), and near-tie logits then
        # decide differently from the fp32 exported model. It costs C x 128 + 128 x 2 MACs a sample.
        with autocast_off(pooled.device):
            hidden = self.dropout(F.relu(self.bn(self.fc1(pooled))))
            logits = self.fc2(hidden)  # (B, 2), fp32
        prob = logits.softmax(dim=-1)[:, 1]
        if self.force is not None:
            decision = torch.full_like(prob, 1.0 if self.force else 0.0)
        elif self.training:
            decision = self._straight_through(logits)[:, 1]
        elif self.threshold == 0.0:
            decision = (logits[:, 1] > logits[:, 0]).to(logits.dtype)
        else:
            decision = (logits[:, 1] - logits[:, 0] > self.threshold).to(logits.dtype)
        return GateOutput(logits=logits, prob=prob, decision=decision)

    @torch.no_grad()
    def bake_threshold(self) -> None:
        """Move ``threshold`` into ``fc2.bias[0]`` (the skip logit) and reset it to 0.

        logit1 - (logit0 + d) > 0 is logit1 - logit0 > d, so the plain rule on the new bias
        decides as the threshold did (up to the rounding of one fp32 addition). Only for an
        exported (inference) copy: the training-mode probabilities change with the bias.
        """
        if self.threshold != 0.0:
            self.fc2.bias[0] += self.threshold
            self.threshold = 0.0

    def _straight_through(self, logits: Tensor) -> Tensor:
        if self.noise:
            return F.gumbel_softmax(logits, tau=self.tau, hard=True)
        soft = (logits / self.tau).softmax(dim=-1)
        hard = F.one_hot(soft.argmax(dim=-1), num_classes=2).to(soft.dtype)
        return hard - soft.detach() + soft
