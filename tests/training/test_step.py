"""SPNetStep on CPU as a GPU would run it: host syncs, the teacher's hooks and execution path,
skipped fp16 steps, tensors created without a device (issue 6, findings 1 and 3-7); channels_last
batches with NCHW parameters and torch.compile with evaluation in between (issue 19, findings 1, 3)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from spnet_dist import training
from spnet_dist.config import load_config
from spnet_dist.device_audit import DeviceAudit, HostSyncCounter
from spnet_dist.device_profile import PROFILE_ENV, resolve_device_profile
from spnet_dist.evaluate import evaluate
from spnet_dist.execution import InferenceResNet, execution_plan, set_execution
from spnet_dist.flops import profile_macs
from spnet_dist.models.from_config import build_model
from spnet_dist.training.reproducibility import seed_everything
from spnet_dist.training.step import SPNetStep, clamp_gradients_

from ..conftest import REPO_ROOT
from ..dist_helpers import WORKERS, run_torchrun

pytestmark = pytest.mark.usefixtures("own_process_group")

BATCH, SIZE = 8, 16


@pytest.fixture(autouse=True)
def reset_deepspeed_autocast_state():
    """DeepSpeed keeps the torch_autocast dtype in module globals: reset after an fp16 engine."""
    yield
    import deepspeed.runtime.torch_autocast as ds_autocast

    ds_autocast.TORCH_AUTOCAST_INITIALIZED = False
    ds_autocast.TORCH_AUTOCAST_DTYPE = None


def make_step(*overrides: str, emulate: str = "") -> SPNetStep:
    """SPNetStep on the demo model; ``emulate`` is a ``SPNET_DEVICE_PROFILE`` value ("cuda", "cuda:eager")."""
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml",
                      [f"engine.global_batch_size={BATCH}", f"data.image_size={SIZE}", *overrides],
                      check_paths=False, world_size=1)
    seed_everything(0)
    profile = resolve_device_profile(cfg, "cpu", {PROFILE_ENV: emulate})
    return SPNetStep(cfg, build_model(cfg), torch.device("cpu"), world_size=1, steps_per_epoch=100, profile=profile)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def engine_hooks(module: torch.nn.Module) -> int:
    return sum(len(getattr(m, name)) for m in module.modules()
               for name in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_training_step_never_synchronises_the_device(stage, precision):
    # Issue 6 findings 3-4: DeepSpeed's synchronized throughput timer and the teacher's copied
    # engine hooks made 3 accelerator.synchronize() calls per step (the timer starts after 2 steps).
    # Issue 19 finding 2: at ZeRO 1/2 DeepSpeed's step read is_invalid_grad_norm() with
    # bool(tensor) every step (1 per step, the check compute_grad_norm=false removes). Expected
    # now: no call of any kind in HostSyncCounter's lists, at every stage and precision.
    step = make_step(f"engine.zero_stage={stage}", f"engine.precision={precision}", "teacher.execution=masked")
    images, targets = batch()
    for _ in range(3):  # past the timer's start_step
        step(images, targets)
    with HostSyncCounter() as syncs:
        for _ in range(3):
            step(images, targets)
    assert dict(syncs.counts) == {}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_training_step_never_synchronises_the_device_on_two_ranks():
    # ZeRO 1/2 with 2 ranks partition the gradients and reduce them across ranks (1 rank takes
    # shortcuts): count the step there too, on every rank.
    done = run_torchrun(WORKERS / "step_syncs.py", 2, ["bf16"], timeout=900)
    # Searched, not split by line: the two ranks share one pipe, and another process's output
    # without a newline (DeepSpeed's log lines) can land in front of a rank's line.
    lines = re.findall(r"SYNCS (\d+) (\d+) (\{[^}]*\})", done.stdout)
    assert sorted((int(rank), int(stage)) for rank, stage, _ in lines) == [(r, s) for r in (0, 1) for s in (0, 1, 2)]
    assert {(rank, stage): json.loads(counts) for rank, stage, counts in lines if json.loads(counts)} == {}


@pytest.mark.parametrize("overrides,per_step", [
    (["engine.zero_stage=0", "engine.clip_grad=1.0"], {}),  # clip_grad_norm_ on the device
    (["engine.zero_stage=1", "engine.clip_grad=1.0"], {"bool": 2}),
    (["engine.zero_stage=2", "engine.clip_grad=1.0"], {"bool": 2}),
    (["engine.zero_stage=1", "engine.precision=fp16"], {"bool": 1, "item": 1}),
    (["engine.zero_stage=2", "engine.precision=fp16"], {"bool": 1, "item": 1}),
], ids=["zero0-clip", "zero1-clip", "zero2-clip", "zero1-fp16", "zero2-fp16"])
def test_what_clipping_and_fp16_cost_per_step(overrides, per_step):
    # The documented price of the two features that need DeepSpeed's gradient norm
    # (engine.needs_grad_norm; docs/library-facts.md): ZeRO 1/2 read is_invalid_grad_norm() in
    # step() and, when clipping, again in unscale_and_clip_grads(); fp16's GradScaler reads found_inf.
    step = make_step(*overrides, "teacher.execution=masked")
    images, targets = batch()
    for _ in range(3):
        step(images, targets)
    with HostSyncCounter() as syncs:
        for _ in range(3):
            step(images, targets)
    assert dict(syncs.counts) == {k: 3 * v for k, v in per_step.items()}


def test_teacher_carries_none_of_the_engines_hooks():
    # Finding 3: copy.deepcopy(engine.module) copied DeepSpeed's forward pre/post hooks.
    step = make_step()
    assert engine_hooks(step.model) >= 2  # the engine's prologue/epilogue on the student
    assert engine_hooks(step.teacher.module) == 0
    calls = []
    step.engine._forward_prologue = lambda *a, **k: calls.append("prologue")  # would be reached via the hook
    step.teacher(batch()[0])
    assert calls == []


def test_teacher_execution_path_is_a_config_choice():
    # Finding 5: the eval-mode teacher's skip path costs a nonzero() host sync per block.
    images, targets = batch()
    for choice, mode, nonzeros in (("masked", "masked", 0), ("skip", "skip", 9), ("auto", "skip", 9)):
        step = make_step(f"teacher.execution={choice}", "teacher.forward_mode=eval")  # only eval mode skips
        assert execution_plan(step.teacher.module).mode == mode
        assert not isinstance(step.model, InferenceResNet)  # the student never skips: its plain class
        with HostSyncCounter(patch_accelerator=False) as syncs:
            step.teacher(images)
        assert syncs.counts["nonzero"] == nonzeros  # ResNet-20: 9 gated blocks
    # a train-mode teacher never skips (training mode runs the masked forward): it stays the plain model
    assert not isinstance(make_step("teacher.execution=skip", "teacher.forward_mode=train").teacher.module,
                          InferenceResNet)


def test_skip_and_masked_teachers_give_the_same_outputs():
    step = make_step("teacher.execution=masked", "teacher.forward_mode=eval")
    images = batch()[0]
    masked = step.teacher(images)
    set_execution(step.teacher.module, "skip")
    skipped = step.teacher(images)
    torch.testing.assert_close(skipped.logits, masked.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(skipped.gate_decisions, masked.gate_decisions)


def test_an_fp16_overflow_step_is_not_counted(tiny_config):
    # Finding 7: with fp16 and ZeRO 1/2 DeepSpeed skips an overflow step (scheduler not stepped);
    # the trainer still counted it and moved the teacher.
    trainer = training.Trainer(tiny_config("engine.precision=fp16", "engine.zero_stage=1", "engine.global_batch_size=8",
                                        "schedule.warmup_epochs=0.5"))
    images, targets = batch()
    images = images[:, :, :8, :8]
    _, applied = trainer.train_step(images, targets)
    assert applied and trainer.state.step == 1 and trainer.teacher.num_updates == 1
    lr = trainer.scheduler.get_last_lr()[0]
    teacher_before = [t.clone() for t in trainer.teacher.module.parameters()]
    fc = trainer.model.fc.weight
    handle = fc.register_hook(lambda g: torch.full_like(g, float("inf")))  # an overflowing gradient
    _, applied = trainer.train_step(images, targets)
    handle.remove()
    assert trainer.engine.skipped_steps == 1 and not trainer.engine.was_step_applied()
    assert not applied and trainer.step_fn.skipped_steps == 1
    assert trainer.state.step == 1 and trainer.teacher.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.module.parameters()))
    assert trainer.scheduler.get_last_lr()[0] == lr  # the step that was not taken used no LR
    _, applied = trainer.train_step(images, targets)
    assert applied and trainer.state.step == 2 and trainer.teacher.num_updates == 2


def test_one_training_epoch_and_evaluation_name_the_device_of_every_tensor(tiny_config):
    # Finding 1 and the CPU guard: every tensor our train/eval code creates must name its device,
    # or the first CUDA run mixes devices (torch.stack of CUDA loss sums and CPU counters).
    trainer = training.Trainer(tiny_config("run.max_steps=2"))
    trainer.val_loader = [next(iter(trainer.val_loader))]  # one batch is enough to audit
    with DeviceAudit() as audit:
        trainer.train_epoch(0)
        trainer.evaluate()
    assert audit.violations == []


@pytest.mark.parametrize("world,overrides", [(1, ["engine.global_batch_size=1"]),
                                             (4, ["engine.global_batch_size=4"]),
                                             (2, ["engine.global_batch_size=4", "engine.grad_accum=2"])])
def test_cli_rejects_a_micro_batch_of_one_before_writing_anything(tmp_path, capsys, monkeypatch, world, overrides):
    # Acceptance 2: exit 2 with one line naming the field, before any file or process group.
    monkeypatch.setenv("WORLD_SIZE", str(world))
    out_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        training.cli(["--config", str(REPO_ROOT / "configs" / "demo.yaml"), *overrides, f"run.out_dir={out_dir}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spnet-train: error: ") or "error: " in err[-1]
    assert "engine.global_batch_size:" in err[-1] and "micro-batch of 1 per rank" in err[-1]
    assert not out_dir.exists()


def test_clamp_gradients_by_hand():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))  # no gradient: skipped
    a.grad = torch.tensor([-2.0, 0.3, 0.7])
    clamp_gradients_([a, b], 0.5)
    assert a.grad.tolist() == pytest.approx([-0.5, 0.3, 0.5])
    assert b.grad is None


@pytest.mark.slow
def test_masked_training_forward_compiles_as_one_graph():
    # engine.compile: the student's masked forward, Gumbel sampling included, is one graph with no
    # break (what torch.compile needs to fuse it); the eval skip path breaks at every nonzero().
    import torch._dynamo as dynamo

    model = build_model(load_config(REPO_ROOT / "configs" / "demo.yaml", [], check_paths=False, world_size=1)).train()
    explained = dynamo.explain(model)(torch.randn(4, 3, SIZE, SIZE))
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    set_execution(model.eval(), "skip")
    assert dynamo.explain(model)(torch.randn(4, 3, SIZE, SIZE)).graph_break_count >= model.num_blocks


# --------------------------------------------------------------------------------------------
# Issue 19, finding 1: channels_last batches, NCHW parameters (DeepSpeed's byte-view broadcast,
# ZeRO's flat views). Before: every stage crashed in deepspeed.initialize's _broadcast_model.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_channels_last_batches_train_with_nchw_parameters_at_every_zero_stage(stage):
    step = make_step(f"engine.zero_stage={stage}", emulate="cuda")  # channels_last: null -> on, as on CUDA
    assert step.profile.channels_last and step.memory_format == torch.channels_last
    convs = [m for m in step.model.modules() if isinstance(m, torch.nn.Conv2d)]
    seen = {"inputs": [], "grads": []}
    stem = convs[0].register_forward_pre_hook(lambda m, args: seen["inputs"].append(args[0]))
    hooks = [c.weight.register_hook(lambda g: seen["grads"].append(g.is_contiguous(memory_format=torch.channels_last)
                                                                   and not g.is_contiguous())) for c in convs]
    images, targets = batch()
    images = images.contiguous(memory_format=torch.channels_last)  # as the loaders emit it
    for _ in range(2):  # the second step runs on the parameters ZeRO 1/2 re-pointed into their flat buffer
        terms, applied = step(images, targets)
        assert applied and torch.isfinite(terms["total"])
    stem.remove()
    for hook in hooks:
        hook.remove()
    # the batch reaches the model as it came, not converted (no copy per step)
    assert all(x.data_ptr() == images.data_ptr() for x in seen["inputs"])
    for p in step.model.parameters():  # NCHW, as DeepSpeed's broadcast and ZeRO's views need
        assert p.is_contiguous() and (p.grad is None or p.grad.is_contiguous())
    # Measured: oneDNN returns every conv weight's gradient NHWC; AccumulateGrad copies it into the
    # parameter's NCHW strides (one weight-sized copy per conv per step, docs/training.md).
    assert len(seen["grads"]) == 2 * len(convs) and all(seen["grads"])


# --------------------------------------------------------------------------------------------
# Issue 19, finding 3: evaluation and the teacher never run the compiled student, and an
# evaluation does not make the next training step recompile.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluation_between_compiled_training_steps_adds_no_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # the eval-mode teacher skips on a CPU: were it compiled, each nonzero() would break its graph
    step = make_step("engine.compile=true", "teacher.forward_mode=eval", "teacher.execution=skip",
                     emulate="cuda:eager")
    assert step.profile.compile_backend == "eager"
    assert step.model._compiled_call_impl is not None  # the student is compiled in place ...
    assert step.teacher.module._compiled_call_impl is None  # ... its copy, the teacher, is not
    images, targets = batch()
    step(images, targets)
    step(images, targets)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and not counters["graph_break"]  # the masked training forward: one graph
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(5, 3, SIZE, SIZE, generator=g), targets[:5]), (images, targets)]  # two batch sizes
    macs = profile_macs(step.model, (SIZE, SIZE))
    record = evaluate(step.model, loader, macs, torch.device("cpu"), step.autocast,
                      skip_strategy=step.profile.eval_skip_strategy)
    assert record["images"] == BATCH + 5
    terms, applied = step(images, targets)
    assert applied
    # Before: the skip path was traced in evaluation (a break at every nonzero(), a graph per
    # batch size): 12 more graphs here, 22 breaks and the recompile limit on ResNet-50.
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    assert not counters["recompiles"]
