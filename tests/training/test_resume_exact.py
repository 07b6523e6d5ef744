"""Kill-anywhere exactness: a run stopped anywhere and restarted with the same command ends
bit-identical (student, teacher, metrics.jsonl) to the uninterrupted run (CPU, fp32,
run.deterministic=true). One uninterrupted reference run is shared by every stop point.

Digits at 8x8 px, global batch 128: 11 optimizer steps per epoch, 3 epochs, a checkpoint every
4 steps, 2 kept. Intra-op threads are pinned to 1 here and in the worker process (CPU fp32
reductions depend on the thread count).
"""
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from spnet_dist import checkpoint as C
from spnet_dist import distributed as D
from spnet_dist import training
from spnet_dist.config import load_config

from ..conftest import CALIBRATED, REPO_ROOT, tiny_overrides
from ..dist_helpers import WORKERS, child_env
from ..resume_hooks import interruptions

pytestmark = pytest.mark.slow

DEMO = REPO_ROOT / "configs" / "demo.yaml"
RUN = ["engine.global_batch_size=128", "schedule.epochs=3", "run.max_steps=null", "run.deterministic=true",
       "run.checkpoint_every=4", "run.keep_checkpoints=2", "run.stop_check_every=1", "run.tensorboard=false",
       "run.log_every=100", CALIBRATED]


def _cfg(digits_root, out_dir, *extra):
    return load_config(DEMO, tiny_overrides(digits_root, out_dir) + RUN + list(extra))


def _attempt(cfg, **hooks):
    """One attempt in this process, like a fresh process: returns (trainer, preempted)."""
    D.destroy()
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # set by the previous attempt's 1-rank group
        os.environ.pop(var, None)
    trainer = training.Trainer(cfg)
    try:
        with interruptions(**hooks):
            trainer.fit()
        return trainer, None
    except training.Preempted as err:
        return trainer, err
    finally:
        trainer._undo_deterministic()


def _records(out_dir):
    recs = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("images_per_sec")  # wall clock
    return recs


def _weights(trainer):
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for k, v in trainer.teacher.module.state_dict().items()})


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(digits_root, tmp_path_factory, one_thread):
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(var, raising=False)
        out = tmp_path_factory.mktemp("reference") / "run"
        trainer, stopped = _attempt(_cfg(digits_root, out))
        assert stopped is None
        assert trainer.state.step == 33 and trainer.steps_per_epoch == 11
        student, teacher = _weights(trainer)
        D.destroy()
    return {"student": student, "teacher": teacher, "records": _records(out), "out": out}


def _assert_same_as_reference(reference, trainer, out_dir):
    student, teacher = _weights(trainer)
    assert student.keys() == reference["student"].keys()
    for key, value in reference["student"].items():
        assert torch.equal(student[key], value), f"student {key} differs"
    for key, value in reference["teacher"].items():
        assert torch.equal(teacher[key], value), f"teacher {key} differs"
    records = _records(out_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3]  # no gaps, no duplicates
    assert records == reference["records"]


# One run stopped at every point in turn, each attempt resuming the previous one's checkpoint:
# (id, hooks of the attempt, where it must stop). A fresh first attempt stops mid-epoch at step 1,
# the later ones stop in attempts that themselves resumed mid-epoch or at a boundary. Each stop
# used to be a run of its own (9 runs of 33 steps, 95 s of the default test run).
STOP_POINTS = [
    ("first-step", dict(signal_step=1), 1),
    ("mid-epoch", dict(signal_step=6), 6),
    ("last-step-of-epoch", dict(signal_step=11), 11),
    ("right-after-epoch-boundary", dict(signal_step=12), 12),
    ("during-evaluation", dict(eval_epoch=2), 22),
    ("sigterm", dict(signal_step=27, signum=signal.SIGTERM), 27),
    ("second-to-last-step", dict(signal_step=32), 32),
]
# run.stop_check_every=3: a signal after step 17 is seen at the check after step 18.
DEFERRED = [("deferred-check", dict(signal_step=17), 18)]


@pytest.mark.parametrize("stops,extra", [(STOP_POINTS, []), (DEFERRED, ["run.stop_check_every=3"])],
                         ids=["every-stop-point-in-turn", "deferred-check"])
def test_signal_stop_and_restart_is_bit_identical(reference, digits_root, tmp_path, own_process_group, stops, extra):
    out = tmp_path / "run"
    cfg = _cfg(digits_root, out, *extra)
    for name, hook, stopped_at in stops:
        trainer, stopped = _attempt(cfg, **hook)
        assert stopped is not None, f"{name}: the attempt was not preempted"
        assert trainer.state.step == stopped_at, name
        assert stopped.checkpoint == out / "checkpoints" / C.step_tag(stopped_at), name
        C.validate_checkpoint(stopped.checkpoint)
        # so far: a prefix of the reference's evaluations (no gaps, no duplicates)
        records = _records(out) if (out / "metrics.jsonl").exists() else []
        assert len(records) >= (stopped_at - 1) // 11, name
        assert records == reference["records"][:len(records)], name
    trainer, stopped = _attempt(cfg)
    assert stopped is None and trainer.state.step == 33
    _assert_same_as_reference(reference, trainer, out)
    ckpt = out / "checkpoints"
    assert C.resolve_checkpoint(out, "final").name == C.step_tag(33)
    assert (ckpt / "latest").read_text() == C.step_tag(33)
    assert C.resolve_checkpoint(out, "best").name in {C.step_tag(11), C.step_tag(22), C.step_tag(33)}


@pytest.mark.multiprocess
def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_one(reference, digits_root, tmp_path,
                                                                        own_process_group):
    import subprocess

    out = tmp_path / "run"
    overrides = tiny_overrides(digits_root, out) + RUN
    proc = subprocess.run([sys.executable, str(WORKERS / "resume_job.py"), "--config", str(DEMO),
                           "--kill-in-save-step", "11", *overrides],
                          env=child_env(), cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = out / "checkpoints"
    # Killed while sealing the epoch-end checkpoint, after epoch 1's evaluation was appended.
    assert (ckpt / ".tmp-step_00000011").is_dir()  # never became visible
    assert (ckpt / "latest").read_text() == C.step_tag(8)
    assert C.resolve_checkpoint(out).name == C.step_tag(8)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    trainer, stopped = _attempt(_cfg(digits_root, out))
    assert stopped is None
    assert not (ckpt / ".tmp-step_00000011").exists()  # the leftover was removed
    _assert_same_as_reference(reference, trainer, out)


def test_truncated_newest_checkpoint_is_named_skipped_and_the_run_still_exact(reference, digits_root, tmp_path,
                                                                             own_process_group, capfd):
    out = tmp_path / "run"
    cfg = _cfg(digits_root, out)
    trainer, stopped = _attempt(cfg, signal_step=14)
    assert stopped.checkpoint.name == C.step_tag(14)
    victim = stopped.checkpoint / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # e.g. a full disk
    capfd.readouterr()
    trainer, stopped = _attempt(cfg)
    err = capfd.readouterr().err
    assert "step_00000014" in err and "mp_rank_00_model_states.pt" in err  # named
    assert stopped is None
    _assert_same_as_reference(reference, trainer, out)
