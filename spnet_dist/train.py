"""spnet-train: the SP-Net training job, the same code on a laptop CPU and on 64 GPUs.

Read top to bottom: config -> distributed -> data -> model -> engine (DeepSpeed) -> teacher ->
loop (train step, evaluation, metrics). One optimizer step of SP-Net is

    student forward -> teacher forward (no_grad) -> criterion terms -> backward -> step
    -> [at an optimizer step] average BN buffers across ranks -> EMA teacher update

The teacher is updated exactly once per optimizer step, never per micro-batch, and never
handed to DeepSpeed: it gets no gradients and must stay bit-identical on every rank.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from . import distributed as D
from .config import Config, deepspeed_config, micro_batch_size, parse_args, save_config
from .data import build_datasets, build_loaders  # build_datasets: re-exported for tests and tools
from .engine import autocast_context, build_engine, engine_step, is_boundary
from .evaluate import evaluate
from .flops import profile_macs
from .losses import SPNetCriterion, needs_aux_heads, needs_block_features
from .models import create_model, load_torchvision_weights
from .models.resnet import GatedResNet
from .run_log import RunLogger, results_table
from .teacher import EMATeacher


@dataclass
class TrainState:
    """All counters in one place (checkpoints will save exactly this)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def build_model(cfg: Config) -> GatedResNet:
    """The student as the config describes it (block aligners only if L_evo needs them)."""
    model = create_model(
        cfg.model.name,
        num_classes=cfg.model.num_classes,
        router_hidden=cfg.model.router_hidden,
        router_dropout=cfg.model.router_dropout,
        router_bias=cfg.model.router_bias,
        gumbel_tau=cfg.model.gumbel_tau,
        gumbel_noise=cfg.model.gumbel_noise,
        aux_heads=needs_aux_heads(cfg.loss.stage_heads, cfg.loss.gamma, cfg.loss.evo_strategy),
        block_align=needs_block_features(cfg.loss.gamma, cfg.loss.evo_strategy),
    )
    if cfg.model.torchvision_weights:
        load_torchvision_weights(model, cfg.model.torchvision_weights)
    return model


class SPNetStep:
    """One SP-Net optimisation step on a micro-batch: the engine, the teacher, the criterion.

    Separate from the data and the loop so benchmarks and tests can drive it with any batch.

    Args:
        cfg: a validated config.
        model: the student, on ``device``, with the weights every rank starts from.
        device: where the batch goes.
        world_size: number of ranks (for the derived DeepSpeed batch sizes).
        steps_per_epoch: optimizer steps per epoch (for the LR schedule).
    """

    def __init__(self, cfg: Config, model: GatedResNet, device: torch.device, world_size: int,
                 steps_per_epoch: int) -> None:
        self.device = device
        self.engine, self.optimizer, self.scheduler = build_engine(
            model, cfg.optim, cfg.schedule, deepspeed_config(cfg, world_size), steps_per_epoch
        )
        self.model: GatedResNet = self.engine.module
        # Built after deepspeed.initialize: the engine broadcasts rank 0's weights, the teacher copies them.
        self.teacher: Optional[EMATeacher] = (
            EMATeacher(self.model, cfg.teacher.momentum, cfg.teacher.forward_mode, cfg.teacher.buffers)
            if cfg.teacher.enabled
            else None
        )
        if self.teacher is not None:
            # An eval-mode teacher makes hard, deterministic decisions and needs no gradient, so
            # it can really skip its closed blocks (same outputs as the masked path, tested);
            # a train-mode teacher runs the masked path like the student.
            self.teacher.module.set_execution("skip")
        self.criterion = SPNetCriterion.from_config(cfg.loss, teacher_enabled=cfg.teacher.enabled)
        self.grad_clamp = cfg.loss.grad_clamp
        self.autocast = autocast_context(cfg.engine.precision, device.type)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        """Forward, backward and (at an accumulation boundary) the optimizer and teacher steps.

        Returns the detached loss terms and whether an optimizer step happened.
        """
        images = images.to(self.device, non_blocking=True)
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
        stepped = engine_step(self.engine)
        if stepped:
            self._after_optimizer_step()
        return {k: v.detach() for k, v in terms.items()}, stepped

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


class Trainer:
    """Owns the data, the SP-Net step and the run directory of one training job.

    Args:
        cfg: a validated config.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # ============ distributed ... ============
        self.dist = D.init_distributed(cfg.engine.backend)
        self.device = self.dist.device
        out_dir = Path(cfg.run.out_dir)
        # Never mix two runs in one directory: every rank looks before rank 0 writes anything.
        previous = [name for name in ("config.yaml", "metrics.jsonl") if (out_dir / name).exists()]
        D.barrier()
        if previous:
            raise FileExistsError(
                f"run.out_dir: {out_dir} already holds a run ({', '.join(previous)}); "
                "choose another run.out_dir or remove that directory"
            )
        if self.dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out_dir / "config.yaml")
        self.log = RunLogger(out_dir, self.dist.is_main, cfg.run.progress, cfg.run.tensorboard)

        # ============ data: rank 0 prepares and scans, the others read its file list ============
        micro = micro_batch_size(cfg, self.dist.world_size)
        self.train_loader, self.val_loader = build_loaders(
            cfg.data, micro, self.dist.rank, self.dist.world_size, cfg.run.seed, device=self.device,
            channels_last=getattr(cfg.engine, "channels_last", False), listing_path=out_dir / "data_files.json",
        )
        self.steps_per_epoch = len(self.train_loader) // cfg.engine.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data: {len(self.train_loader)} micro-batches per rank per epoch is fewer than "
                f"engine.grad_accum={cfg.engine.grad_accum}; use a smaller engine.global_batch_size"
            )

        # ============ model, engine, teacher, criterion ============
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        model = build_model(cfg)
        if cfg.model.sync_bn:
            if self.device.type != "cuda":
                raise ValueError("model.sync_bn: SyncBatchNorm needs CUDA devices; set it to false on CPU")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.step_fn = SPNetStep(cfg, model.to(self.device), self.device, self.dist.world_size, self.steps_per_epoch)
        self.model = self.step_fn.model
        self.engine, self.teacher, self.scheduler = self.step_fn.engine, self.step_fn.teacher, self.step_fn.scheduler
        size = cfg.data.image_size
        self.mac_profile = profile_macs(self.model, (size, size))
        # Gumbel noise and dropout differ per rank (different samples anyway), reproducibly.
        seed_everything(cfg.run.seed + 1000 * (self.dist.rank + 1))
        self.state = TrainState()

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        terms, stepped = self.step_fn(images, targets)
        self.state.step += stepped
        return terms, stepped

    # ------------------------------------------------------------------ loops
    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        self.train_loader.set_epoch(epoch)
        self.log.start_epoch(epoch, self.steps_per_epoch)
        sums: dict[str, torch.Tensor] = {}
        micro_batches, images_seen = 0, 0
        start = time.perf_counter()
        limit = self.steps_per_epoch * cfg.engine.grad_accum  # a partial accumulation never spills over
        for i, (images, targets) in enumerate(self.train_loader):
            if i >= limit or self._done():
                break
            terms, stepped = self.train_step(images, targets)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            micro_batches += 1
            images_seen += images.shape[0]
            if stepped:
                log_now = self.state.step % cfg.run.log_every == 0
                shown = {k: float(v) for k, v in terms.items()} if log_now else {}
                self.log.step(self.state.step, epoch, shown, self.scheduler.get_last_lr()[0], log_now)
        self.log.end_epoch()
        elapsed = time.perf_counter() - start
        # Epoch means of every term and global throughput, averaged over ranks.
        keys = sorted(sums)
        packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in keys] +
                             [torch.tensor(float(micro_batches), dtype=torch.float64),
                              torch.tensor(float(images_seen), dtype=torch.float64)]).to(self.device)
        D.all_reduce_mean_([packed])
        n = max(packed[-2].item(), 1.0)
        world = self.dist.world_size
        means = {k: packed[i].item() / n for i, k in enumerate(keys)}
        means["images_per_sec"] = packed[-1].item() * world / max(elapsed, 1e-9)
        return means

    def _done(self) -> bool:
        return self.cfg.run.max_steps is not None and self.state.step >= self.cfg.run.max_steps

    def evaluate(self) -> dict[str, Any]:
        # BN buffers are already identical across ranks: averaged after every optimizer step.
        return evaluate(self.model, self.val_loader, self.mac_profile, self.device, self.step_fn.autocast)

    def fit(self) -> dict[str, Any]:
        """Train for ``schedule.epochs`` (or ``run.max_steps``) and return the last evaluation."""
        cfg = self.cfg
        self.log.print(
            f"SP-Net {cfg.model.name}: {self.model.num_blocks} gated blocks, world size {self.dist.world_size}, "
            f"micro-batch {micro_batch_size(cfg, self.dist.world_size)} x accumulation {cfg.engine.grad_accum}, "
            f"{self.steps_per_epoch} optimizer steps/epoch, static {self.mac_profile.static() / 1e9:.4f} GMACs"
        )
        record: dict[str, Any] = {}
        for epoch in range(self.state.epoch, cfg.schedule.epochs):
            train_means = self.train_epoch(epoch)
            self.state.epoch = epoch + 1
            last = self.state.epoch == cfg.schedule.epochs or self._done()
            if last or self.state.epoch % cfg.run.eval_every == 0:
                record = {"epoch": self.state.epoch, "step": self.state.step, **self.evaluate(),
                          "loss": {k: v for k, v in train_means.items() if k != "images_per_sec"},
                          "images_per_sec": train_means["images_per_sec"],
                          "lr": self.scheduler.get_last_lr()[0]}
                self.log.metrics(record)
                self.log.print(
                    f"epoch {record['epoch']} step {record['step']}: top-1 {record['top1']:.2f} %, "
                    f"{record['gmacs']:.4f} GMACs ({record['mac_ratio']:.3f} of static), "
                    f"exec rate {record['exec_rate']:.3f}, loss {train_means.get('total', math.nan):.4f}, "
                    f"{train_means['images_per_sec']:.0f} img/s"
                )
            if self._done():
                break
        if record:
            self.log.print("\nResults (final evaluation of the dynamic network, closed blocks skipped)\n"
                           + results_table(record))
        self.log.close()
        return record


def main(cfg: Config) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the final evaluation record."""
    return Trainer(cfg).fit()


def cli(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_args(argv, description="Train an SP-Net dynamic-inference ResNet (DeepSpeed, CPU or GPU).")
    try:
        main(cfg)
    finally:
        D.destroy()  # an orderly shutdown of the process group (NCCL warns otherwise)


if __name__ == "__main__":
    cli()
