"""Resume across attempts of a 2-rank job: world size 2 -> 1, and a rank that hangs mid-run.

Real torchrun jobs on 2 CPU ranks (gloo, ZeRO-2), digits at 8x8 px, a few steps.
"""
import sys
import time

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from spnet_dist import checkpoint as C
from spnet_dist import training
from spnet_dist.config import load_config
from spnet_dist.run_dir import RunDirectory

from ..conftest import REPO_ROOT, tiny_overrides
from ..dist_helpers import WORKERS, free_port, run_command

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
JOB = ["engine.zero_stage=2", "run.tensorboard=false", "run.stop_check_every=1", "run.checkpoint_every=2"]


def _torchrun(args, timeout=600):
    """A 2-rank torchrun job of the resume worker; returns (exit status, output, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(WORKERS / "resume_job.py"), "--config", DEMO, *args]
    start = time.monotonic()
    done = run_command(cmd, timeout=timeout, check=False)  # a timeout (a hang) raises
    return done.returncode, done.stdout, time.monotonic() - start


def test_world_size_two_to_one_resumes_by_the_documented_rule(digits_root, tmp_path, own_process_group, capsys):
    out = tmp_path / "run"
    overrides = tiny_overrides(digits_root, out) + JOB + ["run.max_steps=8"]
    # SIGUSR2 reaches rank 1 only: the ranks agree and both stop after step 5.
    code, log, _ = _torchrun(["--signal-step", "5", "--rank", "1", *overrides])
    assert code != 0 and log.count("stopped by SIGUSR2") == 2, log[-4000:]
    ckpt = C.resolve_checkpoint(out)
    assert ckpt.name == "step_00000005"
    assert {C.rank_file(0), C.rank_file(1)} <= {p.name for p in ckpt.iterdir()}

    # Next attempt on one rank (a requeue onto fewer nodes), in this process.
    cfg = load_config(DEMO, overrides)
    trainer = training.Trainer(cfg)
    try:
        printed = capsys.readouterr().out
        assert "world size 2 -> 1: SGD momentum restarts from zero" in printed
        # Finding 4: the requeue changes what every BatchNorm normalises over; it is said, not silent.
        assert ("warning: world size 2 -> 1 changes the micro-batch from 16 to 32 images per rank: every "
                "BatchNorm now normalises over 32 images instead of 16") in printed
        assert trainer.state.step == 5 and trainer.engine.global_steps == 5
        assert trainer.scheduler.last_epoch == 5  # the LR schedule continues where it stopped
        teacher = load_file(str(ckpt / C.TEACHER_FILE))
        for key, value in trainer.teacher.module.state_dict().items():
            assert torch.equal(value, teacher[key]), key
        assert trainer.teacher.num_updates == 5
        student = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        for key, value in trainer.model.state_dict().items():
            if value.is_floating_point():
                assert torch.equal(value, student[key]), key
        # Loader: 2 ranks x 5 micro-batches of 16 = the first 160 samples of the epoch's global
        # order, i.e. 5 micro-batches of 32 on one rank.
        assert trainer.train_loader.state_dict()["batches_seen"] == 5 == trainer.state.batch_in_epoch
        record = trainer.fit()
    finally:
        trainer._undo_deterministic()
    assert trainer.state.step == 8 and record["step"] == 8
    assert (record["micro_batch"], record["world_size"]) == (32, 1)  # and recorded in metrics.jsonl
    assert [(r["micro_batch"], r["world_size"]) for r in RunDirectory(out).read_metrics()] == [(32, 1)]
    assert C.resolve_checkpoint(out, "final").name == "step_00000008"


def test_a_hung_rank_ends_the_job_within_the_timeout_and_the_restart_resumes(digits_root, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = tiny_overrides(digits_root, out) + JOB + ["run.max_steps=8", "engine.timeout_min=0.25"]
    # Rank 1 stops dead (SIGSTOP) after step 3; rank 0 waits in its next collective.
    code, log, seconds = _torchrun(["--stop-self-step", "3", "--rank", "1", *overrides])
    print(f"hung-rank job ended after {seconds:.1f} s (timeout 15 s), exit status {code}", file=sys.__stdout__)
    assert code != 0, log[-4000:]
    # Rank 0 gave up in its next collective after engine.timeout_min (15 s), not torch's 30 min.
    assert "Timed out waiting 15000ms" in log, log[-4000:]
    assert C.resolve_checkpoint(out).name == "step_00000002"
    # The requeued job resumes from the last checkpoint and finishes.
    code, log, _ = _torchrun(["--save-weights", str(tmp_path / "w"), *overrides])
    assert code == 0, log[-4000:]
    assert "resuming from" in log and "step_00000002" in log
    assert C.resolve_checkpoint(out, "final").name == "step_00000008"
