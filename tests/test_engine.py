"""spnet_dist.engine in one process: the DeepSpeed JSON, optimizer, schedule, DeepSpeed engine facts (CPU, gloo)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from spnet_dist import config as C
from spnet_dist.config import Config, ConfigError, micro_batch_size, validate
from spnet_dist.distributed import destroy, init_distributed
from spnet_dist.engine import (
    deepspeed_config,
    zero_bucket_size,
    WARMUP_START_FACTOR,
    autocast_context,
    build_engine,
    build_optimizer,
    build_scheduler,
    engine_step,
    is_boundary,
    learning_rate,
)
from tests.dist_helpers import ds_config, make_cfg, micro_batches, toy_model, train_steps

_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """A 1-rank gloo group for this module, as a plain process gets it (no launcher env)."""
    if dist.is_initialized() and dist.get_world_size() != 1:
        pytest.skip("another test left a multi-rank process group behind")
    with pytest.MonkeyPatch.context() as mp:
        for var in _LAUNCH_VARS:  # setenv first so the undo removes what init_distributed adds
            mp.setenv(var, "0")
            mp.delenv(var)
        yield init_distributed("gloo")
        destroy()


@pytest.fixture(autouse=True)
def reset_deepspeed_autocast_state():
    """DeepSpeed keeps the torch_autocast dtype in module globals (process-wide): an fp16
    engine would give every later engine in this process a GradScaler. One engine per
    training process never notices; tests building many engines reset it."""
    yield
    import deepspeed.runtime.torch_autocast as ds_autocast

    ds_autocast.TORCH_AUTOCAST_INITIALIZED = False
    ds_autocast.TORCH_AUTOCAST_DTYPE = None


def make_engine(steps_per_epoch: int = 2, **overrides):
    cfg = make_cfg(**overrides)
    engine, optimizer, scheduler = build_engine(toy_model(seed=0), cfg.optim, cfg.schedule,
                                                ds_config(cfg, 1), steps_per_epoch)
    return engine, optimizer, scheduler, cfg


# --------------------------------------------------------------------------------------------
# The DeepSpeed JSON (derived from the config, never written by hand)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (4, 2), (8, 4), (16, 1), (32, 2)])
def test_deepspeed_batch_numbers(world: int, accum: int):
    cfg = Config()
    cfg.engine.grad_accum = accum
    ds = deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == 256
    assert ds["train_micro_batch_size_per_gpu"] == micro_batch_size(cfg, world) == 256 // (world * accum)
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == ds["train_batch_size"]


@pytest.mark.parametrize("precision,enabled,dtype", [("bf16", True, "bfloat16"), ("fp16", True, "float16"),
                                                     ("fp32", False, "float32")])
def test_deepspeed_precision_uses_torch_autocast_only(precision: str, enabled: bool, dtype: str):
    cfg = Config()
    cfg.engine.precision = precision
    ds = deepspeed_config(cfg, 1)
    assert "bf16" not in ds and "fp16" not in ds  # they cast parameters and break BatchNorm
    # grad_reduce=fp32 (default): no module class gets a lower-precision gradient reduction
    assert ds["torch_autocast"] == {"enabled": enabled, "dtype": dtype, "lower_precision_safe_modules": []}
    cfg.engine.grad_reduce = "autocast"
    assert deepspeed_config(cfg, 1)["torch_autocast"] == {"enabled": enabled, "dtype": dtype}


def test_deepspeed_zero_and_clipping():
    cfg = Config()
    ds = deepspeed_config(cfg, 2, num_parameters=1_700_000)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1_700_000,
                                       "allgather_bucket_size": 1_700_000, "compute_grad_norm": False}
    assert ds["gradient_clipping"] == 0.0 and ds["zero_allow_untested_optimizer"] is True
    assert ds["wall_clock_breakdown"] is False and ds["steps_per_print"] >= 10**6
    cfg.engine.zero_stage, cfg.engine.clip_grad = 2, 5.0
    ds = deepspeed_config(cfg, 2, num_parameters=1_700_000)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1_700_000,
                                       "allgather_bucket_size": 1_700_000, "overlap_comm": False,
                                       "contiguous_gradients": True, "ignore_unused_parameters": True}
    assert ds["gradient_clipping"] == 5.0


@pytest.mark.parametrize("stage,precision,clip,computed", [
    (1, "bf16", None, False), (2, "fp32", None, False),  # nothing reads the norm: no per-step sync
    (1, "bf16", 1.0, True), (2, "bf16", 1.0, True),  # clipping scales by it
    (1, "fp16", None, True), (2, "fp16", None, True),  # fp16's overflow check is its invalid norm
    (0, "bf16", None, None), (0, "bf16", 1.0, None),  # ZeRO 0 has no such optimizer (the key is refused)
])
def test_zero_computes_the_gradient_norm_only_when_needed(stage, precision, clip, computed):
    # Issue 19 finding 2: the ZeRO 1/2 optimizer all-reduced the gradient norm and read
    # bool(is_invalid_grad_norm) every step though nothing used it.
    cfg = make_cfg(engine__zero_stage=stage, engine__precision=precision, engine__clip_grad=clip)
    zero = deepspeed_config(cfg, 1)["zero_optimization"]
    assert zero.get("compute_grad_norm", None if stage == 0 else True) is computed
    if stage:  # DeepSpeed accepts the JSON and its optimizer follows it
        engine, *_ = make_engine(engine__zero_stage=stage, engine__precision=precision, engine__clip_grad=clip)
        assert engine.optimizer.compute_grad_norm is computed


def test_zero_buckets_are_sized_from_the_model_not_for_llms():
    # Finding 6: DeepSpeed's 5e8-element default staged ~2 GB of fp32 for a 25M-parameter ResNet-50.
    cfg = Config()
    resnet50 = 25_557_032
    zero = deepspeed_config(cfg, 8, num_parameters=resnet50)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == resnet50
    assert zero_bucket_size(cfg, 10**10) == 500_000_000  # never above DeepSpeed's own default
    cfg.engine.bucket_size = 4_000_000  # an explicit value wins over the model size
    assert deepspeed_config(cfg, 8, num_parameters=resnet50)["zero_optimization"]["reduce_bucket_size"] == 4_000_000
    cfg.engine.zero_stage = 0  # ZeRO 0 has no ZeRO buckets
    assert "reduce_bucket_size" not in deepspeed_config(cfg, 8, num_parameters=resnet50)["zero_optimization"]
    cfg = Config()
    cfg.engine.bucket_size = 0
    with pytest.raises(ConfigError, match=r"^engine\.bucket_size: 0 is invalid"):
        validate(cfg, 1, check_paths=False)


def test_deepspeed_throughput_timer_is_off():
    # Finding 4: enabled and synchronized by default, it synchronises the device every micro-batch.
    assert deepspeed_config(Config(), 1)["timers"] == {"throughput": {"enabled": False, "synchronized": False}}


def test_zero_stage_3_is_refused_in_the_json_as_in_the_config():
    import dataclasses

    cfg = dataclasses.replace(Config(), engine=C.EngineConfig(zero_stage=3))
    with pytest.raises(ConfigError, match="engine.zero_stage: 3 is not supported"):
        deepspeed_config(cfg, 1)


# --------------------------------------------------------------------------------------------
# Optimizer and schedule (plain torch)
# --------------------------------------------------------------------------------------------


def test_build_optimizer_is_paper_sgd():
    cfg = make_cfg(optim__nesterov=True)
    model = toy_model()
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (
        0.1, 0.9, 1e-4, True)
    assert len(group["params"]) == len(list(model.parameters())) - 1  # frozen ones left out


@pytest.mark.parametrize("scaling, rate", [("none", 0.1), ("linear", 0.1 * 1024 / 256)])
def test_linear_lr_scaling_sets_the_rate_the_warm_up_reaches(scaling, rate):
    # Goyal et al. 2017: lr x global batch / 256, reached by the gradual warm-up, applied where the
    # engine builds its optimizer (one place).
    cfg = make_cfg(optim__lr_scaling=scaling, engine__global_batch_size=1024, engine__zero_stage=0,
                   schedule__warmup_epochs=1.0)
    assert learning_rate(cfg.optim, 1024) == pytest.approx(rate)
    engine, optimizer, scheduler = build_engine(toy_model(seed=0), cfg.optim, cfg.schedule, ds_config(cfg, 1),
                                                steps_per_epoch=2)
    lrs = []
    for _ in range(3):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()  # no gradients: nothing moves; the scheduler expects it first
        scheduler.step()
    assert lrs == pytest.approx([rate * WARMUP_START_FACTOR, rate * (1 + WARMUP_START_FACTOR) / 2, rate])
    if scaling == "linear":  # the rule needs the global batch: no silent unscaled rate
        with pytest.raises(ValueError, match="needs the global batch size"):
            build_optimizer(toy_model(), cfg.optim)


def _lrs(kind: str, epochs: int, milestones: list[int], warmup_epochs: float, spe: int) -> list[float]:
    cfg = make_cfg(schedule__kind=kind, schedule__epochs=epochs, schedule__milestones=milestones,
                   schedule__warmup_epochs=warmup_epochs)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg.schedule, spe)
    lrs = []
    for _ in range(epochs * spe):
        lrs.append(opt.param_groups[0]["lr"])  # lr used by this optimizer step
        opt.step()
        sched.step()
    return lrs


def _warm(t: int, w: int) -> float:
    return 1.0 if w == 0 or t >= w else WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * t / w


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.5])
def test_multistep_schedule_counts_optimizer_steps(warmup_epochs):
    spe, milestones = 4, [1, 3]  # warm-up of 6 steps spans the first milestone (step 4)
    lrs = _lrs("multistep", 5, milestones, warmup_epochs, spe)
    w = round(warmup_epochs * spe)
    expected = [0.1 * _warm(t, w) * 0.1 ** sum(t >= m * spe for m in milestones)
                for t in range(5 * spe)]
    assert lrs == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0])
def test_cosine_schedule_warms_up_then_anneals_to_zero(warmup_epochs):
    spe, epochs = 3, 4
    lrs = _lrs("cosine", epochs, [], warmup_epochs, spe)
    w, total = round(warmup_epochs * spe), epochs * spe
    expected = [0.1 * _warm(t, w) if t < w else
                0.1 * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))
                for t in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_schedule_rejects_bad_input():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="kind"):
        build_scheduler(opt, make_cfg(schedule__kind="step").schedule, 2)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(opt, make_cfg().schedule, 0)


# --------------------------------------------------------------------------------------------
# DeepSpeed engine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_engine_trains_with_fp32_params(stage, precision):
    engine, _, _, _ = make_engine(engine__zero_stage=stage, engine__precision=precision,
                                  optim__lr=0.5, schedule__milestones=[100], schedule__epochs=200)
    x, y = micro_batches(0, 0, 1, 1, 8)[0]
    out = engine(x)
    # The engine applies autocast itself: bf16 logits, fp32 parameters and BN buffers.
    assert out.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    losses = []
    for _ in range(12):  # fit one fixed batch
        loss = F.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        assert engine_step(engine)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}
    assert {b.dtype for b in engine.module.buffers() if b.is_floating_point()} == {torch.float32}


def test_lr_steps_only_at_accumulation_boundaries():
    # grad_accum 2, 2 optimizer steps per epoch, x0.1 at epochs 1 and 2 = optimizer steps 2, 4.
    engine, optimizer, scheduler, _ = make_engine(
        steps_per_epoch=2, engine__zero_stage=2, engine__grad_accum=2,
        schedule__epochs=3, schedule__milestones=[1, 2])
    seen = []
    for step in range(6):
        for x, y in micro_batches(step, 0, 1, 2, 8):
            engine.backward(F.cross_entropy(engine(x).float(), y))
            engine_step(engine)
            seen.append((engine.global_steps, scheduler.last_epoch, engine.get_lr()[0],
                         optimizer.param_groups[0]["lr"]))
    for micro, (opt_steps, sched_steps, lr, group_lr) in enumerate(seen):
        assert opt_steps == (micro + 1) // 2 == sched_steps  # one scheduler step per optimizer step
        expected = 0.1 * 0.1 ** sum(opt_steps >= m for m in (2, 4))
        assert lr == pytest.approx(expected) and group_lr == pytest.approx(expected)


def test_is_boundary_semantics():
    """Pins DeepSpeed 0.19.8: ask before step(); after it the answer is for the next micro-batch."""
    engine, _, _, _ = make_engine(engine__zero_stage=2, engine__grad_accum=3,
                                  engine__global_batch_size=12)
    rows = []
    for step in range(2):
        for x, y in micro_batches(step, 0, 1, 3, 12):
            engine.backward(F.cross_entropy(engine(x).float(), y))
            before = is_boundary(engine)
            weight = engine.module[0].weight.detach().clone()
            took = engine_step(engine)
            rows.append((before, took, engine.is_gradient_accumulation_boundary(),
                         engine.global_steps, engine.was_step_applied(),
                         not torch.equal(weight, engine.module[0].weight), engine.micro_steps))
    before, took, after, global_steps, applied, changed, micro = map(list, zip(*rows))
    assert before == [False, False, True, False, False, True]
    assert took == before and applied == before and changed == before
    assert after == [False, True, False, False, True, False]  # describes the NEXT micro-batch
    assert global_steps == [0, 0, 1, 1, 1, 2]
    assert micro == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_engine_matches_plain_pytorch_accumulation(stage):
    """DeepSpeed's accumulation (loss / grad_accum, one SGD step, scheduler at the boundary)
    equals the textbook loop, with momentum, weight decay and an lr milestone crossed."""
    steps, accum, batch = 3, 2, 8
    engine, _, _, cfg = make_engine(steps_per_epoch=1, engine__zero_stage=stage,
                                    engine__grad_accum=accum, engine__global_batch_size=batch,
                                    schedule__milestones=[2], schedule__epochs=4)
    train_steps(engine, steps, 0, 1, accum, batch)

    model = toy_model(seed=0)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.schedule, steps_per_epoch=1)
    for step in range(steps):
        for x, y in micro_batches(step, 0, 1, accum, batch):
            (F.cross_entropy(model(x), y) / accum).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    for (name, a), b in zip(engine.module.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_build_engine_rejects_stage3_and_native_mixed_precision():
    cfg = make_cfg(engine__zero_stage=2)
    ds = ds_config(cfg, 1)
    stage3 = copy.deepcopy(ds)
    stage3["zero_optimization"]["stage"] = 3
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        build_engine(toy_model(), cfg.optim, cfg.schedule, stage3, 1)
    for key in ("bf16", "fp16"):
        native = {**ds, key: {"enabled": True}}
        with pytest.raises(ValueError, match="torch_autocast"):
            build_engine(toy_model(), cfg.optim, cfg.schedule, native, 1)
    untouched = copy.deepcopy(ds)
    build_engine(toy_model(), cfg.optim, cfg.schedule, ds, 1)
    assert ds == untouched, "build_engine must not modify the caller's config"


# --------------------------------------------------------------------------------------------
# Autocast outside the engine
# --------------------------------------------------------------------------------------------


def test_autocast_context():
    with autocast_context("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast_context(precision, torch.device("cpu")):
            assert torch.is_autocast_enabled("cpu")
            assert torch.get_autocast_dtype("cpu") == dtype
    with pytest.raises(ValueError, match="precision"):
        autocast_context("int8", "cpu")


def test_teacher_forward_matches_engine_precision():
    engine, _, _, _ = make_engine(engine__precision="bf16")
    x, _ = micro_batches(0, 0, 1, 1, 8)[0]
    student_out = engine(x)
    with torch.no_grad(), autocast_context("bf16", engine.device):
        teacher_out = engine.module(x)  # the module called directly, as the teacher is
    assert teacher_out.dtype == student_out.dtype == torch.bfloat16
    torch.testing.assert_close(teacher_out, student_out.detach(), rtol=0, atol=0)


def test_engine_autocast_wins_over_an_outer_autocast():
    """The engine's torch_autocast section decides the forward's precision even inside a
    caller's autocast, which is why the trainer never wraps ``engine(x)`` itself.

    With the section *disabled*, DeepSpeed 0.19.8 only notices an outer autocast through
    ``torch.is_autocast_enabled()`` (the CUDA one): on GPU it turns it off, on CPU the outer
    autocast stays on. Pinned here so a change shows up.
    """
    x, _ = micro_batches(0, 0, 1, 1, 8)[0]
    engine, _, _, _ = make_engine(engine__precision="bf16")
    with torch.autocast("cpu", dtype=torch.float16):
        assert engine(x).dtype == torch.bfloat16
    import deepspeed.runtime.torch_autocast as ds_autocast

    ds_autocast.TORCH_AUTOCAST_INITIALIZED, ds_autocast.TORCH_AUTOCAST_DTYPE = False, None
    engine, _, _, _ = make_engine(engine__precision="fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert engine(x).dtype == torch.bfloat16  # CPU: not detected, outer autocast applies


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_runs_with_a_grad_scaler(stage):
    engine, optimizer, _, _ = make_engine(engine__zero_stage=stage, engine__precision="fp16")
    scaler = engine.torch_autocast_z0_gradscaler if stage == 0 else optimizer.torch_autocast_gradscaler
    assert isinstance(scaler, torch.amp.GradScaler)
    losses = train_steps(engine, 3, 0, 1, 1, 8)
    assert all(math.isfinite(v) for v in losses)
    assert engine.global_steps == 3
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}


@pytest.mark.parametrize("grad_reduce, reduced_in_bf16", [("fp32", False), ("autocast", True)])
def test_grad_reduce_dtype_under_bf16_autocast(grad_reduce, reduced_in_bf16):
    """DeepSpeed marks the parameters whose gradients ZeRO reduces in the autocast dtype."""
    from deepspeed.runtime.torch_autocast import has_comm_dtype

    engine, *_ = make_engine(engine__precision="bf16", engine__grad_reduce=grad_reduce)
    convs = [p for m in engine.module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
             for p in m.parameters(recurse=False)]
    assert convs and all(has_comm_dtype(p) == reduced_in_bf16 for p in convs)
