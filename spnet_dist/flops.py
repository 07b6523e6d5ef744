"""Multiply-accumulate counts of a gated ResNet: static parts measured once, dynamic per sample.

Each part (stem, every block's residual branch, shortcut projection and router, the final
head) is measured once with ``torch.utils.flop_counter.FlopCounterMode`` on a single image of
the given size. FlopCounterMode counts convolutions and matrix products as 2 FLOPs per MAC
and ignores BatchNorm, ReLU, pooling and additions, the same convention as torchvision's
published "GFLOPS" (which are GMACs: ResNet-50 = 4.09).

Units: :class:`MacProfile` reports plain MACs. The SP-Net paper's "GMACCs" are 2 x MACs
(its static ResNet-110 "0.51" is 0.253 GMACs; its ResNet-50 "7.72" is 2 x 3.86 GMACs of
ResNet-50 v1); :func:`paper_units` converts, and every report says which unit it uses.

Dynamic cost of one sample = stem + all shortcut projections + all routers (a router must run
to decide) + final head + sum over blocks of u_n x residual_n. The training-only stage heads
are not part of the inference network and are never counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from .models.resnet import GatedResNet


def _macs(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2  # FlopCounterMode counts a MAC as 2 FLOPs


@dataclass(frozen=True)
class MacProfile:
    """Per-part MACs of one sample at a fixed input size.

    Attributes:
        stem: stem convolutions.
        residual: (N,) residual branch of every gated block.
        shortcut: (N,) shortcut projections (0 for identity and option-A shortcuts).
        router: (N,) routers.
        head: final classifier.
        input_size: (H, W) the profile was measured at.
    """

    stem: int
    residual: tuple[int, ...]
    shortcut: tuple[int, ...]
    router: tuple[int, ...]
    head: int
    input_size: tuple[int, int]

    @property
    def fixed(self) -> int:
        """MACs every sample pays whatever its gates decide."""
        return self.stem + sum(self.shortcut) + sum(self.router) + self.head

    @property
    def router_total(self) -> int:
        return sum(self.router)

    def static(self, include_routers: bool = True) -> int:
        """All blocks executed: the static ResNet (+ router overhead if asked)."""
        total = self.fixed + sum(self.residual)
        return total if include_routers else total - self.router_total

    @cached_property
    def _residual_on(self) -> dict[torch.device, Tensor]:
        return {}  # not a field: equality, repr and the exported config ignore it

    def residual_tensor(self, device: torch.device) -> Tensor:
        """(N,) float64 residual MACs on ``device``, built once per device.

        Not per batch: a tensor built from a Python tuple on CUDA is a blocking host-to-device
        copy. Every value is an integer below 2**53, exact in float64.
        """
        cache = self._residual_on
        if device not in cache:
            cache[device] = torch.tensor(self.residual, dtype=torch.float64, device=device)
        return cache[device]

    def dynamic(self, decisions: Tensor) -> Tensor:
        """(B,) MACs of each sample from its (B, N) 0/1 gate decisions, on their device (no host sync)."""
        return self.fixed + decisions.detach().to(torch.float64) @ self.residual_tensor(decisions.device)

    def mean_from_counts(self, executed: Tensor, num_samples: int) -> float:
        """Mean MACs per sample from integer per-block execution counts over ``num_samples``.

        Exact sums of integers make the result independent of how samples were split across
        ranks (the 1-rank and 2-rank evaluations agree to the last bit).
        """
        executed_macs = sum(int(c) * r for c, r in zip(executed.tolist(), self.residual))
        return self.fixed + executed_macs / num_samples


class PerImageMacs:
    """The dynamic MACs of every image of an evaluation, kept on the device until the end.

    ``add`` runs per batch without a host sync (no ``.tolist()``, no tensor from Python values);
    ``values`` reads them all once.
    """

    def __init__(self, profile: MacProfile) -> None:
        self.profile = profile
        self._parts: list[Tensor] = []

    def add(self, decisions: Tensor) -> None:
        """Record a batch's (B, N) gate decisions."""
        self._parts.append(self.profile.dynamic(decisions))  # (B,) float64 on the decisions' device

    def values(self) -> list[float]:
        """Every image's MACs, in the order added (one device-to-host copy)."""
        if not self._parts:
            return []
        return torch.cat(self._parts).tolist()


def paper_units(macs: float) -> float:
    """The paper's "GMACCs" (2 x MACs, in billions) from plain MACs."""
    return 2.0 * macs / 1e9


@torch.no_grad()
def profile_macs(model: GatedResNet, input_size: tuple[int, int]) -> MacProfile:
    """Measure every part of ``model`` once on a single (1, C, H, W) zero image.

    The model's mode, gate overrides and parameters are left as they were.
    """
    was_training = model.training
    saved_force = [block.router.force for block in model.gated_blocks()]
    model.eval()
    try:
        x = torch.zeros(1, model.in_chans, *input_size, device=next(model.parameters()).device)
        stem = _macs(model.forward_stem, x)
        x = model.forward_stem(x)
        residual, shortcut, router = [], [], []
        for block in model.gated_blocks():
            residual.append(_macs(block.residual, x))
            shortcut.append(_macs(block.shortcut, x))
            router.append(_macs(block.router, x))
            x = block.shortcut(x) + block.residual(x)  # every block open: full-size activations
        head = _macs(model.forward_head, x)
    finally:
        model.train(was_training)
        for block, force in zip(model.gated_blocks(), saved_force):
            block.router.force = force
    return MacProfile(stem, tuple(residual), tuple(shortcut), tuple(router), head, tuple(input_size))
