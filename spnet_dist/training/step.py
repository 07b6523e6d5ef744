"""One SP-Net optimisation step on a micro-batch: the engine, the EMA teacher, the criterion.

    student forward -> teacher forward (no_grad) -> criterion terms -> backward -> step
    -> [at an optimizer step] average BN buffers across ranks -> EMA teacher update

The teacher is updated exactly once per optimizer step, never per micro-batch, and never
handed to DeepSpeed: it gets no gradients and must stay bit-identical on every rank. Separate
from the data and the loop so benchmarks and tests can drive it with any batch.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .. import distributed as D
from ..device_profile import DeviceProfile, resolve_device_profile
from ..engine import build_engine, compile_student, deepspeed_config, engine_step, is_boundary
from ..execution import set_execution
from ..losses import SPNetCriterion
from ..models.resnet import GatedResNet
from ..teacher import EMATeacher

__all__ = ["SPNetStep", "clamp_gradients_"]


def clamp_gradients_(parameters: Sequence[torch.nn.Parameter], limit: float) -> None:
    """Clamp every gradient element to [-limit, limit] in place (official CIFAR code, ±0.5).

    Called after ``engine.backward`` at an accumulation boundary: with ZeRO stage 0 the
    gradients are already averaged across ranks there, so this is the code's clamp of the
    whole-batch gradient, not of one rank's share.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        torch._foreach_clamp_min_(grads, -limit)
        torch._foreach_clamp_max_(grads, limit)


class SPNetStep:
    """One SP-Net optimisation step on a micro-batch: the engine, the teacher, the criterion.

    Args:
        cfg: a validated config.
        model: the student, on ``device``, with the weights every rank starts from.
        device: where the batch goes.
        world_size: number of ranks (for the derived DeepSpeed batch sizes).
        steps_per_epoch: optimizer steps per epoch (for the LR schedule).
        profile: the rank's device-dependent answers (the trainer's); None resolves them for
            ``device`` (benchmarks, tests).
    """

    def __init__(self, cfg: Any, model: GatedResNet, device: torch.device, world_size: int,
                 steps_per_epoch: int, profile: Optional[DeviceProfile] = None) -> None:
        self.device = device
        self.profile = profile = profile or resolve_device_profile(cfg, device)
        if profile.cudnn_benchmark_now:
            # Fixed input shapes (masked execution): let cuDNN pick the fastest kernels.
            torch.backends.cudnn.benchmark = True
        # channels_last applies to the BATCHES only; the parameters stay NCHW. DeepSpeed views every
        # parameter as bytes to broadcast it (`p.data.view(torch.uint8)`, needs stride(-1) == 1),
        # ZeRO-2 copies gradients with `.view(-1)` and re-points parameters to NCHW views of its
        # flat buffer after every step. cuDNN and oneDNN pick NHWC kernels when the input is
        # channels_last (the weight is reordered inside the convolution), the activations stay NHWC,
        # and AccumulateGrad gives each weight gradient the parameter's NCHW strides (docs/training.md).
        self.memory_format = profile.memory_format
        num_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.ds_config = deepspeed_config(cfg, world_size, num_parameters=num_parameters)
        self.engine, self.optimizer, self.scheduler = build_engine(
            model, cfg.optim, cfg.schedule, self.ds_config, steps_per_epoch
        )
        self.model: GatedResNet = self.engine.module
        # Built after deepspeed.initialize: the engine broadcasts rank 0's weights, the teacher
        # copies them (without the engine's forward hooks, see EMATeacher).
        self.teacher: Optional[EMATeacher] = (
            EMATeacher(self.model, cfg.teacher.momentum, cfg.teacher.forward_mode, cfg.teacher.buffers)
            if cfg.teacher.enabled
            else None
        )
        self.teacher_execution = profile.teacher_execution
        if self.teacher is not None and cfg.teacher.forward_mode == "eval":
            # An eval-mode teacher makes hard, deterministic decisions and needs no gradient, so
            # it may really skip its closed blocks (same outputs as the masked path, tested); a
            # train-mode teacher stays the plain model and runs the masked path like the student.
            set_execution(self.teacher.module, self.teacher_execution)
        if profile.compile:
            # After the teacher copy: the teacher stays eager (its skip path has data-dependent
            # shapes), and evaluation runs the student eagerly (spnet_dist.evaluate).
            compile_student(self.engine, profile.compile_backend)
        self.criterion = SPNetCriterion.from_config(cfg.loss, teacher_enabled=cfg.teacher.enabled)
        self.grad_clamp = cfg.loss.grad_clamp
        self.autocast = profile.autocast()
        self.skipped_steps = 0  # optimizer steps DeepSpeed skipped (fp16 overflow)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        """Forward, backward and (at an accumulation boundary) the optimizer and teacher steps.

        Returns the detached loss terms and whether an optimizer step was APPLIED: False
        between accumulation boundaries and for a boundary whose fp16 step DeepSpeed skipped on
        overflow (then neither the teacher nor the step count moves, and the LR did not step).
        """
        # non_blocking: from the loader's pinned memory the copy overlaps with queued GPU work. The
        # loaders emit the profile's layout, so this is the host-to-device copy alone (one memcpy)
        # or, for a batch already on the device in that layout, no copy at all.
        images = images.to(self.device, memory_format=self.memory_format, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        student = self.engine(images)  # DeepSpeed applies its torch_autocast section here
        teacher = None
        if self.teacher is not None:
            with self.autocast:
                teacher = self.teacher(images)
        terms = self.criterion(student, targets, teacher)
        self.engine.backward(terms["total"])
        if self.grad_clamp is not None and is_boundary(self.engine):
            clamp_gradients_(list(self.model.parameters()), self.grad_clamp)
        boundary = engine_step(self.engine)
        # DeepSpeed's own signal (a Python bool: ZeRO 1/2 already synced for their overflow check).
        applied = boundary and self.engine.was_step_applied()
        if boundary and not applied:
            self.skipped_steps += 1
        if applied:
            self._after_optimizer_step()
        return {k: v.detach() for k, v in terms.items()}, applied

    def _after_optimizer_step(self) -> None:
        # DeepSpeed syncs parameters, never BN buffers: average them so the student is the
        # same network on every rank and the teacher (which copies/EMAs them) stays identical.
        # Running statistics update linearly, so averaging every step equals averaging once.
        D.average_buffers_(self.model)
        if self.teacher is not None:
            self.teacher.update(self.model)
            if self.teacher.buffers == "ema":
                # A train-mode teacher forward moved its own BN statistics on local data.
                D.all_reduce_mean_(self.teacher.teacher_buffers())
