"""An inference execution schedule: its choices, their checks, and the one object that holds them."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch

# "masked": every block's residual computed and multiplied by its 0/1 gate (the model's own forward);
# "skip": in eval mode a block's residual branch runs only on the samples whose gate is open.
EXECUTION_MODES = ("skip", "masked")
# How "skip" runs (blocks.py): "gather", "capacity", or "auto" (capacity on CUDA, gather elsewhere).
SKIP_STRATEGIES = ("auto", "gather", "capacity")
# "auto": on the CPU the stem and the leading stages with large outputs run one image at a time.
PER_IMAGE_STAGES = ("auto", "off")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {choices}, got {value!r}")
    return value


def check_execution(mode: str) -> str:
    """``mode`` if it is one of :data:`EXECUTION_MODES`, else a one-line ``ValueError``."""
    return _check_choice("execution", mode, EXECUTION_MODES)


def check_skip_strategy(strategy: str) -> str:
    """``strategy`` if it is one of :data:`SKIP_STRATEGIES`, else a one-line ``ValueError``."""
    return _check_choice("skip_strategy", strategy, SKIP_STRATEGIES)


def check_per_image_stages(mode: str) -> str:
    """``mode`` if it is one of :data:`PER_IMAGE_STAGES`, else a one-line ``ValueError``."""
    return _check_choice("per_image_stages", mode, PER_IMAGE_STAGES)


def resolve_skip_strategy(strategy: str, device: torch.device) -> str:
    """``"auto"`` -> ``"capacity"`` on CUDA (no per-block host sync), ``"gather"`` elsewhere.

    Args:
        strategy: "auto" | "gather" | "capacity".
        device: the device of the input.
    """
    if strategy == "auto":
        return "capacity" if device.type == "cuda" else "gather"
    return check_skip_strategy(strategy)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """How an eval-mode gated ResNet runs; the defaults are the model's own masked forward.

    Attributes:
        mode: "masked" | "skip" (:data:`EXECUTION_MODES`).
        skip_strategy: how "skip" runs (:data:`SKIP_STRATEGIES`).
        per_image_stages: "auto" | "off": on the CPU, run the stem and the leading stages whose
            output holds at least ``per_image_min_bytes`` per image one image at a time.
        per_image_min_bytes: that threshold.
        capacity_rates: each block's expected execution rate r for the capacity rule
            (``blocks.skip_capacity``), in execution order; None: 1.0 for every block (capacity =
            batch: never overflows, saves nothing).
        capacity_margin: the rule's k, in binomial standard deviations.
        capacity_multiple: the rule's rounding multiple m; None: 8 on CUDA, 1 elsewhere.
    """

    mode: str = "masked"
    skip_strategy: str = "gather"
    per_image_stages: str = "off"
    per_image_min_bytes: int = 1 << 20
    capacity_rates: Optional[tuple[float, ...]] = None
    capacity_margin: float = 3.0
    capacity_multiple: Optional[int] = None

    def changed(self, num_blocks: int, *, mode: Optional[str] = None, skip_strategy: Optional[str] = None,
                per_image_stages: Optional[str] = None, per_image_min_bytes: Optional[int] = None,
                capacity_rates: Union[float, Sequence[float], None] = None, capacity_margin: Optional[float] = None,
                capacity_multiple: Optional[int] = None) -> "ExecutionPlan":
        """This plan with the given fields replaced (None keeps a field), each checked first.

        Args:
            num_blocks: gated blocks of the model (``capacity_rates`` may be one rate for all, or one per block).
        """
        changes: dict[str, object] = {}
        if mode is not None:
            changes["mode"] = check_execution(mode)
        if skip_strategy is not None:
            changes["skip_strategy"] = check_skip_strategy(skip_strategy)
        if per_image_stages is not None:
            changes["per_image_stages"] = check_per_image_stages(per_image_stages)
        if per_image_min_bytes is not None:
            if not _is_int(per_image_min_bytes) or per_image_min_bytes < 0:
                raise ValueError(f"per_image_min_bytes: must be an integer >= 0, got {per_image_min_bytes!r}")
            changes["per_image_min_bytes"] = per_image_min_bytes
        if capacity_rates is not None:
            changes["capacity_rates"] = _checked_rates(capacity_rates, num_blocks)
        if capacity_margin is not None:
            if not (math.isfinite(capacity_margin) and capacity_margin >= 0):
                raise ValueError(f"capacity_margin: must be a finite number >= 0, got {capacity_margin}")
            changes["capacity_margin"] = float(capacity_margin)
        if capacity_multiple is not None:
            if not _is_int(capacity_multiple) or capacity_multiple < 1:
                raise ValueError(f"capacity_multiple: must be an integer >= 1, got {capacity_multiple!r}")
            changes["capacity_multiple"] = capacity_multiple
        return dataclasses.replace(self, **changes)

    def rates(self, num_blocks: int) -> tuple[float, ...]:
        """Every block's expected execution rate."""
        return self.capacity_rates if self.capacity_rates is not None else (1.0,) * num_blocks

    def multiple(self, device: torch.device) -> int:
        """The capacity rounding multiple on ``device``."""
        return self.capacity_multiple or (8 if device.type == "cuda" else 1)

    def block_step(self, device: torch.device) -> str:
        """How every block of a forward on ``device`` runs: "masked", "gather" or "capacity"."""
        return "masked" if self.mode == "masked" else resolve_skip_strategy(self.skip_strategy, device)


DEFAULT_PLAN = ExecutionPlan()


def _checked_rates(rates: Union[float, Sequence[float]], num_blocks: int) -> Optional[tuple[float, ...]]:
    """The rates as a plan holds them: None when every one is 1.0 (the default)."""
    values = [float(rates)] * num_blocks if isinstance(rates, (int, float)) else [float(r) for r in rates]
    if len(values) != num_blocks:
        raise ValueError(f"capacity_rates: {len(values)} values for {num_blocks} gated blocks")
    bad = [r for r in values if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"capacity_rates: execution rates must be in [0, 1], got {bad[0]}")
    return None if all(r == 1.0 for r in values) else tuple(values)
