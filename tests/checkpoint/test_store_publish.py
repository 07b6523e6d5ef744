"""spnet_dist.checkpoint.store.publish when the save does not finish: a failed rename, a kill at
any filesystem step. DeepSpeed's ``latest`` pointer must only ever name a sealed checkpoint, the
previous checkpoints must stay intact, and the next start must resume from a sealed one.
"""
import errno
import os
from pathlib import Path

import pytest

from spnet_dist import checkpoint as C
from spnet_dist.checkpoint.layout import is_leftover
from spnet_dist.config import Config, save_config, to_dict

from .helpers import fake_checkpoint

NEW = "step_00000008"


class _Killed(BaseException):
    """The process died here (a BaseException: no ``except Exception`` of the code under test catches it)."""


def _failing_rename(monkeypatch, target: str):
    """Make every rename/replace onto ``target`` fail as a full or broken disk would (EIO)."""
    real_rename, real_replace = os.rename, os.replace

    def fail_onto_target(real):
        def call(src, dst, *args, **kwargs):
            if Path(dst).name == target:
                raise OSError(errno.EIO, f"injected I/O error renaming onto {target}")
            return real(src, dst, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "rename", fail_onto_target(real_rename))
    monkeypatch.setattr(os, "replace", fail_onto_target(real_replace))


def _latest(ckpt: Path) -> str:
    return (ckpt / C.LATEST).read_text().strip()


def test_a_publish_whose_rename_fails_leaves_latest_on_the_previous_sealed_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    cfg = Config()
    cfg.engine.zero_stage = 0  # what fake_checkpoint writes
    save_config(cfg, run / "config.yaml")
    previous = fake_checkpoint(ckpt, 4)
    with monkeypatch.context() as mp:
        _failing_rename(mp, NEW)
        with pytest.raises(OSError, match="injected"):
            fake_checkpoint(ckpt, 8)
    # DeepSpeed's own pointer names the previous, sealed checkpoint, not the one never published.
    assert _latest(ckpt) == previous.name
    C.validate_checkpoint(ckpt / _latest(ckpt))
    assert not (ckpt / NEW).exists()
    # The next start removes the unpublished directory and resumes from the previous checkpoint,
    # without a warning: nothing points at a checkpoint that does not exist.
    assert C.remove_leftovers(ckpt) == [C.tmp_dir_name(NEW)]
    plan = C.plan_resume(run, "auto", to_dict(cfg))
    assert plan.checkpoint == previous and plan.notes == []
    assert C.resolve_checkpoint(run) == previous
    # ... and the save of that step, tried again, publishes normally.
    assert fake_checkpoint(ckpt, 8) == ckpt / NEW and _latest(ckpt) == NEW


@pytest.fixture
def no_fsync(monkeypatch):
    """fsync as a no-op: durability is not what these in-process kills test, and it costs seconds."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def _filesystem_steps(monkeypatch, kill_at: int | None) -> list[str]:
    """Count (and with ``kill_at``, die at) the renames and fsyncs publish makes, in order."""
    calls: list[str] = []

    def wrap(name, real):
        def call(*args, **kwargs):
            calls.append(name)
            if kill_at is not None and len(calls) == kill_at:
                raise _Killed(f"killed at {name} #{kill_at}")
            return real(*args, **kwargs)
        return call

    for name in ("rename", "replace", "fsync"):
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    return calls


def _steps_of_one_publish(tmp_path, monkeypatch, republish: bool) -> int:
    ckpt = tmp_path / "count" / "checkpoints"
    fake_checkpoint(ckpt, 4)
    if republish:
        fake_checkpoint(ckpt, 8)
    with monkeypatch.context() as mp:
        calls = _filesystem_steps(mp, None)
        fake_checkpoint(ckpt, 8, payload=b"second")
    assert "rename" in calls and calls.count("fsync") > 3
    return len(calls)


@pytest.mark.usefixtures("no_fsync")
@pytest.mark.parametrize("republish", [False, True], ids=["new-tag", "same-tag-again"])
def test_a_kill_at_any_step_of_publish_never_leaves_latest_naming_an_unsealed_checkpoint(tmp_path, monkeypatch,
                                                                                       republish):
    """A kill before the last step of publish, at each rename/replace/fsync in turn.

    ``same-tag-again``: an earlier attempt had saved the same step (the old directory is moved
    aside while the new one takes its name).
    """
    steps = _steps_of_one_publish(tmp_path, monkeypatch, republish)
    for kill_at in range(1, steps + 1):
        run = tmp_path / f"kill{kill_at}"
        ckpt = run / "checkpoints"
        older = fake_checkpoint(ckpt, 4)
        old_payload = None
        if republish:
            old_payload = (fake_checkpoint(ckpt, 8) / C.MODEL_STATES).read_bytes()
        with monkeypatch.context() as mp:
            _filesystem_steps(mp, kill_at)
            with pytest.raises(_Killed):
                fake_checkpoint(ckpt, 8, payload=b"second")
        where = f"killed at filesystem step {kill_at} of {steps}"
        # At the moment of the kill: DeepSpeed's pointer names a sealed checkpoint.
        pointed = _latest(ckpt)
        if (ckpt / pointed).is_dir():
            C.validate_checkpoint(ckpt / pointed)
        else:
            # Only while an older checkpoint of the same tag is moved aside (one rename apart):
            # the next start puts it back (below).
            assert republish and pointed == NEW, where
        # The next start: leftovers removed, every sealed step kept.
        C.remove_leftovers(ckpt)
        assert not [p.name for p in ckpt.iterdir() if is_leftover(p.name)], where
        C.validate_checkpoint(ckpt / _latest(ckpt))
        found = C.resolve_checkpoint(run)
        C.validate_checkpoint(older)  # the previous checkpoints are untouched
        if republish:
            # The step saved before is never lost: the old or the new content, sealed.
            assert found.name == NEW, where
            assert (found / C.MODEL_STATES).read_bytes() in (old_payload, b"second" * 100), where
        else:
            assert found.name in (older.name, NEW), where  # `latest` may lag until the next save


@pytest.mark.slow
def test_a_training_whose_checkpoint_rename_fails_resumes_from_the_previous_one(tiny_config, own_process_group,
                                                                                 monkeypatch, capsys):
    """The real trainer: the save of step 4 fails at its rename (EIO); the run stops with the
    error; DeepSpeed's ``latest`` still names step 2 (its own consolidation tool follows it) and
    the same command resumes from step 2 and finishes."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from spnet_dist import distributed as D
    from spnet_dist.training import Trainer

    cfg = tiny_config("engine.zero_stage=1", "run.checkpoint_every=2", "run.tensorboard=false")
    ckpt = Path(cfg.run.out_dir) / "checkpoints"

    def attempt():
        D.destroy()
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # left by the previous attempt's 1-rank group
            os.environ.pop(var, None)
        trainer = Trainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer._undo_deterministic()
        return trainer

    with monkeypatch.context() as mp:
        _failing_rename(mp, "step_00000004")
        with pytest.raises(OSError, match="injected"):
            attempt()
    assert _latest(ckpt) == "step_00000002"
    C.validate_checkpoint(ckpt / "step_00000002")
    weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))  # tag=None: DeepSpeed reads `latest`
    assert "fc.weight" in weights
    capsys.readouterr()
    trainer = attempt()
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "step_00000002" in printed
    assert "removed" in printed and C.tmp_dir_name("step_00000004") in printed
    assert trainer.state.step == 6
    assert C.resolve_checkpoint(cfg.run.out_dir, "final").name == "step_00000006" == _latest(ckpt)
