"""spnet-train: the SP-Net training job, the same code on a laptop CPU and on 64 GPUs.

Read top to bottom: :class:`Trainer` sets up (distributed -> run directory -> data -> model,
engine, teacher -> restore), :meth:`Trainer.fit` runs the epochs (train, evaluate, agree on a
stop, save), :func:`main` / :func:`cli` are the entry points. One optimisation step is
:class:`~spnet_dist.training.step.SPNetStep`; the checkpoint format is
:mod:`spnet_dist.checkpoint`, the run directory :mod:`spnet_dist.run_dir`.
"""
from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import distributed as D
from ..checkpoint import (CheckpointError, RankState, ResumeMismatch, Snapshot, TeacherState, TrainState,
                          capture_rng, load_snapshot, point_alias, restore_rng, save_snapshot, step_tag)
from ..config import LR_BASE_BATCH, Config, ConfigError, config_warnings, micro_batch_size, parse_args, to_dict
from ..data import build_loaders, build_test_loader
from ..device_profile import resolve_device_profile
from ..engine import learning_rate
from ..evaluate import evaluate, evaluate_calibrated
from ..flops import profile_macs
from ..models.from_config import build_model
from ..run_dir import RunDirectory
from .epoch import EpochAccumulator, IntervalMeter
from .paths import PathProbe, resolve_snapshot_every
from .planning import plan_run_directory
from .reproducibility import seed_everything, set_deterministic
from .run_log import RunLogger, results_table
from .signals import (EXIT_BAD_CONFIG, EXIT_DIVERGED, EXIT_PREEMPTED, Preempted, StopCheck, StopSignals,
                      TrainingDiverged)
from .step import SPNetStep

__all__ = ["Trainer", "main", "cli", "TEST_KEYS"]

# The figures of the test split copied into each evaluation record as test_<key>.
TEST_KEYS = ("top1", "gmacs", "mac_ratio", "exec_rate", "exec_rates", "images", "gate_threshold")


class Trainer:
    """Owns the data, the SP-Net step and the run directory of one training job.

    Args:
        cfg: a validated config.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # SIGUSR2/SIGTERM only set a flag from the first line of set-up (rank 0's scan of a network
        # file system can take minutes): the first agreed check in fit() acts on a stop requested
        # before it. Restored at the end of fit(), or here if set-up fails.
        self.signals = StopSignals().install()
        self._undo_deterministic: Any = lambda: None
        try:
            self._undo_deterministic = set_deterministic(cfg.run.deterministic)  # before any CUDA/cuBLAS call
            self._set_up()
        except BaseException:
            self.signals.restore()  # a failed set-up leaves the process as it found it
            self._undo_deterministic()
            raise

    def _set_up(self) -> None:
        cfg = self.cfg
        # ============ device profile: every device-dependent setting, answered once ============
        # Before any process group or file: a setting this device cannot run (model.sync_bn or
        # NCCL without CUDA, ...) is a one-line ConfigError here. Every consumer reads self.profile.
        self.profile = resolve_device_profile(cfg)

        # ============ distributed ============
        # A collective that waits longer than engine.timeout_min (a rank died or hangs) raises,
        # so the job ends and can be requeued instead of holding its nodes until the time limit.
        self.dist = D.init_distributed(self.profile.backend_now, timeout=timedelta(minutes=cfg.engine.timeout_min))
        self.device = self.dist.device
        if self.device.type != self.profile.compute:  # both follow torch.cuda.is_available()
            raise RuntimeError(f"the device profile was resolved for {self.profile.compute}, the rank runs on {self.device}")

        # ============ run directory: a fresh run, or resume (rank 0 decides, every rank obeys) ============
        self.run_dir = RunDirectory(cfg.run.out_dir)
        try:
            self.plan = plan_run_directory(cfg, self.run_dir, self.dist.is_main)
        except FileExistsError as err:  # run.resume=never on a directory that holds a run (every rank)
            raise ConfigError(str(err), "run.resume") from None
        # Rank 0 alone creates the TensorBoard files: a failure there reaches every rank.
        opened = D.run_on_main(lambda: RunLogger(self.run_dir, True, cfg.run.progress, cfg.run.tensorboard,
                                                 purge_step=self.plan.restart_step),
                               is_main=self.dist.is_main, share=False, what="open the TensorBoard log")
        self.log = opened if self.dist.is_main else RunLogger(self.run_dir, False)
        # The per-rank batch every BatchNorm sees (without sync_bn): a decision the user sees. The
        # warnings are those of the profile's device (the CUDA profile on a CPU warns as CUDA would).
        self.micro_batch = micro_batch_size(cfg, self.dist.world_size)
        for warning in config_warnings(cfg, self.dist.world_size, self.profile.target):
            self.log.print(f"warning: {warning}")

        # ============ data: rank 0 prepares and scans, the others read its file list ============
        self.train_loader, self.val_loader = build_loaders(
            cfg.data, self.micro_batch, self.dist.rank, self.dist.world_size,
            cfg.run.seed, device=self.device, channels_last=self.profile.channels_last,
            listing_path=self.run_dir.data_files, pin_memory=self.profile.pin_memory_now,
            dali_device=self.profile.dali_device_now,
        )
        # The held-out test split of the formats that have one (fashion_mnist): evaluated next to
        # the validation split at every evaluation; model selection never reads it.
        self.test_loader = build_test_loader(cfg.data, self.dist.rank, self.dist.world_size)
        self.steps_per_epoch = len(self.train_loader) // cfg.engine.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data: {len(self.train_loader)} micro-batches per rank per epoch is fewer than "
                f"engine.grad_accum={cfg.engine.grad_accum}; use a smaller engine.global_batch_size"
            )

        # ============ model, engine, teacher, criterion ============
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        model = build_model(cfg)
        if self.profile.sync_bn_now:  # refused without CUDA by the profile; not emulated on a CPU
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.step_fn = SPNetStep(cfg, model.to(self.device), self.device, self.dist.world_size, self.steps_per_epoch,
                                 profile=self.profile)
        self.model = self.step_fn.model
        self.engine, self.teacher, self.scheduler = self.step_fn.engine, self.step_fn.teacher, self.step_fn.scheduler
        self.mac_profile = profile_macs(self.model, (cfg.data.image_size, cfg.data.image_size))
        # Gumbel noise and dropout differ per rank (different samples anyway), reproducibly.
        seed_everything(cfg.run.seed + 1000 * (self.dist.rank + 1))
        # The evaluation threshold is calibrated to the cost loss's target (model.gate_calibration).
        self.calibration_target = (cfg.loss.target_rate if cfg.model.gate_calibration == "target"
                                   and cfg.loss.cost_weight > 0 and cfg.loss.target_rate is not None else None)
        # Path snapshots of a fixed probe set (training.paths); eval-mode forwards draw no random
        # numbers, so a run with snapshots trains exactly as one without.
        self.paths: Optional[PathProbe] = None
        if cfg.run.path_probe_size > 0:
            self.paths = PathProbe(self.val_loader, cfg.run.path_probe_size,
                                   resolve_snapshot_every(cfg.run.path_snapshot_every, self.steps_per_epoch),
                                   self.run_dir, self.device, self.dist.rank, self.dist.world_size,
                                   self.dist.is_main, self.profile.teacher_execution)

        # ============ the loop's state: counters, epoch sums, stop agreement ============
        self.state = TrainState()
        self.epoch_sums = EpochAccumulator(self.device)
        self.stop = StopCheck(self.device, self.dist.world_size, self.signals)
        self.last_tag: Optional[str] = None  # the newest checkpoint this run has (for `final`)
        if self.plan.checkpoint is not None:
            self._restore(self.plan.checkpoint)
            if self.paths is not None:
                last = self.run_dir.last_metrics()
                self.paths.resume(self.state.step, None if last is None else last.get("step"))

    # ------------------------------------------------------------------ fit
    def fit(self) -> dict[str, Any]:
        """Train for ``schedule.epochs`` (or ``run.max_steps``) and return the last evaluation."""
        cfg, record = self.cfg, {}
        self.log.print(self._describe())
        try:
            if self.paths is not None and self.state.step == 0 and self.paths.last_step is None:
                self.paths.snapshot(self.model, 0, self.state.epoch)  # the paths before the first step
            for epoch in range(self.state.epoch, cfg.schedule.epochs):
                if self._done():
                    break
                # ============ one epoch (a stop check every run.stop_check_every steps) ============
                train_means = self.train_epoch(epoch)
                self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0

                # ============ evaluation ============
                evaluated = self._evaluate_epoch(train_means) if self._evaluation_due() else None
                record = evaluated or record

                # ============ agree on a stop, then save (after the evaluation: a resume never repeats it) ============
                stop = self._agree()  # a signal may have come during the evaluation
                path = self.save_checkpoint(evaluated)
                if stop:
                    raise Preempted(stop, path)

            # ============ the end: `final` names the last checkpoint ============
            def point_final() -> None:
                if self.last_tag is not None:
                    point_alias(self.run_dir.checkpoints, "final", self.last_tag)

            D.run_on_main(point_final, is_main=self.dist.is_main, share=False, what="point checkpoints/final")
        finally:
            self.stop.signals.restore()
            self.log.close()
        record = record or self.run_dir.last_metrics() or {}  # resumed after the end: already on disk
        if record:
            self.log.print("\nResults (final evaluation of the dynamic network, closed blocks skipped)\n"
                           + results_table(record))
        return record

    # ------------------------------------------------------------------ one epoch
    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        terms, stepped = self.step_fn(images, targets)
        self.state.step += stepped
        return terms, stepped

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train ``epoch`` (what is left of it after a mid-epoch resume); returns its loss means
        and images/s over every rank."""
        cfg = self.cfg
        self.model.train()
        self.train_loader.set_epoch(epoch)  # keeps a resumed position inside this epoch
        self.log.start_epoch(epoch, self.steps_per_epoch)
        if self.state.batch_in_epoch == 0:
            self.epoch_sums.reset()  # otherwise a resume restored the sums of the epoch so far
        self.epoch_sums.begin()
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
            self.stop.count(terms["total"])  # on the device; read at the next agreed check
            self.epoch_sums.add(terms, images.shape[0])
            meter.add(images.shape[0], stepped)
            if stepped:
                log_now = self.state.step % cfg.run.log_every == 0
                # The float() calls are the step's only host syncs, once per logging interval.
                shown = {k: float(v) for k, v in terms.items()} if log_now else {}
                speed = meter.report(time.perf_counter(), self.dist.world_size,
                                     self._steps_left()) if log_now else None
                self.log.step(self.state.step, epoch, shown, self.scheduler.get_last_lr()[0], log_now, speed)
                if self.paths is not None and self.paths.due(self.state.step):
                    self.paths.snapshot(self.model, self.state.step, epoch)  # before a checkpoint of this step
                self._maybe_checkpoint(last_of_epoch=self.state.batch_in_epoch >= limit)
        # The loop stops at `limit` without exhausting the loader: free its reader now (DALI: the
        # pipeline's pinned and GPU memory), or it lives on beside the evaluation's own pipeline.
        self.train_loader.release()
        self.log.end_epoch()
        return self.epoch_sums.reduce()

    def _steps_left(self) -> int:
        total = self.cfg.schedule.epochs * self.steps_per_epoch
        if self.cfg.run.max_steps is not None:
            total = min(total, self.cfg.run.max_steps)
        return max(total - self.state.step, 0)

    def _done(self) -> bool:
        return self.cfg.run.max_steps is not None and self.state.step >= self.cfg.run.max_steps

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, final: bool = False) -> dict[str, Any]:
        """The validation split (unprefixed keys: model selection reads them) and, when the data set
        has one, the test split (``test_*``) under the same rule.

        With a calibration target the routers' threshold is first calibrated on the validation
        split (``evaluate_calibrated``; the paper's rule's figures kept as ``paper_rule_*``); the
        test split is evaluated at that threshold, and at the ``final`` evaluation also by the
        paper's rule (``test_paper_rule_*``).
        """
        # BN buffers are already identical across ranks: averaged after every optimizer step.
        args = (self.mac_profile, self.device)
        skip = dict(skip_strategy=self.profile.eval_skip_strategy)
        if self.calibration_target is None:
            record = evaluate(self.model, self.val_loader, *args, self.step_fn.autocast, threshold=0.0, **skip)
        else:
            record = evaluate_calibrated(self.model, self.val_loader, *args, self.calibration_target,
                                         self.step_fn.autocast, **skip)
        if self.test_loader is not None:
            test = evaluate(self.model, self.test_loader, *args, self.step_fn.autocast, **skip)  # the threshold just set
            record |= {f"test_{k}": test[k] for k in TEST_KEYS}
            if final and self.calibration_target is not None:
                paper = evaluate(self.model, self.test_loader, *args, self.step_fn.autocast, threshold=0.0, **skip)
                record |= {f"test_paper_rule_{k}": paper[k] for k in TEST_KEYS}
        return record

    def _evaluation_due(self) -> bool:
        last = self.state.epoch == self.cfg.schedule.epochs or self._done()
        return last or self.state.epoch % self.cfg.run.eval_every == 0

    def _evaluate_epoch(self, train_means: dict[str, float]) -> dict[str, Any]:
        """Evaluate, append the record to the run's metrics and print it; returns the record."""
        final = self.state.epoch == self.cfg.schedule.epochs or self._done()
        record = {"epoch": self.state.epoch, "step": self.state.step, **self.evaluate(final),
                  "loss": {k: v for k, v in train_means.items() if k != "images_per_sec"},
                  "images_per_sec": train_means["images_per_sec"], "lr": self.scheduler.get_last_lr()[0],
                  # what BatchNorm normalised over since the last record (a requeue may change it)
                  "micro_batch": self.micro_batch, "world_size": self.dist.world_size}
        if self.paths is not None:
            record |= self.paths.take_intervals()
        self.log.metrics(record)
        test = (f"; test top-1 {record['test_top1']:.2f} % at {record['test_mac_ratio']:.3f}, exec rate "
                f"{record['test_exec_rate']:.3f}" if "test_top1" in record else "")
        self.log.print(
            f"epoch {record['epoch']} step {record['step']}: val top-1 {record['top1']:.2f} %, "
            f"{record['gmacs']:.4f} GMACs ({record['mac_ratio']:.3f} of static), "
            f"exec rate {record['exec_rate']:.3f} (threshold {record['gate_threshold']:+.3f}){test}, "
            f"loss {train_means.get('total', math.nan):.4f}, {train_means['images_per_sec']:.0f} img/s"
        )
        return record

    # ------------------------------------------------------------------ stop agreement, checkpoints
    def _agree(self) -> int:
        """Every rank, at agreed step boundaries: the stop signal to act on (or 0); counts the
        non-finite losses and stops the run once more than ``run.max_bad_steps`` occurred."""
        stop = self.stop.agree()
        self.state.bad_steps += self.stop.new_bad
        if self.state.bad_steps > self.cfg.run.max_bad_steps:
            raise TrainingDiverged(
                f"{self.state.bad_steps} steps with a non-finite loss (run.max_bad_steps="
                f"{self.cfg.run.max_bad_steps}) by step {self.state.step}; the last good checkpoint "
                f"is {self.last_tag or 'none'}")
        return stop

    def _maybe_checkpoint(self, last_of_epoch: bool) -> None:
        """After an optimizer step: agree on stop/bad steps when due, save when due or stopping."""
        run, step = self.cfg.run, self.state.step
        ckpt_due = run.checkpoint_every > 0 and step % run.checkpoint_every == 0 and not last_of_epoch
        if not (ckpt_due or step % run.stop_check_every == 0):
            return  # the epoch end checks and saves (after the evaluation)
        stop = self._agree()
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
        if self.stop.new_bad:
            self.log.print(f"warning: step {self.state.step}: non-finite losses since the last check; "
                           "no checkpoint written")
            return None
        tag = step_tag(self.state.step)
        best = record is not None and (self.state.best_top1 is None or record["top1"] > self.state.best_top1)
        if best:
            self.state.best_top1, self.state.best_tag = record["top1"], tag
        path = save_snapshot(self.run_dir.checkpoints, self.engine, self._snapshot(), rank=self.dist.rank,
                             is_main=self.dist.is_main, keep=self.cfg.run.keep_checkpoints, best=best)
        self.last_tag = tag
        return path

    def _snapshot(self) -> Snapshot:
        """What a checkpoint holds besides DeepSpeed's engine state (this rank's view)."""
        teacher = None if self.teacher is None else TeacherState(
            weights=self.teacher.module.state_dict(), momentum=self.teacher.momentum,
            num_updates=self.teacher.num_updates)
        mid_epoch = self.state.batch_in_epoch > 0  # else the epoch's sums were already reduced
        return Snapshot(
            state=self.state,
            rank=RankState(rng=capture_rng(self.device), loader=self.train_loader.state_dict(),
                           epoch_sums=self.epoch_sums.snapshot() if mid_epoch else None),
            teacher=teacher, config=to_dict(self.cfg), world_size=self.dist.world_size,
            steps_per_epoch=self.steps_per_epoch,
            # ChainedScheduler (multistep + warm-up) has no last_epoch of its own (docs/library-facts.md)
            scheduler={"class": type(self.scheduler).__name__, "last_epoch": getattr(self.scheduler, "last_epoch", None),
                       "lr": self.scheduler.get_last_lr()},
            global_steps=self.engine.global_steps)

    def _restore(self, path: Path) -> None:
        """Load engine, teacher, counters, RNG, loader position and epoch sums from checkpoint ``path``."""
        rank, world = self.dist.rank, self.dist.world_size
        snap = load_snapshot(path, self.engine, rank=rank, world_size=world, device=self.device)
        # The newest good checkpoint until this attempt saves one: `final` points to it if a
        # preempted attempt had saved the last step but stopped before pointing `final`.
        self.last_tag = Path(path).resolve().name  # a step directory, never an alias
        self.state = snap.state
        if self.teacher is not None:
            self.teacher.load_state_dict({"module": snap.teacher.weights, "momentum": snap.teacher.momentum,
                                          "num_updates": snap.teacher.num_updates})
        if snap.rank.rng is not None:
            restore_rng(snap.rank.rng, self.device)
        else:  # another world size: ranks no longer map one to one, a fresh seed derived from the step
            seed_everything(self.cfg.run.seed + 1000 * (rank + 1) + 7919 * self.state.step)
        self.train_loader.load_state_dict(snap.rank.loader)
        # The loader's position is the truth for the current epoch (a world-size change converts
        # it through the global sample count, see TrainLoader.load_state_dict).
        position = self.train_loader.state_dict()
        self.state.batch_in_epoch = position["batches_seen"] if position["epoch"] == self.state.epoch else 0
        if self.state.batch_in_epoch:
            self.epoch_sums.restore(snap.rank.epoch_sums)
        if self.cfg.run.deterministic and snap.num_threads not in (None, torch.get_num_threads()):
            self.log.print(f"warning: the checkpoint was written with {snap.num_threads} intra-op threads, this "
                           f"run uses {torch.get_num_threads()}: CPU results may differ in the last bits")
        moved = "" if snap.world_size == world else (
            f" (world size {snap.world_size} -> {world}: "
            + ("optimizer state kept" if snap.optimizer_loaded else "SGD momentum restarts from zero") + ")")
        saved_engine = snap.config["engine"]  # global batch and accumulation cannot change on resume
        saved_micro = saved_engine["global_batch_size"] // (saved_engine["grad_accum"] * snap.world_size)
        if saved_micro != self.micro_batch:
            bn = (f"SyncBatchNorm still normalises over {self.micro_batch * world} images" if self.profile.sync_bn_now
                  else f"every BatchNorm now normalises over {self.micro_batch} images instead of {saved_micro}")
            self.log.print(f"warning: world size {snap.world_size} -> {world} changes the micro-batch from {saved_micro} "
                           f"to {self.micro_batch} images per rank: {bn}; the global batch and the learning rate "
                           "are unchanged (metrics.jsonl records micro_batch and world_size with every evaluation)")
        self.log.print(f"resumed from {path.name}: epoch {self.state.epoch}, step {self.state.step}, "
                       f"micro-batch {self.state.batch_in_epoch} of the epoch{moved}")

    def _describe(self) -> str:
        cfg = self.cfg
        lr = learning_rate(cfg.optim, cfg.engine.global_batch_size)
        scaled = (f" = optim.lr {cfg.optim.lr:g} x {cfg.engine.global_batch_size}/{LR_BASE_BATCH} (optim.lr_scaling=linear)"
                  if cfg.optim.lr_scaling == "linear" else "")
        return (f"SP-Net {cfg.model.name}: {self.model.num_blocks} gated blocks, world size {self.dist.world_size}, "
                f"micro-batch {self.micro_batch} x accumulation {cfg.engine.grad_accum}, lr {lr:g}{scaled}, "
                f"{self.steps_per_epoch} optimizer steps/epoch, static {self.mac_profile.static() / 1e9:.4f} GMACs\n"
                f"{self.profile.describe()}")


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
    """``spnet-train``. Exit status: 0 done, 2 bad config, unsafe resume or refused checkpoint,
    3 diverged (``run.max_bad_steps``), 75 preempted after saving (run the same command again)."""
    cfg = parse_args(argv, description="Train an SP-Net dynamic-inference ResNet (DeepSpeed, CPU or GPU).")
    try:
        main(cfg)
    except (ConfigError, ResumeMismatch, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_CONFIG) from None
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_DIVERGED) from None
    except Preempted as err:
        print(str(err), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PREEMPTED) from None
    finally:
        D.destroy()  # an orderly shutdown of the process group (NCCL warns otherwise)
