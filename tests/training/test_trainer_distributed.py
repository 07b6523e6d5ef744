"""spnet-train on 2 CPU ranks (gloo, ZeRO-2) under torchrun and the deepspeed launcher."""
import json
import re
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from spnet_dist.config import load_config
from spnet_dist.data import build_datasets, build_eval_loader
from spnet_dist.flops import profile_macs
from spnet_dist.models.from_config import build_model
from spnet_dist.training.reproducibility import seed_everything

from ..conftest import CALIBRATED, REPO_ROOT, tiny_overrides
from ..dist_helpers import (WORKERS, assert_evaluation_matches, free_port, hand_evaluation, run_command,
                           run_deepspeed, run_torchrun, run_torchrun_nodes)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")


def _job(digits_root, out_dir, *overrides):
    out_dir.mkdir(parents=True, exist_ok=True)
    return ["--config", DEMO, "--out", str(out_dir), *tiny_overrides(digits_root, out_dir / "run"), *overrides]


@pytest.mark.parametrize(
    "teacher, device_profile",
    # the paper's teacher (default) as a CUDA rank runs it (masked), under the CUDA profile
    [(("teacher.forward_mode=eval", "teacher.buffers=copy"), "cuda-on-cpu"),
     (("teacher.forward_mode=train", "teacher.buffers=ema"), "cpu")],  # official code: BN stats drift per rank
    ids=["eval-copy", "train-ema"], indirect=["device_profile"],
)
def test_two_ranks_zero2_teacher_bit_identical_and_eval_matches_a_hand_evaluation(digits_root, tmp_path, teacher,
                                                                                  device_profile):
    out = tmp_path / "job"
    run_torchrun(WORKERS / "spnet_job.py", 2,
                 ["fit", *_job(digits_root, out, CALIBRATED, "engine.zero_stage=2", "run.max_steps=20", *teacher)],
                 timeout=600)
    t0, t1 = load_file(str(out / "teacher_rank0.safetensors")), load_file(str(out / "teacher_rank1.safetensors"))
    assert t0.keys() == t1.keys()
    assert any("running_mean" in k for k in t0)  # buffers are compared too
    for key in t0:
        assert torch.equal(t0[key], t1[key]), f"teacher differs across ranks at {key}"
    s0, s1 = load_file(str(out / "student_rank0.safetensors")), load_file(str(out / "student_rank1.safetensors"))
    for key in s0:
        assert torch.equal(s0[key], s1[key]), f"student differs across ranks at {key}"

    record = json.loads((out / "record.json").read_text())
    assert record["step"] == 20
    cfg = load_config(DEMO, tiny_overrides(digits_root, out / "run"))
    model = build_model(cfg)
    model.load_state_dict(s0)
    model.set_gate_threshold(record["gate_threshold"])  # the calibrated rule the record was evaluated with
    _, val_set = build_datasets(cfg.data)
    images, targets = (torch.cat(parts) for parts in zip(*build_eval_loader(val_set, 1000)))
    assert_evaluation_matches(record, hand_evaluation(model, images, targets, profile_macs(model, (8, 8))))


def test_gradient_averaging_two_ranks_equals_accumulation_on_one(digits_root, tmp_path):
    # Deterministic step: no Gumbel noise, no router dropout, fp32. Rank r's micro-batch is the
    # r-th accumulation micro-batch of the single rank, so BatchNorm computes its batch
    # statistics over the same 8 samples in both runs.
    common = ["engine.global_batch_size=16", "model.gumbel_noise=false", "model.router_dropout=0.0",
              "engine.precision=fp32", "engine.zero_stage=2", "run.max_steps=1"]
    two, one = tmp_path / "two", tmp_path / "one"
    run_torchrun(WORKERS / "spnet_job.py", 2, ["grad", *_job(digits_root, two, *common, "engine.grad_accum=1")])
    run_torchrun(WORKERS / "spnet_job.py", 1, ["grad", *_job(digits_root, one, *common, "engine.grad_accum=2")])
    a, b = load_file(str(two / "student_rank0.safetensors")), load_file(str(one / "student_rank0.safetensors"))
    cfg = load_config(DEMO, tiny_overrides(digits_root, tmp_path / "x") + common)
    seed_everything(cfg.run.seed)  # the Trainer's initial weights
    init = build_model(cfg).state_dict()
    moved = 0
    for key, value in a.items():
        if not value.is_floating_point() or "running_" in key:
            continue  # BN statistics: averaged across ranks vs. updated twice in sequence
        assert (value - b[key]).abs().max().item() < 1e-5, key
        moved += not torch.equal(value, init[key])
    assert moved > 50  # the step really changed the weights


def test_deepspeed_launcher_runs_the_real_entry_point(digits_root, tmp_path):
    out = tmp_path / "ds"
    run_deepspeed("spnet_dist.train", 2, ["--config", DEMO, *tiny_overrides(digits_root, out),
                                          "engine.zero_stage=2", "run.max_steps=4"], timeout=600, module=True)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 4 and record["images"] == 360


def test_two_nodes_shard_data_by_global_rank(digits_root, tmp_path):
    # Two torchrun agents ("nodes") of one rank each: both ranks have LOCAL_RANK 0, so a trainer
    # that sharded by local rank would hand both the same samples.
    out = tmp_path / "nodes"
    run_torchrun_nodes(WORKERS / "spnet_job.py", 2, ["shards", *_job(digits_root, out, "engine.zero_stage=2")])
    ranks = json.loads((out / "shards.json").read_text())
    assert [(r["rank"], r["local_rank"], r["env_local_rank"]) for r in ranks] == [(0, 0, 0), (1, 0, 0)]
    train_size, val_size = ranks[0]["train_size"], ranks[0]["val_size"]
    assert (train_size, val_size) == (1437, 360)
    train0, train1 = (set(r["train"]) for r in ranks)
    # One epoch: each rank's shard is 1437 // 2 = 718 samples, read in whole micro-batches of
    # 32 / 2 = 16 (the last partial batch dropped): 44 x 16 = 704 distinct samples, none twice.
    per_rank = (train_size // 2) // 16 * 16
    assert len(ranks[0]["train"]) == len(train0) == per_rank and len(ranks[1]["train"]) == len(train1) == per_rank
    assert not train0 & train1, f"{len(train0 & train1)} training samples read by both ranks"
    val0, val1 = (r["val"] for r in ranks)
    assert not set(val0) & set(val1)
    assert sorted(val0 + val1) == list(range(val_size))  # every validation image exactly once


@pytest.mark.parametrize("step, error", [
    ("save_config", "PermissionError: [Errno 13] Permission denied: '{out}/config.yaml'"),
    ("scan", "OSError: [Errno 116] Stale file handle: '{root}/train'"),
    ("checkpoint", "OSError: [Errno 28] No space left on device: 'teacher.safetensors'"),
], ids=["save_config", "scan", "checkpoint"])
def test_a_rank_0_only_step_failure_ends_every_rank_with_the_same_error(digits_root, tmp_path, step, error):
    # Rank 0 alone prepares the run directory, lists the images, and writes and publishes a
    # checkpoint's shared files (teacher, state). Its failure must reach the other ranks at once:
    # they would otherwise wait in a collective for engine.timeout_min (30 min here, the default). Rank 0 stays alive after failing (as an NCCL peer seems to), so only
    # the delivered error can end rank 1; the 120 s guard fails the test if it does not.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKERS / "setup_failure.py"),
           "--config", DEMO, "--fail", step, *tiny_overrides(digits_root, out), "engine.timeout_min=30"]
    start = time.monotonic()
    done = run_command(cmd, timeout=120, check=False)  # a hang raises "timed out after 120s"
    failed = dict(re.findall(r"rank (\d) failed at ([\d.]+)", done.stdout))
    gap = abs(float(failed["1"]) - float(failed["0"])) if len(failed) == 2 else float("nan")
    print(f"{step} failure: the 2-rank job ended after {time.monotonic() - start:.1f} s, rank 1 raised "
          f"{gap:.2f} s after rank 0", file=sys.__stdout__)
    assert done.returncode != 0
    expected = error.format(out=out, root=digits_root)
    # Up to the next rank's line: the ranks share one pipe, so one's line can run into the other's.
    lines = sorted(set(re.findall(r"rank (\d) error: (.*?)(?=rank \d error: |$)", done.stdout, re.M)))
    assert lines == [("0", expected), ("1", expected)], done.stdout[-4000:]
    if step == "checkpoint":  # nothing half-written was published
        assert not list((out / "checkpoints").glob("step_*")), sorted((out / "checkpoints").iterdir())


@pytest.mark.parametrize("device_profile", ["cuda-on-cpu"], indirect=True)
def test_two_ranks_zero2_channels_last_trains_and_resumes(digits_root, tmp_path, device_profile):
    # Issue 19, acceptance 2 on 2 torchrun ranks at ZeRO 2, under the CUDA profile (the 2-rank runs
    # under the CPU profile are the tests above and tests/training/test_resume_distributed.py).
    # Before, both ranks crashed in deepspeed.initialize (_broadcast_model: "stride(-1) must be 1
    # to view Float as Byte").
    out = tmp_path / "run"
    overrides = [*tiny_overrides(digits_root, out), CALIBRATED, "engine.channels_last=true", "engine.zero_stage=2",
                 "run.tensorboard=false", "run.stop_check_every=1"]
    job = [str(WORKERS / "resume_job.py"), "--config", DEMO]
    # SIGUSR2 reaches rank 1 after step 3: both ranks save step 3 and stop (exit 75).
    stopped = run_torchrun(job[0], 2, [*job[1:], "--signal-step", "3", "--rank", "1", *overrides],
                           timeout=600, check=False)
    assert stopped.returncode != 0 and stopped.stdout.count("stopped by SIGUSR2") == 2, stopped.stdout[-4000:]
    resumed = run_torchrun(job[0], 2, [*job[1:], *overrides], timeout=600)
    assert "emulated on cpu): batches NHWC" in resumed.stdout and "step_00000003" in resumed.stdout, \
        resumed.stdout[-4000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 6 and record["images"] == 360  # the final evaluation, on both ranks' shards
