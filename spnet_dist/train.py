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
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import checkpoint as C
from . import distributed as D
from .checkpoint import CheckpointError, ResumeMismatch, TrainState
from .run_dir import RunDirectory
from .training.reproducibility import seed_everything, set_deterministic
from .training.signals import EXIT_DIVERGED, EXIT_PREEMPTED, Preempted, StopSignals, TrainingDiverged
from .config import Config, deepspeed_config, micro_batch_size, parse_args, save_config, to_dict
from .data import build_datasets, build_loaders  # build_datasets: re-exported for tests and tools
from .engine import autocast_context, build_engine, engine_step, is_boundary
from .evaluate import evaluate
from .flops import profile_macs
from .losses import SPNetCriterion, needs_aux_heads, needs_block_features
from .models import create_model, load_torchvision_weights
from .models.resnet import GatedResNet
from .run_log import RunLogger, results_table
from .teacher import EMATeacher


__all__ = ["TrainState", "SPNetStep", "Trainer", "Preempted", "TrainingDiverged", "main", "cli"]


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


def resolve_teacher_execution(choice: str, device: torch.device) -> str:
    """``teacher.execution`` -> "masked" or "skip" ("auto": masked on CUDA, skip elsewhere).

    The skip path calls ``nonzero()`` in every block (a host-device sync each, 16 per step on
    ResNet-50) and gives every block a batch of a different size, which defeats
    ``cudnn.benchmark``, CUDA graphs and ``torch.compile``; on a GPU the few MACs it saves
    cost more than they save. On a CPU there is no device to wait for and MACs are time.

    Args:
        choice: "auto" | "masked" | "skip".
        device: the training device.
    """
    if choice == "auto":
        return "masked" if device.type == "cuda" else "skip"
    if choice not in ("masked", "skip"):
        raise ValueError(f"teacher.execution must be 'auto', 'masked' or 'skip', got {choice!r}")
    return choice


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    """``engine.channels_last`` resolved: null means on for CUDA (tensor-core convolutions), off on CPU."""
    return device.type == "cuda" if cfg.engine.channels_last is None else cfg.engine.channels_last


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
        if device.type == "cuda":
            # Fixed input shapes (masked execution): let cuDNN pick the fastest kernels, unless
            # the run asked for deterministic algorithms.
            torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
        self.memory_format = torch.channels_last if use_channels_last(cfg, device) else torch.contiguous_format
        model = model.to(memory_format=self.memory_format)
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
        self.teacher_execution = resolve_teacher_execution(cfg.teacher.execution, device)
        if self.teacher is not None:
            # An eval-mode teacher makes hard, deterministic decisions and needs no gradient, so
            # it may really skip its closed blocks (same outputs as the masked path, tested); a
            # train-mode teacher always runs the masked path like the student.
            self.teacher.module.set_execution(self.teacher_execution)
        if cfg.engine.compile:
            # After the teacher copy: the teacher stays eager (its skip path has data-dependent
            # shapes). DeepSpeed's engine.compile() compiles the module's forward in place.
            self.engine.compile()
        self.criterion = SPNetCriterion.from_config(cfg.loss, teacher_enabled=cfg.teacher.enabled)
        self.grad_clamp = cfg.loss.grad_clamp
        self.autocast = autocast_context(cfg.engine.precision, device.type)
        self.skipped_steps = 0  # optimizer steps DeepSpeed skipped (fp16 overflow)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        """Forward, backward and (at an accumulation boundary) the optimizer and teacher steps.

        Returns the detached loss terms and whether an optimizer step was APPLIED: False
        between accumulation boundaries and for a boundary whose fp16 step DeepSpeed skipped on
        overflow (then neither the teacher nor the step count moves, and the LR did not step).
        """
        # non_blocking: from the loader's pinned memory the copy overlaps with queued GPU work.
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


def pack_epoch_sums(sums: dict[str, torch.Tensor], micro_batches: int, images: int,
                    device: torch.device) -> tuple[list[str], torch.Tensor]:
    """The epoch's loss sums and counters as one float64 tensor ON ``device`` (for one all-reduce).

    Every piece is created on ``device`` before stacking: ``torch.stack`` refuses to mix a CUDA
    loss sum with a CPU counter (the epoch-end crash every GPU run would have hit).

    Args:
        sums: per-term sums of the detached losses (tensors on the training device).
        micro_batches: micro-batches this rank ran.
        images: images this rank saw.
        device: the training device.

    Returns:
        ``(keys, packed)``: sorted term names and ``[sum_k for k in keys] + [micro_batches, images]``.
    """
    keys = sorted(sums)
    parts = [torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys]
    parts += [torch.full((), float(micro_batches), dtype=torch.float64, device=device),
              torch.full((), float(images), dtype=torch.float64, device=device)]
    return keys, torch.stack(parts)


def reduce_epoch_means(sums: dict[str, torch.Tensor], micro_batches: int, images: int, elapsed: float,
                       device: torch.device) -> dict[str, float]:
    """Epoch means of every loss term and the global images/s, averaged over ranks.

    Args:
        sums, micro_batches, images, device: see :func:`pack_epoch_sums`.
        elapsed: wall seconds of this rank's epoch.
    """
    keys, packed = pack_epoch_sums(sums, micro_batches, images, device)
    D.all_reduce_mean_([packed])
    values = packed.tolist()  # one host sync for everything
    n = max(values[-2], 1.0)
    means = {k: values[i] / n for i, k in enumerate(keys)}
    means["images_per_sec"] = values[-1] * D.get_world_size() / max(elapsed, 1e-9)
    return means


class IntervalMeter:
    """Throughput of the last logging interval: images/s, fraction of time waiting for data, ETA.

    Args:
        start: ``time.perf_counter()`` at the start of the epoch.
    """

    def __init__(self, start: float) -> None:
        self.start, self.images, self.steps, self.wait = start, 0, 0, 0.0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def add(self, images: int, stepped: bool) -> None:
        self.images += images
        self.steps += int(stepped)

    def report(self, now: float, world_size: int, steps_left: int) -> dict[str, float]:
        """The interval's figures (global images/s), then start a new interval at ``now``."""
        elapsed = max(now - self.start, 1e-9)
        speed = {"images_per_sec": self.images * world_size / elapsed, "data_wait": self.wait / elapsed,
                 "eta_s": steps_left * elapsed / max(self.steps, 1)}
        self.start, self.images, self.steps, self.wait = now, 0, 0, 0.0
        return speed


class Trainer:
    """Owns the data, the SP-Net step and the run directory of one training job.

    Args:
        cfg: a validated config.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._undo_deterministic = set_deterministic(cfg.run.deterministic)  # before any CUDA/cuBLAS call
        try:
            self._set_up()
        except BaseException:
            self._undo_deterministic()  # a failed set-up leaves the process as it found it
            raise

    def _set_up(self) -> None:
        cfg = self.cfg
        # ============ distributed ... ============
        # A collective that waits longer than engine.timeout_min (a rank died or hangs) raises,
        # so the job ends and can be requeued instead of holding its nodes until the time limit.
        self.dist = D.init_distributed(cfg.engine.backend, timeout=timedelta(minutes=cfg.engine.timeout_min))
        self.device = self.dist.device
        self.out_dir = out_dir = Path(cfg.run.out_dir)
        self.run_dir = RunDirectory(out_dir)
        self.ckpt_dir = self.run_dir.checkpoints
        # ============ run directory: a fresh run, or resume (rank 0 decides, every rank obeys) ============
        self.resume_from = self._plan_run_directory()
        self.log = RunLogger(self.run_dir, self.dist.is_main, cfg.run.progress, cfg.run.tensorboard,
                             purge_step=self._restart_step)

        # ============ data: rank 0 prepares and scans, the others read its file list ============
        micro = micro_batch_size(cfg, self.dist.world_size)
        self.train_loader, self.val_loader = build_loaders(
            cfg.data, micro, self.dist.rank, self.dist.world_size, cfg.run.seed, device=self.device,
            channels_last=getattr(cfg.engine, "channels_last", False), listing_path=self.run_dir.data_files,
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
        self.signals = StopSignals()
        # Device-side count of non-finite losses since the last check: no host sync per step.
        self._bad = torch.zeros((), dtype=torch.int64, device=self.device)
        self._epoch_sums: Optional[dict[str, Any]] = None  # a resumed epoch's running sums
        self._last_tag: Optional[str] = None
        self._new_bad = 0  # non-finite losses found by the last agreement (blocks saving)
        if self.resume_from is not None:
            self._restore(self.resume_from)

    # ------------------------------------------------------------------ run directory / resume
    def _plan_run_directory(self) -> Optional[Path]:
        """Fresh start or resume per ``run.resume``; rank 0 decides and writes, all ranks agree.

        Errors (an existing run with ``never``, unsafe config differences, a bad explicit
        checkpoint) are raised on every rank, before any file is written.
        """
        cfg, out_dir = self.cfg, self.out_dir
        plan, error = None, None
        self._restart_step: Optional[int] = None  # first step this attempt logs again (rank 0 decides)
        if self.dist.is_main:
            try:
                plan = C.plan_resume(out_dir, cfg.run.resume, to_dict(cfg))
            except (FileExistsError, ResumeMismatch, CheckpointError) as err:
                error = err
        plan, error = D.broadcast_object((plan, error))
        if error is not None:
            raise error
        if self.dist.is_main:
            for note in plan.notes:
                print(f"warning: {note}", file=sys.stderr, flush=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in C.remove_leftovers(self.ckpt_dir):
                print(f"removed {self.ckpt_dir / name} (a checkpoint save that was interrupted)", flush=True)
            # Records a resumed run will write again (evaluated after the checkpoint was sealed).
            saved = C.read_state(plan.checkpoint)["train_state"] if plan.checkpoint else {"epoch": 0, "step": 0}
            self.run_dir.truncate_metrics(saved["epoch"], saved["step"])
            # Everything logged up to the checkpoint's step stands (its evaluation included: the
            # epoch-end checkpoint is sealed after it); later events are about to be logged again.
            self._restart_step = saved["step"] + 1 if plan.existing or plan.checkpoint else None
            save_config(self.cfg, self.run_dir.config)  # the resolved config of this attempt
            if plan.checkpoint is not None:
                print(f"resuming from {plan.checkpoint}", flush=True)
            elif plan.existing:
                print(f"{out_dir} holds a run without a checkpoint: starting it again from step 0", flush=True)
        D.barrier()
        return plan.checkpoint

    def _restore(self, path: Path) -> None:
        """Load engine, teacher, counters, RNG and loader position from checkpoint ``path``."""
        # The newest good checkpoint until this attempt saves one: `final` points to it if a
        # preempted attempt had saved the last step but stopped before pointing `final`.
        self._last_tag = Path(path).resolve().name  # a step directory, never an alias
        rank, world = self.dist.rank, self.dist.world_size
        snap = C.load_snapshot(path, self.engine, rank=rank, world_size=world, device=self.device)
        self.state = snap.state
        if self.teacher is not None:
            self.teacher.load_state_dict({"module": snap.teacher.weights, "momentum": snap.teacher.momentum,
                                          "num_updates": snap.teacher.num_updates})
        if snap.rank.rng is not None:
            C.restore_rng(snap.rank.rng, self.device)
        else:  # another world size: a fresh per-rank seed derived from the step
            seed_everything(self.cfg.run.seed + 1000 * (rank + 1) + 7919 * self.state.step)
        self.train_loader.load_state_dict(snap.rank.loader)
        # The loader's position is the truth for the current epoch (a world-size change converts
        # it through the global sample count, see TrainLoader.load_state_dict).
        position = self.train_loader.state_dict()
        self.state.batch_in_epoch = position["batches_seen"] if position["epoch"] == self.state.epoch else 0
        if self.state.batch_in_epoch:
            sums = snap.rank.epoch_sums
            self._epoch_sums = {"terms": sums.terms, "micro_batches": sums.micro_batches, "images": sums.images,
                                "seconds": sums.seconds}
        threads = snap.num_threads
        if self.cfg.run.deterministic and threads not in (None, torch.get_num_threads()):
            self.log.print(f"warning: the checkpoint was written with {threads} intra-op threads, this "
                           f"run uses {torch.get_num_threads()}: CPU results may differ in the last bits")
        same_world = snap.world_size == world
        self.log.print(f"resumed from {path.name}: epoch {self.state.epoch}, step {self.state.step}, "
                       f"micro-batch {self.state.batch_in_epoch} of the epoch"
                       + ("" if same_world else f" (world size {snap.world_size} -> {world}: "
                          + ("optimizer state kept" if snap.optimizer_loaded else "SGD momentum restarts from zero") + ")"))

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        terms, stepped = self.step_fn(images, targets)
        self.state.step += stepped
        return terms, stepped

    # ------------------------------------------------------------------ loops
    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        self.train_loader.set_epoch(epoch)  # keeps a resumed position inside this epoch
        self.log.start_epoch(epoch, self.steps_per_epoch)
        # Running sums of this epoch (restored mid-epoch on resume, so the record is the same).
        resumed, self._epoch_sums = self._epoch_sums or {}, None
        sums: dict[str, torch.Tensor] = {k: torch.tensor(v, dtype=torch.float32, device=self.device)
                                         for k, v in resumed.get("terms", {}).items()}
        counts = self._epoch_counts = {"micro_batches": resumed.get("micro_batches", 0),
                                       "images": resumed.get("images", 0)}
        self._epoch_term_sums = sums
        start = self._epoch_start = time.perf_counter() - resumed.get("seconds", 0.0)
        meter = IntervalMeter(time.perf_counter())
        limit = self.steps_per_epoch * cfg.engine.grad_accum  # a partial accumulation never spills over
        batches = iter(self.train_loader)
        # Checked BEFORE a batch is drawn: a batch drawn and not trained on would still count as
        # read in the loader's position, and a resume from that position would skip it.
        while self.state.batch_in_epoch < limit and not self._done():
            wait_start = time.perf_counter()
            try:
                images, targets = next(batches)
            except StopIteration:
                break
            meter.waited(time.perf_counter() - wait_start)
            terms, stepped = self.train_step(images, targets)
            self.state.batch_in_epoch += 1
            # Counted on the device; read at the next agreed check, never per step.
            self._bad += ~torch.isfinite(terms["total"])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            counts["micro_batches"] += 1
            counts["images"] += images.shape[0]
            meter.add(images.shape[0], stepped)
            if stepped:
                log_now = self.state.step % cfg.run.log_every == 0
                # The float() calls are the step's only host syncs, once per logging interval.
                shown = {k: float(v) for k, v in terms.items()} if log_now else {}
                speed = meter.report(time.perf_counter(), self.dist.world_size,
                                     self._steps_left()) if log_now else None
                self.log.step(self.state.step, epoch, shown, self.scheduler.get_last_lr()[0], log_now, speed)
                self._maybe_checkpoint(last_of_epoch=self.state.batch_in_epoch >= limit)
        self.log.end_epoch()
        elapsed = time.perf_counter() - start
        return reduce_epoch_means(sums, counts["micro_batches"], counts["images"], elapsed, self.device)

    def _steps_left(self) -> int:
        total = self.cfg.schedule.epochs * self.steps_per_epoch
        if self.cfg.run.max_steps is not None:
            total = min(total, self.cfg.run.max_steps)
        return max(total - self.state.step, 0)

    def _done(self) -> bool:
        return self.cfg.run.max_steps is not None and self.state.step >= self.cfg.run.max_steps

    # ------------------------------------------------------------------ checkpoints, signals, bad steps
    def _agree(self) -> tuple[int, int]:
        """Every rank: one all-reduce of (SIGUSR2 seen, SIGTERM seen, new bad steps) and one host
        sync. Called at agreed step boundaries only (every ``run.stop_check_every`` optimizer
        steps, before a checkpoint, at epoch ends), so every rank stops at the same step.

        Returns ``(signal to stop on or 0, bad steps so far)``.
        """
        requested = self.signals.requested
        flags = torch.stack([torch.tensor(int(requested == signal.SIGUSR2), device=self.device),
                             torch.tensor(int(requested == signal.SIGTERM), device=self.device),
                             self._bad.clone()])
        if torch.distributed.is_initialized() and self.dist.world_size > 1:
            torch.distributed.all_reduce(flags)
        usr2, term, bad = flags.tolist()
        self._bad.zero_()
        self._new_bad = bad
        self.state.bad_steps += bad
        if self.state.bad_steps > self.cfg.run.max_bad_steps:
            raise TrainingDiverged(
                f"{self.state.bad_steps} steps with a non-finite loss (run.max_bad_steps="
                f"{self.cfg.run.max_bad_steps}) by step {self.state.step}; the last good checkpoint "
                f"is {self._last_tag or 'none'}")
        return (signal.SIGTERM if term else signal.SIGUSR2 if usr2 else 0), self.state.bad_steps

    def _maybe_checkpoint(self, last_of_epoch: bool) -> None:
        """After an optimizer step: agree on stop/bad steps when due, save when due or stopping."""
        run, step = self.cfg.run, self.state.step
        ckpt_due = run.checkpoint_every > 0 and step % run.checkpoint_every == 0 and not last_of_epoch
        if not (ckpt_due or step % run.stop_check_every == 0):
            return  # the epoch end checks and saves (after the evaluation)
        stop, _ = self._agree()
        if stop or ckpt_due:
            path = self.save_checkpoint()
            if stop:
                raise Preempted(stop, path)

    def save_checkpoint(self, record: Optional[dict[str, Any]] = None) -> Optional[Path]:
        """Save ``checkpoints/step_<step>`` on every rank (all ranks call it: it has barriers).

        Not written when non-finite losses occurred since the last check (the weights may be
        corrupt): the previous checkpoint stays the newest. Returns the directory or None.

        Args:
            record: the evaluation just made at this step, if any (updates ``best``).
        """
        if getattr(self, "_new_bad", 0):
            self.log.print(f"warning: step {self.state.step}: non-finite losses since the last check; "
                           "no checkpoint written")
            return None
        tag = C.step_tag(self.state.step)
        is_best = record is not None and (self.state.best_top1 is None or record["top1"] > self.state.best_top1)
        if is_best:
            self.state.best_top1, self.state.best_tag = record["top1"], tag
        mid_epoch = self.state.batch_in_epoch > 0  # else the epoch's sums were already reduced
        sums = C.EpochSums(terms={k: float(v) for k, v in self._epoch_term_sums.items()}, **self._epoch_counts,
                           seconds=time.perf_counter() - self._epoch_start) if mid_epoch else None
        teacher = None if self.teacher is None else C.TeacherState(
            weights=self.teacher.module.state_dict(), momentum=self.teacher.momentum,
            num_updates=self.teacher.num_updates)
        snapshot = C.Snapshot(
            state=self.state,
            rank=C.RankState(rng=C.capture_rng(self.device), loader=self.train_loader.state_dict(), epoch_sums=sums),
            teacher=teacher, config=to_dict(self.cfg), world_size=self.dist.world_size,
            steps_per_epoch=self.steps_per_epoch,
            # ChainedScheduler (multistep + warm-up) has no last_epoch of its own
            scheduler={"class": type(self.scheduler).__name__, "last_epoch": getattr(self.scheduler, "last_epoch", None),
                       "lr": self.scheduler.get_last_lr()},
            global_steps=self.engine.global_steps)
        path = C.save_snapshot(self.ckpt_dir, self.engine, snapshot, rank=self.dist.rank, is_main=self.dist.is_main,
                               keep=self.cfg.run.keep_checkpoints, best=is_best)
        self._last_tag = tag
        return path

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
        self.signals.install()  # SIGUSR2/SIGTERM only set a flag from here on; restored below
        try:
            for epoch in range(self.state.epoch, cfg.schedule.epochs):
                if self._done():
                    break
                train_means = self.train_epoch(epoch)
                self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
                last = self.state.epoch == cfg.schedule.epochs or self._done()
                evaluated = None
                if last or self.state.epoch % cfg.run.eval_every == 0:
                    record = evaluated = {"epoch": self.state.epoch, "step": self.state.step, **self.evaluate(),
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
                # Every epoch end: agree (a signal may have come during the evaluation), then save
                # after the evaluation, so a resume never evaluates this epoch twice.
                stop, _ = self._agree()
                path = self.save_checkpoint(evaluated)
                if stop:
                    raise Preempted(stop, path)
            if self.dist.is_main and self._last_tag is not None:
                C.point_alias(self.ckpt_dir, "final", self._last_tag)
            D.barrier()
        finally:
            self.signals.restore()
            self.log.close()
        if not record:  # resumed after the end: the last evaluation is already on disk
            record = self.run_dir.last_metrics() or {}
        if record:
            self.log.print("\nResults (final evaluation of the dynamic network, closed blocks skipped)\n"
                           + results_table(record))
        return record


def main(cfg: Config) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the final evaluation record.

    Called again on the same ``run.out_dir`` it resumes (``run.resume: auto``). On SIGUSR2 /
    SIGTERM it saves a checkpoint and raises :class:`Preempted` on every rank.
    """
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer._undo_deterministic()


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """``spnet-train``. Exit status: 0 done, 2 bad config or unsafe resume, 3 diverged
    (``run.max_bad_steps``), 75 preempted after saving (run the same command again)."""
    cfg = parse_args(argv, description="Train an SP-Net dynamic-inference ResNet (DeepSpeed, CPU or GPU).")
    try:
        main(cfg)
    except (ResumeMismatch, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_DIVERGED) from None
    except Preempted as err:
        print(str(err), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PREEMPTED) from None
    finally:
        D.destroy()  # an orderly shutdown of the process group (NCCL warns otherwise)


if __name__ == "__main__":
    cli()
