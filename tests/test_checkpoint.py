"""spnet_dist.checkpoint without training: sealing, validation, pruning, resume rules, RNG, signals."""
import json
import os
import random
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from spnet_dist import checkpoint as C
from spnet_dist.config import Config, save_config, to_dict

from .dist_helpers import REPO_ROOT, child_env


def _fake_checkpoint(ckpt_dir, step, payload=b"weights"):
    """What every rank would have written into the temporary directory, then sealed."""
    tag = C.step_tag(step)
    tmp = ckpt_dir / C.tmp_dir_name(tag)
    tmp.mkdir(parents=True)
    (tmp / "mp_rank_00_model_states.pt").write_bytes(payload * 100)
    C.write_json(tmp / C.STATE_FILE, {"train_state": {"epoch": 0, "step": step}, "config": to_dict(Config())})
    C.write_json(tmp / C.rank_file(0), {"loader": {}})
    return C.publish(ckpt_dir, tmp, tag, step)


def test_publish_seals_renames_and_points_latest_last(tmp_path):
    ckpt = tmp_path / "checkpoints"
    path = _fake_checkpoint(ckpt, 4)
    assert path == ckpt / "step_00000004" and not list(ckpt.glob(".tmp-*"))
    assert (ckpt / C.LATEST).read_text() == "step_00000004"
    marker = json.loads((path / C.MARKER).read_text())
    assert set(marker["files"]) == {"mp_rank_00_model_states.pt", C.STATE_FILE, C.rank_file(0)}
    C.validate_checkpoint(path)
    assert C.resolve_checkpoint(tmp_path) == path


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker", "missing_file"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage):
    ckpt = tmp_path / "checkpoints"
    older = _fake_checkpoint(ckpt, 4)
    newest = _fake_checkpoint(ckpt, 8)
    states = newest / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        states.write_bytes(states.read_bytes()[:10])
    elif damage == "flip":
        states.write_bytes(b"X" + states.read_bytes()[1:])
    elif damage == "no_marker":
        (newest / C.MARKER).unlink()
    else:
        states.unlink()
    with pytest.raises(C.CheckpointError, match="step_00000008"):
        C.validate_checkpoint(newest)
    with pytest.warns(UserWarning, match="step_00000008"):
        assert C.resolve_checkpoint(tmp_path) == older
    with pytest.raises(C.CheckpointError, match="step_00000008"):
        C.resolve_checkpoint(tmp_path, "step_00000008")


def test_resolve_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(C.CheckpointError, match="no checkpoints/ directory") as err:
        C.resolve_checkpoint(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(C.CheckpointError, match="no complete checkpoint"):
        C.resolve_checkpoint(tmp_path)


def test_prune_keeps_newest_and_aliased_and_republish_replaces(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(ckpt, step)
    C.point_alias(ckpt, "best", "step_00000002")
    assert C.prune(ckpt, keep=2) == ["step_00000001", "step_00000003"]
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == \
        ["step_00000002", "step_00000004", "step_00000005"]
    assert C.resolve_checkpoint(tmp_path, "best") == (ckpt / "step_00000002").resolve()
    # An attempt that stopped at step 5 before saves step 5 again: the new content wins, sealed.
    _fake_checkpoint(ckpt, 5, payload=b"other")
    C.validate_checkpoint(ckpt / "step_00000005")
    assert b"other" in (ckpt / "step_00000005" / "mp_rank_00_model_states.pt").read_bytes()


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _fake_checkpoint(ckpt, 1)
    (ckpt / ".tmp-step_00000002").mkdir()
    (ckpt / ".tmp-step_00000002" / "half.pt").write_bytes(b"x")
    assert C.remove_leftovers(ckpt) == [".tmp-step_00000002"]
    assert C.resolve_checkpoint(tmp_path).name == "step_00000001"


def test_config_differences_lists_only_unsafe_fields():
    a, b = Config(), Config()
    b.schedule.epochs, b.data.root, b.run.log_every, b.engine.timeout_min = 400, "/elsewhere", 7, 1.0
    assert C.config_differences(to_dict(a), to_dict(b)) == []
    b.optim.lr, b.run.seed = 0.2, 3
    assert C.config_differences(to_dict(a), to_dict(b)) == ["optim.lr: 0.1 -> 0.2", "run.seed: 0 -> 3"]
    a.schedule.kind = c_kind = "cosine"
    b = Config()
    b.schedule.kind, b.schedule.epochs = c_kind, 10  # a cosine schedule's length is its shape
    assert C.config_differences(to_dict(a), to_dict(b)) == ["schedule.epochs: 320 -> 10"]


def test_plan_resume_rules(tmp_path):
    out = tmp_path / "run"
    cfg = Config()
    assert C.plan_resume(out, "auto", to_dict(cfg)).checkpoint is None  # empty: fresh
    out.mkdir()
    save_config(cfg, out / "config.yaml")  # a run that died in set-up
    plan = C.plan_resume(out, "auto", to_dict(cfg))
    assert plan.checkpoint is None and plan.existing
    with pytest.raises(FileExistsError, match="run.out_dir"):
        C.plan_resume(out, "never", to_dict(cfg))
    other = Config()
    other.loss.beta = 0.0
    with pytest.raises(C.ResumeMismatch, match=r"loss.beta: 0.5 -> 0.0"):
        C.plan_resume(out, "auto", to_dict(other))
    ckpt = _fake_checkpoint(out / "checkpoints", 3)
    assert C.plan_resume(out, "auto", to_dict(cfg)).checkpoint == ckpt
    assert C.plan_resume(out, "step_00000003", to_dict(cfg)).checkpoint == ckpt.resolve()
    elsewhere = _fake_checkpoint(tmp_path / "other" / "checkpoints", 3)
    with pytest.raises(C.CheckpointError, match="run.resume: .* not inside"):
        C.plan_resume(out, str(elsewhere), to_dict(cfg))


def test_truncate_metrics_keeps_records_the_checkpoint_contains(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "step": 10 * e}) + "\n" for e in (1, 2, 3)) + '{"epo')
    assert C.truncate_metrics(path, epoch=2, step=25) == 2  # epoch 3 and the torn line
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]


def test_rng_round_trips_through_json():
    state = json.loads(json.dumps(C.capture_rng(torch.device("cpu"))))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    C.restore_rng(state, torch.device("cpu"))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_signal_handlers_only_record_and_are_restored():
    previous = signal.getsignal(signal.SIGUSR2)
    stop = C.StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested == signal.SIGUSR2
        os.kill(os.getpid(), signal.SIGTERM)  # first SIGTERM: a stop request too, not an exit
        assert stop.requested == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR2) is previous


def test_second_sigterm_exits_at_once():
    code = ("import os, signal, time\n"
            "from spnet_dist.checkpoint import StopSignals\n"
            "s = StopSignals().install()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "assert s.requested == signal.SIGTERM\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(30)\n"
            "print('still alive')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "still alive" not in proc.stdout
