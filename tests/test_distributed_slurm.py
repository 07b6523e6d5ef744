"""spnet_dist.distributed under plain ``srun``: SLURM's variables place the rank, the batch script
of a multi-task job refuses. (The real srun job is in tests/slurm/test_slurm_jobs.py.)"""
import pytest

from spnet_dist import distributed as D

# What SLURM 22.05 exported to task 3 of `srun --nodes 2 --ntasks-per-node 2` (measured).
STEP_TASK = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0",
             "SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_STEP_NODELIST": "n[1-2]"}


@pytest.mark.parametrize("nodelist, first", [
    ("n[1-2]", "n1"), ("gpu[003-004,9],cpu1", "gpu003"), ("node7", "node7"), ("a-b[10-11]", "a-b10"),
    ("r[1-2]n[05-06]", "r1n05"), ("x[7,3-4]", "x7"),
])
def test_first_host_of_a_node_list(nodelist, first):
    assert D.first_host(nodelist) == first


def test_srun_task_gets_rank_local_rank_world_and_master():
    env = D.slurm_launch_env(STEP_TASK)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == \
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1"}
    # every task derives the same port from the job id alone
    assert env["MASTER_PORT"] == D.slurm_launch_env(dict(STEP_TASK, SLURM_PROCID="0"))["MASTER_PORT"]
    assert D.slurm_launch_env(dict(STEP_TASK, MASTER_PORT="29400", MASTER_ADDR="head"))["MASTER_ADDR"] == "head"


def test_step_node_list_wins_over_the_job_node_list():
    # a step on the second node only: its rank 0 runs there
    env = D.slurm_launch_env(dict(STEP_TASK, SLURM_STEP_NODELIST="n2", SLURM_NTASKS="2", SLURM_PROCID="1"))
    assert env["MASTER_ADDR"] == "n2"


def test_single_task_and_no_slurm_are_plain_processes():
    assert D.slurm_launch_env({}) == {}
    assert D.slurm_launch_env(dict(STEP_TASK, SLURM_NTASKS="1", SLURM_PROCID="0")) == {}


def test_batch_script_of_a_multi_task_job_refuses():
    # measured: the batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS, but no SLURM_STEP_ID
    batch = {k: v for k, v in STEP_TASK.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NODELIST")}
    with pytest.raises(RuntimeError, match="srun python -m spnet_dist.train"):
        D.slurm_launch_env(dict(batch, SLURM_PROCID="0"))
    assert D.slurm_launch_env(dict(batch, SLURM_PROCID="0", SLURM_NTASKS="1")) == {}


def test_incomplete_step_variables_refuse():
    with pytest.raises(RuntimeError, match="SLURM_LOCALID"):
        D.slurm_launch_env({k: v for k, v in STEP_TASK.items() if k != "SLURM_LOCALID"})


def test_init_distributed_uses_slurm_variables(own_process_group, monkeypatch):
    # A 1-task step initialises like a plain process; a 2-task step would wait for its peer, so
    # here only the exported variables are checked (the real 2-node run is in tests/slurm).
    for key, value in dict(STEP_TASK, SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0").items():
        monkeypatch.setenv(key, value)
    info = D.init_distributed("gloo")
    assert (info.rank, info.world_size) == (0, 1)
