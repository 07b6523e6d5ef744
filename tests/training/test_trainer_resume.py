"""spnet-train on a directory that already holds a run: the README's resume rules, end to end."""
import json
import os
from pathlib import Path

import pytest
import torch

from spnet_dist import checkpoint as C
from spnet_dist import training
from spnet_dist.training import trainer as trainer_module
from spnet_dist.training.signals import EXIT_DIVERGED, EXIT_PREEMPTED

from ..conftest import REPO_ROOT, tiny_overrides
from ..resume_hooks import interruptions

pytestmark = [pytest.mark.usefixtures("own_process_group"), pytest.mark.slow]

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")


def _cli(digits_root, out_dir, *extra):
    """One attempt of the CLI as a fresh process would run it; returns its exit status."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # left by the previous attempt's 1-rank group
        os.environ.pop(var, None)
    try:
        training.cli(["--config", DEMO, *tiny_overrides(digits_root, out_dir), "run.tensorboard=false", *extra])
    except SystemExit as exit_:
        return exit_.code
    return 0


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_preempted_exit_status_unsafe_change_refused_safe_change_resumes(digits_root, tmp_path, capsys):
    out = tmp_path / "run"
    with interruptions(signal_step=2):
        assert _cli(digits_root, out, "run.stop_check_every=1") == EXIT_PREEMPTED
    assert "stopped by SIGUSR2" in capsys.readouterr().err
    assert C.resolve_checkpoint(out).name == "step_00000002"

    before = _snapshot(out)
    assert _cli(digits_root, out, "optim.lr=0.2", "loss.beta=0") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: run.resume:") and "optim.lr: 0.1 -> 0.2" in err and "loss.beta: 0.5 -> 0.0" in err
    assert _snapshot(out) == before  # nothing written, nothing lost

    assert _cli(digits_root, out, "run.log_every=3", "data.num_workers=0") == 0  # safe changes
    printed = capsys.readouterr().out
    assert "resumed from step_00000002" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 6)]
    assert C.resolve_checkpoint(out, "final").name == "step_00000006"


def test_a_run_that_died_during_set_up_starts_again_in_place(digits_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def node_lost(cfg):
        raise RuntimeError("node lost during set-up")

    with monkeypatch.context() as mp:
        mp.setattr(trainer_module, "build_model", node_lost)
        with pytest.raises(RuntimeError, match="node lost"):
            _cli(digits_root, out)
    assert (out / "config.yaml").is_file() and not (out / "checkpoints").exists()

    assert _cli(digits_root, out) == 0
    assert "holds a run without a checkpoint: starting it again from step 0" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 6)]

    # The same directory with a different model is not this run: refused before any work.
    assert _cli(digits_root, out, "model.router_hidden=16") == 2
    assert "model.router_hidden: 128 -> 16" in capsys.readouterr().err


def test_non_finite_losses_stop_the_run_with_the_last_good_checkpoint(digits_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = training.Trainer.train_step

    def poisoned(self, images, targets):  # from step 3 on the inputs are NaN: loss and weights too
        if self.state.step >= 2:
            images = torch.full_like(images, float("nan"))
        return original(self, images, targets)

    monkeypatch.setattr(training.Trainer, "train_step", poisoned)
    status = _cli(digits_root, out, "run.max_bad_steps=2", "run.stop_check_every=1", "run.checkpoint_every=2")
    assert status == EXIT_DIVERGED
    err = capsys.readouterr()
    assert "3 steps with a non-finite loss (run.max_bad_steps=2) by step 5" in err.err
    assert "step 4: non-finite losses since the last check; no checkpoint written" in err.out
    assert C.resolve_checkpoint(out).name == "step_00000002"  # sealed, valid, the newest
    assert not (out / "checkpoints" / "step_00000004").exists()


def test_tensorboard_drops_what_a_killed_attempt_logged_after_its_checkpoint(digits_root, tmp_path, monkeypatch):
    # A node is lost after step 3; the last checkpoint is step 2. The resumed attempt logs every
    # 2nd step (a safe change), so it never logs step 3 again: the dead attempt's step-3 values
    # must not stay in TensorBoard next to the resumed run's (TensorBoard's reader only drops
    # values whose step is logged again).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    original = training.Trainer.train_step

    def crash_after_step_3(self, images, targets):  # step 3 was logged; step 4 never happens
        if self.state.step == 3:
            raise RuntimeError("node lost")
        return original(self, images, targets)

    def cli(*extra):
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            os.environ.pop(var, None)
        training.cli(["--config", DEMO, *tiny_overrides(digits_root, out), "run.checkpoint_every=2", *extra])

    with monkeypatch.context() as mp:
        mp.setattr(training.Trainer, "train_step", crash_after_step_3)
        with pytest.raises(RuntimeError, match="node lost"):
            cli("run.log_every=1")
    assert C.resolve_checkpoint(out).name == "step_00000002"
    logged = EventAccumulator(str(out / "tensorboard"))
    logged.Reload()
    assert [e.step for e in logged.Scalars("train/total")] == [1, 2, 3]
    cli("run.log_every=2")
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per attempt
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/total")] == [1, 2, 4, 6]


def test_a_failed_set_up_leaves_deterministic_mode_as_it_found_it(digits_root, tmp_path, monkeypatch):
    # spnet-sweep and notebooks run several trainings in one process: run.deterministic of a
    # run whose set-up fails (here: a refused resume) must not stay switched on for the next.
    out = tmp_path / "run"

    def node_lost(cfg):
        raise RuntimeError("node lost during set-up")

    monkeypatch.setattr(trainer_module, "build_model", node_lost)
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="node lost"):
        _cli(digits_root, out, "run.deterministic=true")
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_run_preempted_after_its_last_checkpoint_gets_its_final_alias_on_resume(digits_root, tmp_path, capsys):
    # SIGUSR2 during the last evaluation: the epoch-end checkpoint is saved and the job stops
    # before `final` is pointed. The next attempt has nothing left to train and must point it.
    out = tmp_path / "run"
    with interruptions(eval_epoch=1):
        assert _cli(digits_root, out) == EXIT_PREEMPTED
    assert C.resolve_checkpoint(out).name == "step_00000006"
    assert not (out / "checkpoints" / "final").exists()
    assert _cli(digits_root, out) == 0
    assert C.resolve_checkpoint(out, "final").name == "step_00000006"
