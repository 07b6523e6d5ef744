"""spnet-train end to end in one process: the real entry point on the real digits data, under this
machine's device profile and under the CUDA profile emulated on the CPU (``device_profile``)."""
import json
import math
import os
import signal

import pytest
import torch

from spnet_dist import distributed as D
from spnet_dist import training
from spnet_dist.config import load_config
from spnet_dist.data import build_datasets, build_eval_loader
from spnet_dist.device_profile import PROFILE_ENV
from spnet_dist.execution import execution_plan
from spnet_dist.export import eval_model
from spnet_dist.export.writer import cli as export_cli
from spnet_dist.flops import profile_macs
from spnet_dist.losses import logits_loss, path_loss
from spnet_dist.models.from_config import build_model
from spnet_dist.training import trainer as trainer_module
from spnet_dist.training.signals import EXIT_PREEMPTED

from ..conftest import CALIBRATED, REPO_ROOT, tiny_overrides
from ..dist_helpers import assert_evaluation_matches, hand_evaluation
from ..resume_hooks import interruptions

pytestmark = pytest.mark.usefixtures("own_process_group")


def test_cli_runs_and_writes_the_run_directory(digits_root, tmp_path, capsys):
    # The CUDA profile's CLI run is test_one_rank_trains_resumes_exports_and_evaluates[cuda-on-cpu-1].
    out_dir = tmp_path / "run"
    training.cli(["--config", str(REPO_ROOT / "configs" / "demo.yaml"), *tiny_overrides(digits_root, out_dir)])
    printed = capsys.readouterr().out
    assert "device profile cpu: batches NCHW, teacher skip, evaluation gather" in printed
    assert "val top-1" in printed and "per-block rates" in printed  # the final table
    assert "step 2 " in printed and "\r" not in printed  # plain progress lines, no bar redraws
    assert (out_dir / "config.yaml").is_file()
    saved = load_config(out_dir / "config.yaml", check_paths=False)
    assert saved.run.max_steps == 6 and saved.data.image_size == 8
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    rec = records[0]
    for key in ("epoch", "step", "top1", "gmacs", "gmacs_paper", "exec_rates", "loss", "images_per_sec", "mac_ratio"):
        assert key in rec, key
    assert rec["step"] == 6 and rec["epoch"] == 1
    assert len(rec["exec_rates"]) == 9 and all(0.0 <= r <= 1.0 for r in rec["exec_rates"])
    assert set(rec["loss"]) == {"cls", "path", "logits", "evo", "cost", "total"}
    assert all(math.isfinite(v) for v in rec["loss"].values())
    assert rec["gmacs_paper"] == pytest.approx(2 * rec["gmacs"])
    assert rec["images"] == 360  # every validation image, once
    assert (rec["micro_batch"], rec["world_size"]) == (32, 1)  # what BatchNorm normalised over
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_trainer_updates_teacher_once_per_optimizer_step(tiny_config):
    cfg = tiny_config("engine.grad_accum=2", "run.max_steps=3")
    trainer = training.Trainer(cfg)
    record = trainer.fit()
    assert trainer.state.step == 3 == record["step"]
    assert trainer.teacher.num_updates == 3  # 6 micro-batches, 3 optimizer steps
    assert trainer.engine.global_steps == 3


def test_eval_record_matches_a_hand_evaluation_of_the_weights(tiny_config):
    cfg = tiny_config(CALIBRATED)
    trainer = training.Trainer(cfg)
    record = trainer.fit()
    model = build_model(cfg)
    model.load_state_dict(trainer.model.state_dict())
    assert record["gate_threshold"] != 0.0  # the demo has a cost loss: calibrated to its target
    model.set_gate_threshold(record["gate_threshold"])
    _, val_set = build_datasets(cfg.data)
    images, targets = (torch.cat(parts) for parts in zip(*build_eval_loader(val_set, 1000)))
    assert len(targets) == 360
    assert_evaluation_matches(record, hand_evaluation(model, images, targets, profile_macs(model, (8, 8))))


# --------------------------------------------------------------------------------------------
# Wiring of SPNetStep: the teacher comes from teacher.*, the criterion sees the teacher's output,
# BN buffers are averaged before the teacher update, once per optimizer step.
# --------------------------------------------------------------------------------------------


def test_teacher_is_built_from_the_teacher_section(tiny_config, tmp_path):
    # Every value differs from what a mix-up would give (optim.momentum is 0.8 here), and the
    # two Trainers swap every choice, so neither a default nor a constant can pass both.
    cfg = tiny_config("teacher.momentum=0.37", "teacher.forward_mode=train", "teacher.buffers=ema",
                      "optim.momentum=0.8")
    teacher = training.Trainer(cfg).teacher
    assert teacher.momentum == 0.37
    assert teacher.forward_mode == "train" and teacher.buffers == "ema"
    cfg = tiny_config("teacher.momentum=0.55", "teacher.forward_mode=eval", "teacher.buffers=copy",
                      f"run.out_dir={tmp_path / 'second'}")
    teacher = training.Trainer(cfg).teacher
    assert (teacher.momentum, teacher.forward_mode, teacher.buffers) == (0.55, "eval", "copy")


def test_step_hands_the_criterion_the_teachers_output(tiny_config):
    # Deterministic student (no Gumbel noise, no router dropout, fp32) and an
    # eval-mode teacher, so both outputs can be computed again outside the step.
    cfg = tiny_config("model.gumbel_noise=false", "model.router_dropout=0.0", "engine.precision=fp32",
                      "teacher.forward_mode=eval")
    trainer = training.Trainer(cfg)
    step = trainer.step_fn
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the teacher drifts away from the student, as after some training
        for p in step.teacher.module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    images, targets = next(iter(trainer.train_loader))
    step.model.train()
    with torch.no_grad():
        student_out = step.model(images)  # train-mode BN uses batch statistics: same output again
        teacher_out = step.teacher(images)
    expected_path = path_loss(student_out, teacher_out, cfg.loss.path_form)
    expected_logits = logits_loss(student_out, teacher_out, cfg.loss.logits_form)
    assert expected_path.item() > 1e-3 and expected_logits.item() > 1e-3  # the teacher really differs

    terms, stepped = trainer.train_step(images, targets)
    assert stepped
    torch.testing.assert_close(terms["path"], expected_path, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["logits"], expected_logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("forward_mode, buffers", [("eval", "copy"), ("train", "ema")])
def test_buffers_averaged_then_teacher_updated_once_per_optimizer_step(tiny_config, monkeypatch,
                                                                       forward_mode, buffers):
    cfg = tiny_config("engine.grad_accum=2", f"teacher.forward_mode={forward_mode}",
                      f"teacher.buffers={buffers}")
    trainer = training.Trainer(cfg)
    step = trainer.step_fn
    events: list[str] = []
    real_after, real_update = step._after_optimizer_step, step.teacher.update
    real_average, real_reduce = D.average_buffers_, D.all_reduce_mean_

    def after_optimizer_step():
        events.append("after_optimizer_step")
        real_after()

    def average_buffers_(module):
        averages_the_student = module is step.model  # (a bare assert would print both models)
        assert averages_the_student, "the student's buffers must be averaged, not another module's"
        events.append("average_student_buffers")
        real_average(module)
        # Stand in for the other ranks: the average moves the statistics. Under the copy rule
        # the teacher must end up with exactly these values, which it only can if it is
        # updated after the average.
        with torch.no_grad():
            for name, b in module.named_buffers():
                if b.is_floating_point():
                    b.fill_(float(events.count("average_student_buffers")))

    def update(student):
        events.append("teacher_update")
        real_update(student)

    def all_reduce_mean_(tensors):
        tensors = list(tensors)
        teacher_bufs = step.teacher.teacher_buffers()
        if len(tensors) == len(teacher_bufs) and all(a is b for a, b in zip(tensors, teacher_bufs)):
            events.append("average_teacher_buffers")
        real_reduce(tensors)

    monkeypatch.setattr(step, "_after_optimizer_step", after_optimizer_step)
    monkeypatch.setattr(step.teacher, "update", update)
    monkeypatch.setattr(D, "average_buffers_", average_buffers_)
    monkeypatch.setattr(D, "all_reduce_mean_", all_reduce_mean_)

    batches = iter(trainer.train_loader)
    stepped = [trainer.train_step(*next(batches))[1] for _ in range(4)]
    assert stepped == [False, True, False, True]  # grad_accum 2: 4 micro-batches, 2 optimizer steps
    per_step = ["after_optimizer_step", "average_student_buffers", "teacher_update"]
    if buffers == "ema":  # a train-mode teacher's own BN statistics drift per rank: averaged too
        per_step.append("average_teacher_buffers")
    assert events == per_step * 2
    assert step.teacher.num_updates == 2 and trainer.engine.global_steps == 2
    if buffers == "copy":
        for name, b in step.teacher.module.named_buffers():
            if b.is_floating_point():
                assert torch.equal(b, torch.full_like(b, 2.0)), f"teacher {name} missed the averaged buffers"


def test_baseline_config_trains_without_teacher(tiny_config):
    cfg = tiny_config("teacher.enabled=false", "loss.alpha=0", "loss.beta=0", "loss.stage_heads=false",
                      "loss.evo_strategy=none", "loss.cost_weight=0", "loss.target_rate=null")
    trainer = training.Trainer(cfg)
    record = trainer.fit()
    assert trainer.teacher is None
    assert set(record["loss"]) == {"cls", "total"}


def test_block_evolution_strategy_builds_block_aligners(tiny_config):
    trainer = training.Trainer(tiny_config("loss.evo_strategy=blocks_within_stage", "run.max_steps=2"))
    assert trainer.model.block_aligners is not None
    assert "evo" in trainer.fit()["loss"]


def test_bad_config_fails_before_anything_is_created(tmp_path, capsys):
    out_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        training.cli(["--config", str(REPO_ROOT / "configs" / "demo.yaml"), "engine.zero_stage=3", f"run.out_dir={out_dir}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "engine.zero_stage" in err
    assert not out_dir.exists()


def test_an_existing_run_directory_is_never_overwritten_with_resume_never(digits_root, tmp_path, capsys):
    # Was a FileExistsError traceback (exit 1): now one line naming the field, exit 2, nothing written.
    out_dir = tmp_path / "run"
    args = ["--config", str(REPO_ROOT / "configs" / "demo.yaml"), *tiny_overrides(digits_root, out_dir),
            "run.max_steps=2"]
    training.cli(args)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # left by the first run's 1-rank group
        os.environ.pop(var, None)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        training.cli([*args, "run.resume=never"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: run.out_dir: ") and "already holds a run" in err and "run.resume" in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()} == before


def test_a_multistep_schedule_with_warm_up_saves_its_checkpoints(tiny_config):
    # ChainedScheduler (multistep + warm-up) has no last_epoch: the first save used to raise.
    from spnet_dist import checkpoint as C

    cfg = tiny_config("schedule.kind=multistep", "schedule.epochs=2", "schedule.milestones=[1]",
                      "schedule.warmup_epochs=0.5", "run.max_steps=2", "run.checkpoint_every=1")
    trainer = training.Trainer(cfg)
    trainer.fit()
    ckpt = C.resolve_checkpoint(cfg.run.out_dir, "final")
    assert C.read_state(ckpt)["scheduler"]["class"] == "ChainedScheduler"
    assert (ckpt.parent / "step_00000001").is_dir()


@pytest.mark.parametrize("overrides", [["run.max_steps=3"], ["run.max_steps=null", "engine.global_batch_size=256"]],
                         ids=["stopped-mid-epoch", "whole-epoch"])
def test_at_most_one_dali_pipeline_is_alive_during_evaluation(tiny_config, overrides):
    # Issue 19 finding 6: the training loop stops at its step limit without exhausting the loader,
    # so the training pipeline lived until the next set_epoch while evaluate() built a second one
    # (on GPU ~4.5 GB of pinned host memory per rank).
    pytest.importorskip("nvidia.dali")
    from spnet_dist.data.dali import live_pipelines

    trainer = training.Trainer(tiny_config("data.backend=dali", "data.dali_device=cpu", *overrides))
    alive, val_loader = [], trainer.val_loader

    class Watched:
        def __len__(self):
            return len(val_loader)

        def __iter__(self):
            for batch in val_loader:
                alive.append(live_pipelines())
                yield batch

    trainer.val_loader = Watched()
    record = trainer.fit()
    assert record["images"] == 360 and alive and max(alive) == 1


def test_a_stop_requested_during_set_up_is_honoured_at_the_first_check(tiny_config, monkeypatch):
    # A SIGTERM while rank 0 lists the images (minutes on a network file system): submitit's own
    # handler only logs SIGTERM, so before the trainer's handlers the request was lost and the
    # preempted job ran on until SLURM killed it. Stand-in for submitit's handler: a recorder.
    from spnet_dist.training import trainer as trainer_module

    seen = []

    def recorder(signum, frame):
        seen.append(signum)

    submitits = signal.signal(signal.SIGTERM, recorder)
    real = trainer_module.build_loaders

    def build_loaders(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption during set-up
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_loaders", build_loaders)
    try:
        trainer = training.Trainer(tiny_config("run.stop_check_every=2", "run.checkpoint_every=0"))
        with pytest.raises(training.Preempted) as stop:
            trainer.fit()
        assert stop.value.signum == signal.SIGTERM and trainer.state.step == 2  # the first agreed check
        assert stop.value.checkpoint.name == "step_00000002"
        assert seen == []  # the trainer's handler had it, not the previous one
        assert signal.getsignal(signal.SIGTERM) is recorder  # put back at the end of fit()
    finally:
        signal.signal(signal.SIGTERM, submitits)


# --------------------------------------------------------------------------------------------
# Issue 19: the device profile end to end (findings 1 and 8, acceptance 2, bad device input)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
# One ZeRO stage per profile keeps the default run's time (ZeRO 2 runs in test_trainer_distributed.py;
# channels_last at every stage is tested per step in test_step.py).
@pytest.mark.parametrize("device_profile, stage", [("cpu", 0), ("cuda-on-cpu", 1)], indirect=["device_profile"])
def test_one_rank_trains_resumes_exports_and_evaluates(digits_root, tmp_path, capsys, device_profile, stage):
    # Acceptance 2 on one rank: channels_last asked for explicitly on the CPU, by default in the CUDA
    # profile. Before, deepspeed.initialize crashed in _broadcast_model ("stride(-1) must be 1").
    out = tmp_path / "run"
    layout = ["engine.channels_last=true"] if device_profile == "cpu" else []
    args = ["--config", str(REPO_ROOT / "configs" / "demo.yaml"), *tiny_overrides(digits_root, out), CALIBRATED,
            *layout, f"engine.zero_stage={stage}", "run.tensorboard=false", "run.stop_check_every=1"]
    with interruptions(signal_step=3), pytest.raises(SystemExit) as stopped:  # SLURM's warning after step 3
        training.cli(args)
    assert stopped.value.code == EXIT_PREEMPTED
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # left by the first attempt's 1-rank group
        os.environ.pop(var, None)
    training.cli(args)  # the requeued attempt: resumes mid-epoch from step 3
    printed = capsys.readouterr().out
    assert "resumed from step_00000003" in printed
    assert ("device profile cuda (emulated on cpu): batches NHWC, teacher masked, evaluation capacity"
            if device_profile == "cuda-on-cpu" else "device profile cpu: batches NHWC") in printed
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 6

    export_cli(["--run", str(out), "--out", str(tmp_path / "export")])
    eval_model.cli(["--model", str(tmp_path / "export"), "--data", str(digits_root), "--device", "cpu",
                    "--out", str(tmp_path / "report")])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for key in ("top1", "gmacs", "exec_rates", "images"):  # spnet-eval reproduces the trainer's evaluation
        assert report[key] == record[key], key


@pytest.mark.parametrize("device_profile, backend", [("cpu", "torchvision"), ("cuda-on-cpu", "torchvision"),
                                                     ("cuda-on-cpu", "dali")], indirect=["device_profile"])
def test_batches_arrive_in_the_profiles_layout_and_the_step_does_not_convert_them(tiny_config, device_profile,
                                                                                   backend):
    # Finding 8: the loaders got the raw engine.channels_last (null) and emitted NCHW, so every step
    # of a CUDA run converted the batch. Now both backends emit the profile's layout, train and val.
    trainer = training.Trainer(tiny_config(f"data.backend={backend}"))
    nhwc = device_profile == "cuda-on-cpu"
    assert trainer.profile.channels_last == nhwc
    for loader in (trainer.train_loader, trainer.val_loader):
        images, _ = next(iter(loader))
        assert images.is_contiguous(memory_format=torch.channels_last) == nhwc
        assert images.is_contiguous() != nhwc
    seen = []
    hook = trainer.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images, targets = next(iter(trainer.train_loader))
    trainer.train_step(images, targets)
    hook.remove()
    assert seen[0].data_ptr() == images.data_ptr()  # the step fed the batch as it came: no conversion


def test_the_trainer_uses_the_resolved_profile_not_the_raw_fields(tiny_config, monkeypatch):
    # One resolution: change every device-dependent field right after it was resolved; a consumer
    # that read a raw field (or resolved again) would follow the change.
    real = trainer_module.resolve_device_profile

    def resolve_then_change(cfg, *args, **kwargs):
        profile = real(cfg, *args, **kwargs)
        cfg.engine.channels_last = not profile.channels_last
        cfg.teacher.execution = "masked" if profile.teacher_execution == "skip" else "skip"
        cfg.engine.backend = "nccl"  # would fail on this CPU
        cfg.data.dali_device = "gpu"  # would fail with DALI on this CPU
        return profile

    monkeypatch.setattr(trainer_module, "resolve_device_profile", resolve_then_change)
    trainer = training.Trainer(tiny_config("teacher.forward_mode=eval", "data.backend=dali"))
    assert (trainer.profile.channels_last, trainer.profile.teacher_execution) == (False, "skip")
    assert trainer.step_fn.profile is trainer.profile and trainer.step_fn.memory_format == torch.contiguous_format
    assert execution_plan(trainer.teacher.module).mode == "skip"
    images, targets = next(iter(trainer.train_loader))
    assert images.is_contiguous()
    assert trainer.train_step(images, targets)[1]


def test_sync_bn_on_a_cpu_is_one_line_before_any_process_group_or_file(tmp_path, capsys, monkeypatch):
    # Was a ValueError traceback after config.yaml, data_files.json and tensorboard/ were written.
    groups = []
    monkeypatch.setattr(D, "init_distributed", lambda *a, **k: groups.append(a))
    out_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        training.cli(["--config", str(REPO_ROOT / "configs" / "demo.yaml"), "model.sync_bn=true",
                      f"run.out_dir={out_dir}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "error: model.sync_bn: SyncBatchNorm needs CUDA devices; set model.sync_bn=false (this rank computes on cpu)"
    assert not out_dir.exists() and groups == []
    # The CUDA profile accepts it (on a CPU it cannot be applied: BatchNorm stays plain).
    monkeypatch.setenv(PROFILE_ENV, "cuda")
    assert trainer_module.resolve_device_profile(load_config(REPO_ROOT / "configs" / "demo.yaml", ["model.sync_bn=true"],
                                                             check_paths=False)).sync_bn


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_a_short_fashion_run_holds_its_target_at_evaluation(tmp_path, target):
    # Issue 20: the shipped SP-Net recipe (teacher, stage heads, L_evo) with its default calibrated
    # evaluation executes the requested share of blocks on the validation split it calibrates on and,
    # at the same threshold, on the test split it never reads; the paper's rule is recorded beside it.
    from ..data.helpers import make_fashion_mnist

    root = make_fashion_mnist(tmp_path / "fm", n_train=160, n_test=80)
    run = tmp_path / "run"
    cfg = load_config(REPO_ROOT / "configs" / "fashion" / "spnet.yaml", [
        f"data.root={root}", f"run.out_dir={run}", "data.image_size=8", "data.val_size=80", "data.train_subset=null",
        "data.eval_batch_size=40", "engine.global_batch_size=20", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "run.max_steps=3", "run.progress=log", "run.path_probe_size=0", f"loss.target_rate={target}"])
    assert cfg.model.gate_calibration == "target"  # the user default, not a test override
    record = training.Trainer(cfg).fit()
    assert record["calibration_converged"]
    assert abs(record["exec_rate"] - target) <= 0.03, record["exec_rate"]
    assert abs(record["test_exec_rate"] - target) <= 0.03, record["test_exec_rate"]
    assert record["gate_threshold"] != 0.0 and "test_paper_rule_exec_rate" in record
