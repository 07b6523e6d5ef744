"""The dynamic auxiliary module (paper §3.2): an EMA teacher of the student, timm ModelEmaV3 style.

    θ^t ← m·θ^t + (1 − m)·θ^d        once per optimizer step (paper eq. 5, m ∈ [0, 1))

The teacher is a deep copy of the student that never receives gradients and is never handed to
DeepSpeed. Its parameters are kept in at least fp32: with a bf16/fp16 copy, (1 − m)·(θ^d − θ^t)
is usually below half-precision resolution and the update rounds to zero.

Call :meth:`EMATeacher.update` exactly once per optimizer step (not per micro-batch under gradient
accumulation): m is defined per step (paper m = 0.7 / 0.6 on CIFAR, official code 0.9 on
ImageNet), so calling it more often silently shortens the teacher's memory. The trainer enforces
this; the teacher only counts the calls (``num_updates``, saved with the state).

Cross-rank rule (distributed training; the trainer does the communication, docs/training.md):

- Parameters. After each optimizer step every rank holds bit-identical student parameters, and
  the update is a deterministic elementwise op, so the teacher's parameters stay bit-identical on
  all ranks without any communication.
- Buffers (BN running statistics). The student's floating buffers differ per rank (each rank
  normalises its own shard). The trainer all-reduces (averages) the student's floating buffers
  before calling :meth:`update`, so both buffer rules start from the same values everywhere.
  In ``forward_mode="train"`` the teacher's own BN layers also update their running statistics
  from each rank's batch, so its buffers drift per rank between updates:
    * ``buffers="copy"`` (default): the teacher's buffers are overwritten with the (averaged)
      student buffers at every update, which removes the drift.
    * ``buffers="ema"``: floating buffers are EMA'd like parameters (integer buffers such as
      ``num_batches_tracked`` are copied); the trainer must also average
      :meth:`EMATeacher.teacher_buffers` across ranks before :meth:`update` when the teacher
      runs in train mode.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

FORWARD_MODES = ("eval", "train")
BUFFER_RULES = ("copy", "ema")

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _upcast(t: Tensor) -> Tensor:
    # Half-precision floats → fp32; fp32/fp64 and integer tensors unchanged.
    return t.float() if t.dtype in _LOW_PRECISION else t


class EMATeacher:
    """Exponential moving average of a student module, used as the SP-Net teacher.

    Not an ``nn.Module`` on purpose: it must never be registered inside the student, reached by
    ``student.parameters()``, or switched by a parent's ``train()``/``eval()``. The copy lives in
    :attr:`module`.

    Args:
        student: the module to track (pass the plain module, e.g. ``engine.module``, not a
            DeepSpeed/DDP wrapper, so parameter names match).
        momentum: m in [0, 1); m = 0 makes the teacher a copy of the student after each update.
        forward_mode: "eval" (paper: deterministic teacher, BN running stats, no Gumbel noise) or
            "train" (official code: batch-statistics BN and Gumbel noise in the teacher).
        buffers: "copy" (teacher buffers = student buffers after each update) or "ema"
            (floating buffers EMA'd like parameters, integer buffers copied).
    """

    def __init__(
        self, student: nn.Module, momentum: float, forward_mode: str = "eval", buffers: str = "copy"
    ) -> None:
        _check_momentum(momentum)
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"teacher.forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        if buffers not in BUFFER_RULES:
            raise ValueError(f"teacher.buffers must be one of {BUFFER_RULES}, got {buffers!r}")
        self.momentum = float(momentum)
        self.forward_mode = forward_mode
        self.buffers = buffers
        self.num_updates = 0

        self.module = copy.deepcopy(student)
        # deepcopy also copies the hooks registered on the student: DeepSpeed's engine puts a
        # forward pre/post hook on its module that close over the STUDENT's engine (timers,
        # profiler, ZeRO-3 bookkeeping), so every teacher forward would run the engine's
        # prologue/epilogue. The teacher is the student's weights and structure, not its hooks.
        remove_module_hooks(self.module)
        self.module._apply(_upcast)  # what nn.Module.float() uses, but keeps fp64 as fp64
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None  # deepcopy also copies any .grad the student had
        self._param_names = [name for name, _ in self.module.named_parameters()]
        self._buffer_names = [name for name, _ in self.module.named_buffers()]
        # Matched (teacher, student) tensor lists, built at the first update and reused: the
        # per-step work is then two or three foreach kernels, no Python loop over tensors.
        self._bound_to: nn.Module | None = None
        self._lerp_pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._copy_pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._cast = False

    # ------------------------------------------------------------------------------------------
    def update(self, student: nn.Module) -> None:
        """θ^t ← m·θ^t + (1 − m)·θ^d (eq. 5), then the buffer rule. Call once per optimizer step.

        The first call (and any call with another student module) pairs the teacher's tensors
        with the student's by name and caches the lists; later calls are ``_foreach_lerp_``
        over parameters (and EMA'd buffers) plus ``_foreach_copy_`` over copied buffers.

        Args:
            student: the same plain module the teacher was built from (any dtype or device; its
                values are cast to the teacher's dtype and device before the update).
        """
        # A with-block, not a @torch.no_grad() decorator: mutmut does not mutate decorated
        # functions (docs/mutation.md), and this update is one it must reach.
        with torch.no_grad():
            if student is not self._bound_to:
                self._bind(student)
            weight = 1.0 - self.momentum
            lerp_t, lerp_s = self._lerp_pairs
            copy_t, copy_s = self._copy_pairs
            if self._cast:  # a half-precision or other-device student: cast into the teacher's dtype
                lerp_s = [s.to(device=t.device, dtype=t.dtype) for s, t in zip(lerp_s, lerp_t)]
                copy_s = [s.to(device=t.device, dtype=t.dtype) for s, t in zip(copy_s, copy_t)]
            if lerp_t:
                torch._foreach_lerp_(lerp_t, lerp_s, weight)
            if copy_t:
                torch._foreach_copy_(copy_t, copy_s)
        self.num_updates += 1

    def _bind(self, student: nn.Module) -> None:
        t_params = [p for _, p in self.module.named_parameters()]
        s_params = self._matching(student.named_parameters(), self._param_names, "parameters")
        t_bufs = [b for _, b in self.module.named_buffers()]
        s_bufs = self._matching(student.named_buffers(), self._buffer_names, "buffers")
        lerp_t, lerp_s, copy_t, copy_s = list(t_params), list(s_params), [], []
        for t, s in zip(t_bufs, s_bufs):
            if self.buffers == "ema" and t.is_floating_point():
                lerp_t.append(t)
                lerp_s.append(s)
            else:  # "copy" rule, or an integer buffer such as num_batches_tracked
                copy_t.append(t)
                copy_s.append(s)
        self._lerp_pairs, self._copy_pairs = (lerp_t, lerp_s), (copy_t, copy_s)
        self._cast = any(s.dtype != t.dtype or s.device != t.device
                         for s, t in zip(lerp_s + copy_s, lerp_t + copy_t))
        self._bound_to = student

    @staticmethod
    def _matching(named, expected_names: list[str], kind: str) -> list[Tensor]:
        # Pair student tensors with the teacher's by name, so a wrapped student ("module." prefix)
        # or a different architecture fails loudly instead of averaging the wrong tensors.
        names, tensors = [], []
        for name, t in named:
            names.append(name)
            # The tensor objects themselves, not .detach() aliases: ZeRO may re-point a
            # parameter's .data (flat buffers, checkpoint loads) and an alias would go stale.
            tensors.append(t)
        if names != expected_names:
            diff = sorted(set(names) ^ set(expected_names))[:5]
            raise ValueError(
                f"student {kind} do not match the teacher's (pass the plain module, not a "
                f"DeepSpeed/DDP wrapper); first differing names: {diff or 'same names, other order'}"
            )
        return tensors

    # ------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher under ``torch.no_grad`` in the configured mode.

        The mode is set on every call, so an ``eval()``/``train()`` done elsewhere (e.g. when
        evaluating the teacher) never leaks into training. Inputs are passed through unchanged;
        under autocast the fp32 teacher computes in the autocast dtype like the student.

        Returns:
            Whatever the module returns (an ``SPNetOutput`` for SP-Net models).
        """
        self.module.train(self.forward_mode == "train")
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def teacher_buffers(self) -> list[Tensor]:
        """The teacher's floating buffers (BN running stats), for the trainer's cross-rank all-reduce."""
        return [b for b in self.module.buffers() if b.is_floating_point()]

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Teacher weights plus the EMA state (``momentum``, ``num_updates``) for checkpoints."""
        return {
            "module": self.module.state_dict(),
            "momentum": self.momentum,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; strict on the module keys.

        The saved momentum is restored too (it is part of the teacher's state); set
        ``teacher.momentum`` afterwards to change it deliberately on resume.
        """
        missing = [k for k in ("module", "momentum", "num_updates") if k not in state]
        if missing:
            raise ValueError(f"teacher state dict lacks {missing}")
        _check_momentum(state["momentum"])
        # copy_ into the existing fp32 tensors: keeps dtype and requires_grad=False.
        self.module.load_state_dict(state["module"], strict=True)
        self.momentum = float(state["momentum"])
        self.num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        return (
            f"EMATeacher(momentum={self.momentum}, forward_mode={self.forward_mode!r}, "
            f"buffers={self.buffers!r}, num_updates={self.num_updates})"
        )


# Every per-module hook dict of nn.Module (forward, forward-with-kwargs, backward).
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
)


def remove_module_hooks(module: nn.Module) -> None:
    """Drop every forward/backward hook registered on ``module`` and its submodules (in place).

    Args:
        module: typically a fresh ``copy.deepcopy`` of a module another library hooked into.
    """
    for sub in module.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(sub, name, None)
            if hooks:
                hooks.clear()
        if getattr(sub, "_is_full_backward_hook", None) is not None:
            sub._is_full_backward_hook = None


def _check_momentum(momentum: Any) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"teacher.momentum must be in [0, 1) (paper eq. 5), got {momentum!r}")
