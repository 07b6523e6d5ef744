"""`accelerate launch` runs the same spnet_dist.train main(cfg) as spnet-train, torchrun and submitit."""
import json
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, tiny_overrides
from .dist_helpers import free_port, run_command

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_accelerate_launch_multi_gpu_runs_two_ranks_on_cpu(digits_root, tmp_path):
    run = tmp_path / "run"
    # --multi_gpu is accelerate's torchrun path; on a CPU-only machine the ranks use gloo.
    # (--cpu would start a single process whatever --num_processes says.)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "spnet_dist.train",
           "--config", str(REPO_ROOT / "configs" / "demo.yaml"), *tiny_overrides(digits_root, run),
           "run.tensorboard=false"]
    out = run_command(cmd, env={"TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}, timeout=600)
    assert out.stdout.count("world size 2") == 1  # one 2-rank job, printed by rank 0 only
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6]
    assert (run / "checkpoints" / "final").is_dir()
