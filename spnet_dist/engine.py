"""The DeepSpeed engine: its JSON config, SGD, the learning-rate schedule, ZeRO 1/2, autocast, accumulation.

The DeepSpeed config dict is derived from the run's config here (:func:`deepspeed_config`) and
never written by hand anywhere else.

The trainer's step, in order (one micro-batch)::

    out = engine(x)                      # DeepSpeed applies torch.autocast itself (see below)
    loss = criterion(out, ...)           # outside autocast: upcast logits in the criterion
    engine.backward(loss)                # scales by 1/grad_accum (and the fp16 GradScaler)
    if engine_step(engine):              # == is_boundary() before engine.step()
        teacher.update(engine.module)    # exactly once per optimizer step

DeepSpeed 0.19.8 facts this module relies on (read in its source and pinned by
``tests/test_engine.py``):

* ``torch_autocast`` section: ``engine.forward`` runs ``self.module(...)`` inside
  ``torch.autocast(device_type=<accelerator>, dtype=<section dtype>)``
  (``runtime/torch_autocast.py: autocast_if_enabled``). Parameters and BatchNorm stay fp32.
  An autocast the caller opened around ``engine(x)`` is *replaced* by the section's settings
  when the section is enabled; when it is disabled, DeepSpeed detects the outer autocast
  only through ``torch.is_autocast_enabled()`` (CUDA's), so on GPU it is switched off and on
  CPU it stays on. Never wrap the engine call; only code outside the engine (the EMA teacher
  forward, evaluation) uses :func:`autocast_context` (``DeviceProfile.autocast``).
* Only the module call is autocast: a loss computed from ``engine(x)``'s outputs runs in
  whatever dtype those outputs have (bf16 logits) unless the criterion upcasts.
* ``engine.backward`` needs nothing special for bf16. For fp16, DeepSpeed creates a
  ``torch.amp.GradScaler`` (in the ZeRO-1/2 optimizer, or ``engine.torch_autocast_z0_gradscaler``
  for stage 0); ``engine.backward`` scales the loss. Only a manual ``loss.backward()`` needs
  ``engine.scale(loss)`` first. Overflow handling differs by stage (measured on CPU):
  stage 0 lets the GradScaler skip the step and halve its scale, unseen by DeepSpeed
  (``was_step_applied()`` True, scheduler stepped); ZeRO 1/2 skip the step themselves
  (``skipped_steps`` counts it, scheduler not stepped) but the GradScaler's scale is never
  lowered. bf16 (the default) has none of this.
* Under ``torch_autocast``, ZeRO reduces the gradients of Linear/Conv parameters (its
  ``lower_precision_safe_modules``) in the autocast dtype, other gradients in fp32;
  ``"lower_precision_safe_modules": []`` in the section keeps every reduction in fp32.
* Boundaries: see :func:`is_boundary`.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace
from typing import Any, ContextManager

import deepspeed
import torch
import torch.distributed as dist
from torch.optim import lr_scheduler as sched

from spnet_dist.config import LR_BASE_BATCH, check_zero_stage, micro_batch_size
from spnet_dist.device_profile import autocast_dtype, autocast_for
from spnet_dist.distributed import init_distributed, unlink_deepspeed_shm

__all__ = [
    "WARMUP_START_FACTOR",
    "learning_rate",
    "DEEPSPEED_DEFAULT_BUCKET",
    "zero_bucket_size",
    "needs_grad_norm",
    "deepspeed_config",
    "build_optimizer",
    "build_scheduler",
    "build_engine",
    "check_ds_config",
    "autocast_context",
    "compile_student",
    "is_boundary",
    "engine_step",
]

# Warm-up starts at lr x this factor and rises linearly to lr (LinearLR needs a factor > 0).
WARMUP_START_FACTOR = 1e-3


# --------------------------------------------------------------------------------------------
# The DeepSpeed JSON
# --------------------------------------------------------------------------------------------

# DeepSpeed's default ZeRO bucket (elements), sized for LLMs: 5e8 fp32 elements = 2 GB of staging.
DEEPSPEED_DEFAULT_BUCKET = 500_000_000


def zero_bucket_size(cfg: Any, num_parameters: int | None) -> int:
    """Elements per ZeRO reduce / allgather bucket: ``engine.bucket_size``, else the model's size.

    One bucket holding every gradient is the fewest collectives DeepSpeed can issue and costs
    one model's worth of staging (100 MB fp32 for ResNet-50) instead of 2 GB.

    Args:
        cfg: the run config (``spnet_dist.config.Config``).
        num_parameters: trainable parameter count of the student (None: DeepSpeed's default).
    """
    if cfg.engine.bucket_size is not None:
        return cfg.engine.bucket_size
    if num_parameters is None:
        return DEEPSPEED_DEFAULT_BUCKET
    return max(1, min(int(num_parameters), DEEPSPEED_DEFAULT_BUCKET))


def needs_grad_norm(cfg: Any) -> bool:
    """Whether the ZeRO 1/2 optimizer must compute the global gradient norm at every step.

    DeepSpeed 0.19.8's ``DeepSpeedZeroOptimizer.step`` (fp32 parameters, as ``torch_autocast``
    keeps them) all-reduces the norm and reads ``is_invalid_grad_norm(norm)`` on the host
    (``bool(tensor)``): one host sync per step. Two things need it:

    * ``engine.clip_grad``: clipping scales by the norm (measured: 2 host reads per step, the
      check in ``step`` and again in ``unscale_and_clip_grads``; ZeRO 0 clips on the device);
    * ``fp16``: the invalid norm IS the overflow check that skips a step whose gradients
      overflowed (plus the GradScaler's own ``found_inf`` read: 1 ``bool`` + 1 ``item`` per step).

    Otherwise ``zero_optimization.compute_grad_norm: false`` (allowed by DeepSpeed only when
    ``gradient_clipping`` is 0) removes both the all-reduce and the read. A non-finite step is
    then applied, as at ZeRO 0, and counted on the device by the trainer's stop check
    (``run.max_bad_steps``, docs/checkpoints.md#fail-fast).

    Args:
        cfg: the run config.
    """
    return cfg.engine.clip_grad is not None or cfg.engine.precision == "fp16"


def deepspeed_config(cfg: Any, world_size: int | None = None, num_parameters: int | None = None) -> dict:
    """The DeepSpeed config dict derived from ``cfg`` (the only place it is written).

    Mixed precision goes through ``torch_autocast`` only: DeepSpeed's own ``bf16``/``fp16``
    sections cast module parameters and break BatchNorm (see docs/library-facts.md).
    DeepSpeed's throughput timer is switched off: enabled and ``synchronized`` by default, it
    synchronises the device at every micro-batch; the trainer measures throughput itself.

    Args:
        cfg: the run config (``spnet_dist.config.Config``).
        world_size: data-parallel ranks; None reads ``WORLD_SIZE`` (default 1).
        num_parameters: the student's trainable parameter count, to size the ZeRO buckets
            (:func:`zero_bucket_size`); None keeps DeepSpeed's 5e8 unless ``engine.bucket_size``.
    """
    e = cfg.engine
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.zero_stage in (1, 2):
        bucket = zero_bucket_size(cfg, num_parameters)
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if e.zero_stage == 2:
        # Skipped blocks leave parameters without gradients in a step: ZeRO-2 must tolerate them.
        zero.update(overlap_comm=False, contiguous_gradients=True, ignore_unused_parameters=True)
    if e.zero_stage in (1, 2) and not needs_grad_norm(cfg):
        # The ZeRO 1/2 optimizer all-reduces the gradient norm and reads is_invalid_grad_norm()
        # with bool(tensor) at every step: a host sync per step. Nothing needs the norm unless we
        # clip or fp16 must detect overflow (docs/library-facts.md#deepspeed).
        zero["compute_grad_norm"] = False
    autocast_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[e.precision]
    autocast: dict[str, Any] = {"enabled": e.precision != "fp32", "dtype": autocast_dtype}
    if e.grad_reduce == "fp32":
        # Under torch_autocast, ZeRO all-reduces the gradients of the module classes listed here
        # in the autocast dtype (default: Linear, Conv). A bf16 sum over many ranks keeps 8
        # mantissa bits; an empty list keeps every gradient reduction in fp32.
        autocast["lower_precision_safe_modules"] = []
    return check_ds_config({
        "train_batch_size": e.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": float(e.clip_grad) if e.clip_grad is not None else 0.0,
        "zero_optimization": zero,
        # We pass torch.optim.SGD ourselves; it is not on ZeRO's tested list.
        "zero_allow_untested_optimizer": True,
        "torch_autocast": autocast,
        "steps_per_print": 10**9,  # our own logging reports progress
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    })


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


def learning_rate(optim_cfg: Any, global_batch_size: int) -> float:
    """The SGD learning rate of a run: ``optim.lr``, scaled by the global batch when asked.

    ``optim.lr_scaling``: ``none`` uses ``optim.lr`` as it is; ``linear`` is Goyal et al.'s
    linear scaling rule (2017, "Accurate, Large Minibatch SGD": lr = 0.1 x kn / 256 for
    ResNet-50, with a gradual warm-up, validated to 8,192 images per step), i.e.
    ``optim.lr x global_batch_size / LR_BASE_BATCH``: ``optim.lr`` is then the rate of a
    256-image step. The one place the rule is applied (:func:`build_optimizer`); the trainer
    prints what it gives. The global batch, not the micro-batch, sets it, so a requeue onto
    another number of ranks keeps the rate.

    Args:
        optim_cfg: has ``lr`` and ``lr_scaling`` (absent: ``none``).
        global_batch_size: images per optimizer step over all ranks and accumulation steps.
    """
    scaling = getattr(optim_cfg, "lr_scaling", "none")
    if scaling == "none":
        return float(optim_cfg.lr)
    if scaling == "linear":
        return float(optim_cfg.lr) * global_batch_size / LR_BASE_BATCH
    raise ValueError(f"optim.lr_scaling must be 'none' or 'linear', got {scaling!r}")


def build_optimizer(model: torch.nn.Module, optim_cfg: Any, global_batch_size: int | None = None) -> torch.optim.SGD:
    """SGD with momentum and weight decay over the trainable parameters (paper recipe).

    One parameter group: the paper (and its code) decays every parameter, BN included.
    SGD is not on ZeRO's tested-optimizer list, so the DeepSpeed config must carry
    ``"zero_allow_untested_optimizer": true`` (:func:`deepspeed_config` writes it).

    Args:
        model: the student network.
        optim_cfg: has ``lr``, ``momentum``, ``weight_decay``, ``nesterov`` (and ``lr_scaling``).
        global_batch_size: images per optimizer step, for ``optim.lr_scaling=linear``
            (:func:`learning_rate`); needed only then.
    """
    if global_batch_size is None:
        if getattr(optim_cfg, "lr_scaling", "none") != "none":
            raise ValueError("build_optimizer: optim.lr_scaling needs the global batch size")
        global_batch_size = LR_BASE_BATCH
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(
        params,
        lr=learning_rate(optim_cfg, global_batch_size),
        momentum=optim_cfg.momentum,
        weight_decay=optim_cfg.weight_decay,
        nesterov=optim_cfg.nesterov,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule_cfg: Any, steps_per_epoch: int
) -> sched.LRScheduler:
    """The learning-rate schedule, stepped once per OPTIMIZER step (DeepSpeed does it).

    * ``multistep``: ``MultiStepLR`` with ``milestones x steps_per_epoch`` and factor ``decay``
      (paper: x0.1 at each milestone epoch). With warm-up, a ``LinearLR`` is chained
      (``ChainedScheduler``): both factors multiply, so milestones stay absolute even if one
      falls inside the warm-up.
    * ``cosine``: ``CosineAnnealingLR`` to 0 over ``epochs x steps_per_epoch`` steps; with
      warm-up, ``LinearLR`` first and then the cosine over the remaining steps (``SequentialLR``).

    Warm-up lasts ``round(warmup_epochs x steps_per_epoch)`` steps, from
    ``lr x WARMUP_START_FACTOR`` up to ``lr``, the optimizer's rate (:func:`learning_rate`: with
    ``optim.lr_scaling=linear`` the scaled one, so warm-up is Goyal et al.'s gradual warm-up to it).

    Args:
        optimizer: the (unwrapped) torch optimizer.
        schedule_cfg: has ``kind``, ``epochs``, ``milestones``, ``decay``, ``warmup_epochs``.
        steps_per_epoch: optimizer steps per epoch, i.e. micro-batches per rank and epoch
            divided by ``grad_accum``.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = schedule_cfg.epochs * steps_per_epoch
    warmup = round(schedule_cfg.warmup_epochs * steps_per_epoch)

    def warmup_sched() -> sched.LinearLR:
        return sched.LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, end_factor=1.0,
                              total_iters=warmup)

    if schedule_cfg.kind == "multistep":
        main = sched.MultiStepLR(
            optimizer,
            milestones=[int(m) * steps_per_epoch for m in schedule_cfg.milestones],
            gamma=schedule_cfg.decay,
        )
        if warmup == 0:
            return main
        # LinearLR and MultiStepLR both update multiplicatively, so chaining them composes.
        warm = warmup_sched()
        return sched.ChainedScheduler([warm, main], optimizer=optimizer)
    if schedule_cfg.kind == "cosine":
        if warmup == 0:
            return sched.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0)
        warm = warmup_sched()
        cosine = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=0.0)
        return sched.SequentialLR(optimizer, [warm, cosine], milestones=[warmup])
    raise ValueError(f"schedule.kind must be 'multistep' or 'cosine', got {schedule_cfg.kind!r}")


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


def check_ds_config(ds_config: dict) -> dict:
    """Reject DeepSpeed settings this trainer cannot run correctly (clear ``ValueError``); returns it.

    * ZeRO stage 3: :func:`spnet_dist.config.check_zero_stage` (the one place it is refused).
    * DeepSpeed's own ``bf16`` / ``fp16`` sections cast module parameters, which breaks
      BatchNorm ("expected scalar type BFloat16 but found Float"); mixed precision goes
      through the ``torch_autocast`` section.

    Args:
        ds_config: the DeepSpeed config dict (from :func:`deepspeed_config`).
    """
    check_zero_stage(int((ds_config.get("zero_optimization") or {}).get("stage", 0)))
    for key in ("bf16", "fp16"):
        if (ds_config.get(key) or {}).get("enabled"):
            raise ValueError(
                f"DeepSpeed's '{key}' section casts the model and breaks BatchNorm; use the "
                "'torch_autocast' section (engine.precision) instead.")
    return ds_config


def _device_rank() -> int:
    """The device index DeepSpeed should bind.

    DeepSpeed binds ``cuda:LOCAL_RANK`` unless ``args.device_rank`` says otherwise; under
    submitit each task sees only its own GPU as ``cuda:0``, so hand it the device
    ``init_distributed`` selected. On CPU the index is only used to name the device.
    """
    if torch.cuda.is_available():
        return torch.cuda.current_device()
    return int(os.environ.get("LOCAL_RANK", 0))


def build_engine(
    model: torch.nn.Module,
    optim_cfg: Any,
    schedule_cfg: Any,
    ds_config: dict,
    steps_per_epoch: int,
) -> tuple[deepspeed.DeepSpeedEngine, torch.optim.Optimizer, sched.LRScheduler]:
    """Wrap ``model`` in a DeepSpeed engine with our SGD and schedule.

    The scheduler is handed to DeepSpeed, which steps it inside ``engine.step()`` at each
    gradient-accumulation boundary (and not after an fp16 step skipped for overflow), so
    the trainer never steps it itself; ``engine.save_checkpoint`` stores its state.
    Initialises a 1-rank process group first if none exists.

    Args:
        model: the student (fp32 parameters; DeepSpeed moves it to its device).
        optim_cfg: see :func:`build_optimizer`.
        schedule_cfg: see :func:`build_scheduler`.
        ds_config: DeepSpeed config dict (:func:`deepspeed_config`);
            not modified.
        steps_per_epoch: optimizer steps per epoch.

    Returns:
        ``(engine, optimizer, scheduler)``: the optimizer as DeepSpeed wraps it (the ZeRO
        optimizer for stages 1/2) and the scheduler, stepped by the engine.
    """
    check_ds_config(ds_config)
    if not dist.is_initialized():
        init_distributed()
    optimizer = build_optimizer(model, optim_cfg, ds_config["train_batch_size"])
    scheduler = build_scheduler(optimizer, schedule_cfg, steps_per_epoch)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        args=SimpleNamespace(device_rank=_device_rank()),
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=copy.deepcopy(ds_config),  # DeepSpeed may fill in defaults
    )
    unlink_deepspeed_shm()  # DeepSpeed's CPU backend would leave its segments in /dev/shm
    return engine, ds_optimizer, ds_scheduler


# --------------------------------------------------------------------------------------------
# Precision and step bookkeeping
# --------------------------------------------------------------------------------------------


def autocast_context(precision: str, device_type: str | torch.device) -> ContextManager:
    """The autocast the engine applies, for forwards that run OUTSIDE it (the EMA teacher).

    Teacher and student then see the same precision. Do not wrap ``engine(x)`` in it: the
    engine applies (and overrides) autocast itself.

    Args:
        precision: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (fp32 -> no autocast).
        device_type: ``"cuda"`` / ``"cpu"`` or a ``torch.device`` (the data's device).
    """
    return autocast_for(autocast_dtype(precision), device_type)


def compile_student(engine: deepspeed.DeepSpeedEngine, backend: str) -> None:
    """``torch.compile`` the engine's module in place with ``backend`` (``DeviceProfile.compile_backend``).

    DeepSpeed's ``engine.compile()`` calls ``self.module.compile(backend=...)``, which sets the
    module's ``_compiled_call_impl``: every call of ``engine.module`` runs compiled from then on,
    the engine's forward and any direct call (evaluation) alike. Its default backend is the
    accelerator's (inductor), so the backend is always passed. Evaluation therefore runs under
    ``torch.compiler.set_stance("force_eager")`` (``spnet_dist.evaluate``): the skip path breaks
    the graph at every ``nonzero()`` and would exhaust the recompile limit. A module deep-copied
    before this call (the EMA teacher) is not compiled.

    Args:
        engine: the DeepSpeed engine.
        backend: a ``torch.compile`` backend name.
    """
    engine.compile(backend=backend)


def is_boundary(engine: deepspeed.DeepSpeedEngine) -> bool:
    """Whether the upcoming ``engine.step()`` is a real optimizer step.

    DeepSpeed 0.19.8 semantics (pinned in ``tests/test_engine.py``): the answer is
    ``(engine.micro_steps + 1) % grad_accum == 0`` and ``engine.step()`` increments
    ``micro_steps`` at its very end, so ask BEFORE ``engine.step()`` (after ``backward`` is
    fine); afterwards it already describes the next micro-batch. After the step,
    ``engine.global_steps`` has counted it (skipped fp16 steps included) and
    ``engine.was_step_applied()`` is False between boundaries and for an fp16 step ZeRO 1/2
    skipped on overflow. (With ZeRO 0 + fp16 the GradScaler skips the step without DeepSpeed
    noticing: ``was_step_applied()`` stays True and the scheduler still steps.)
    :func:`engine_step` pairs the query with the step.

    Args:
        engine: the DeepSpeed engine.
    """
    return bool(engine.is_gradient_accumulation_boundary())


def engine_step(engine: deepspeed.DeepSpeedEngine) -> bool:
    """Run ``engine.step()`` and return whether it was an optimizer step (a boundary).

    The trainer updates the EMA teacher exactly when this returns True.

    Args:
        engine: the DeepSpeed engine.
    """
    boundary = is_boundary(engine)
    engine.step()
    return boundary
