"""spnet_dist.distributed: helpers without a group, a 1-rank plain process, and real multi-rank
jobs under torchrun and the deepspeed launcher (gloo on CPU)."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch
import torch.distributed as dist

from spnet_dist import distributed as D
from tests.dist_helpers import WORKERS, run_command, run_deepspeed, run_torchrun

_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_group(monkeypatch):
    """No process group and no launcher variables; whatever init_distributed sets is undone."""
    if dist.is_initialized():
        pytest.skip("a process group from another test module is still alive")
    for var in _LAUNCH_VARS:  # setenv first so the undo also removes what the test adds
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    yield
    D.destroy()


# --------------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------------


def test_helpers_are_safe_without_a_group(no_group):
    assert (D.get_rank(), D.get_local_rank(), D.get_world_size(), D.is_main_process()) == (0, 0, 1, True)
    D.barrier()
    D.destroy()
    t = torch.tensor([1.5, 2.5])
    D.all_reduce_mean_([t])
    D.broadcast_([t])
    D.average_buffers_(torch.nn.BatchNorm1d(2))
    assert torch.equal(t, torch.tensor([1.5, 2.5]))
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.count_rank_mismatches([t]) == 0
    with pytest.raises(TypeError, match="floating-point"):
        D.all_reduce_mean_([torch.tensor([1, 2])])


def test_run_on_main_without_a_group(no_group):
    # A plain process is rank 0 of one: the step runs and its error is raised as it is.
    assert D.run_on_main(lambda: 7, what="compute") == 7
    def write():
        raise PermissionError(13, "Permission denied", "/run/config.yaml")

    with pytest.raises(PermissionError):
        D.run_on_main(write, what="write")
    # Ranks simulated without a group (the data listing tests): rank 1 runs nothing.
    calls = []
    assert D.run_on_main(lambda: calls.append(1), what="compute", is_main=False) is None and calls == []


def test_resolve_backend():
    assert D.resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    assert D.resolve_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match="backend"):
        D.resolve_backend("mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            D.resolve_backend("nccl")


def test_init_distributed_plain_process(no_group):
    info = D.init_distributed()
    assert info == D.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert info.is_main and dist.is_initialized() and dist.get_backend() == "gloo"
    # DeepSpeed's engine reads LOCAL_RANK from the environment.
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
    assert D.init_distributed("auto") == info  # idempotent
    D.destroy()
    assert not dist.is_initialized()


def test_init_distributed_rejects_incomplete_launcher_env(no_group, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="LOCAL_RANK"):
        D.init_distributed()


# --------------------------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.slow
def test_collectives_bit_identical_on_three_ranks():
    """3 ranks (with 2, a + b == b + a hides any order dependence): all_reduce_mean_ on
    values whose float32 sum depends on the order, average_buffers_, broadcasts."""
    out = run_torchrun(WORKERS / "collectives.py", nproc=3, timeout=240).stdout
    # Ranks share one pipe, so their lines may interleave: search, do not split lines.
    assert sorted(re.findall(r"COLLECTIVES-OK rank=(\d+)", out)) == ["0", "1", "2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 plain process (no launcher), grad_accum 2 over the same global batches, ZeRO 0."""
    out = tmp_path_factory.mktemp("ref") / "ref.pt"
    run_command([sys.executable, str(WORKERS / "train.py"), "--out", str(out),
                 "--grad-accum", "2", "--zero", "0"], timeout=240)
    return torch.load(out)


def _check_two_rank_run(result: dict, reference: dict) -> None:
    assert result["world"] == 2 and reference["world"] == 1
    assert result["param_dtypes"] == ["torch.float32"]
    # Every rank ends with bit-identical student parameters although each saw other data ...
    assert result["param_mismatch"] == 0
    # ... while DeepSpeed leaves the BN running statistics different until we average them.
    assert result["buffer_mismatch_before"] > 0
    assert result["buffer_mismatch_after"] == 0
    # Gradient averaging: 2 ranks x half batch == 1 rank x 2 accumulated halves.
    diff = max((result["params"][n] - reference["params"][n]).abs().max().item()
               for n in reference["params"])
    assert diff < 1e-5, diff
    # Rank 0's micro-batch is accumulation micro-batch 0 of the reference: same losses.
    assert result["losses"] == pytest.approx(reference["losses"][0::2], abs=1e-5)
    assert result["global_steps"] == reference["global_steps"] == 3
    assert result["scheduler_steps"] == reference["scheduler_steps"] == 3
    assert result["lr"] == pytest.approx(reference["lr"])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero2_torchrun_two_ranks_equals_one_rank_accumulation(reference, tmp_path):
    out = tmp_path / "dist.pt"
    run_torchrun(WORKERS / "train.py", nproc=2, args=["--out", str(out), "--zero", "2"], timeout=240)
    _check_two_rank_run(torch.load(out), reference)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_deepspeed_launcher_two_cpu_ranks(reference, tmp_path):
    """``deepspeed --num_gpus 2 script.py`` on CPU (the launcher counts NUMA nodes as devices,
    so without --num_gpus it would start one rank); the script receives --local_rank."""
    out = tmp_path / "ds.pt"
    run_deepspeed(WORKERS / "train.py", nproc=2, args=["--out", str(out), "--zero", "1"], timeout=240)
    result = torch.load(out)
    _check_two_rank_run(result, reference)
    # The launcher's LOCAL_SIZE turns on DeepSpeed's shared-memory all-reduce; its segments are
    # unlinked once mapped (they used to stay in /dev/shm, 66 MB per rank) and still work.
    assert result["shm_sum"] == [3.0] * 8
    assert result["shm_left"] == []
