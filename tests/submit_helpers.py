"""Helpers for the launcher tests (tests/test_submit.py, tests/slurm/): tiny deterministic runs,
their final weights, and the environment submitted jobs need on this machine."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from spnet_dist.config import load_config

from .conftest import REPO_ROOT, tiny_overrides
from .dist_helpers import free_port, run_command

DEMO = REPO_ROOT / "configs" / "demo.yaml"


def job_environment(monkeypatch) -> None:
    """Variables every job process inherits from the submitting test (sbatch and the local
    executor pass the environment on): this repository first on ``PYTHONPATH``, one thread per
    rank, and a torch-extension cache of this virtualenv.

    DeepSpeed JIT-compiles a small shared-memory op at its first start and caches it under
    ``~/.cache/torch_extensions``; processes from different virtualenvs sharing that cache
    rebuild it for each other (minutes under load). A per-venv directory builds it once.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The job imports this tree (and tests.* entries), wherever pytest was started from.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


def run_overrides(digits_root: Path, out_dir: Path, epochs: int) -> list[str]:
    """A deterministic CPU run of ``epochs`` x 44 optimizer steps (world size 2, batch 32)."""
    overrides = [o for o in tiny_overrides(digits_root, out_dir) if not o.startswith("run.max_steps")]
    return overrides + [
        f"schedule.epochs={epochs}", "run.deterministic=true", "engine.backend=gloo",
        "run.tensorboard=false", "run.log_every=10", "run.checkpoint_every=20",
    ]


def load_job_config(*overrides: str):
    return load_config(DEMO, list(overrides), world_size=1)


def run_reference(digits_root: Path, out_dir: Path, epochs: int, nproc: int = 2) -> Path:
    """The uninterrupted run: ``torchrun -m spnet_dist.train`` with the same overrides."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "spnet_dist.train",
           "--config", str(DEMO), *run_overrides(digits_root, out_dir, epochs)]
    run_command(cmd, env={"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                 str(Path(sys.prefix) / "torch_extensions"))},
                timeout=900)
    return out_dir


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Student (DeepSpeed's module states) and teacher tensors of ``run_dir``'s final checkpoint."""
    final = Path(run_dir) / "checkpoints" / "final"
    assert final.is_dir(), f"{run_dir} has no final checkpoint"
    # Written by this test's own run moments ago: DeepSpeed's file is a pickle (trusted here).
    states = torch.load(final / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    out = {f"student.{k}": v for k, v in states["module"].items()}
    out.update({f"teacher.{k}": v for k, v in load_file(str(final / "teacher.safetensors")).items()})
    return out


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert any(k.startswith("teacher.") and "running_mean" in k for k in a)  # buffers compared too
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
