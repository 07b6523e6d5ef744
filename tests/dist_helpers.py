"""Shared helpers for engine / distributed tests: launchers, a toy BN model, toy data, configs.

Launch helpers run a worker script under ``torchrun`` or the ``deepspeed`` launcher on a free
port with ``OMP_NUM_THREADS=1`` (2 cores shared by all ranks), capture the output and raise
with its tail on failure. Worker scripts import this module too (they put the repo root on
``sys.path``), so the model, the data and the training loop are the same in every process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
_BIN = Path(sys.executable).parent

# Variables a launcher sets for its children. A test process that called init_distributed()
# has RANK=0 / WORLD_SIZE=1 / LOCAL_RANK=0 in its environment; a child must not inherit them
# (a plain child would think it was launched, torchrun children get their own values anyway).
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a launched job: ours minus launcher variables, one thread per rank."""
    out = {k: v for k, v in os.environ.items()
           if k not in _DIST_VARS and not k.startswith("TORCHELASTIC_")}
    # PYTHONFAULTHANDLER: a rank that dies of a signal (SIGABRT from C++, SIGSEGV) prints the
    # Python stack of every thread, which the failure message shows.
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), out.get("PYTHONPATH")]))
    out.update(env or {})
    return out


def run_command(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300,
                tail: int = 60, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on a timeout (or a failure, with ``check``) raise with the output's tail.

    The job gets its own process group so a timeout can stop the launcher *and* its ranks
    (by that group's id) instead of leaving orphans behind.

    Args:
        cmd: the command line.
        env: extra environment variables (on top of :func:`child_env`).
        timeout: seconds before the whole job is killed.
        tail: number of output lines shown in the error.
        check: raise on a non-zero exit status (False: the caller inspects ``returncode``).
    """
    proc = subprocess.Popen(list(cmd), env=child_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=str(REPO_ROOT))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"timed out after {timeout}s: {' '.join(cmd)}\n{_tail(out, tail)}")
    if check and proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{_tail(out, tail)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _tail(text: str, n: int) -> str:
    lines = (text or "").splitlines()
    return "\n".join(["--- last output lines ---", *lines[-n:]])


def run_torchrun(script_path: str | Path, nproc: int, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, timeout: float = 300,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script_path`` on ``nproc`` local ranks with torchrun (static rendezvous, free port).

    Args:
        script_path: the worker script.
        nproc: number of ranks.
        args: arguments for the script.
        env: extra environment variables.
        timeout: seconds before the job is killed.
        check: raise on a non-zero exit status (False: the caller inspects ``returncode``).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script_path), *args]
    return run_command(cmd, env=env, timeout=timeout, check=check)


def run_torchrun_nodes(script_path: str | Path, nnodes: int, args: Sequence[str] = (),
                       env: dict[str, str] | None = None, timeout: float = 300) -> list[str]:
    """Run ``script_path`` as a job of ``nnodes`` "nodes" with one rank each, all on this machine.

    One torchrun agent per node (``--node-rank i``), all meeting at one master on 127.0.0.1:
    every rank has LOCAL_RANK 0 but its own RANK, as on a real multi-node job. The only way
    to tell a local rank from a global one without a second machine.

    Args:
        script_path: the worker script.
        nnodes: number of agents (= ranks).
        args: arguments for the script.
        env: extra environment variables.
        timeout: seconds before every agent (and its rank) is killed.

    Returns:
        Each node's output, node 0 first. Raises with their tails if any node fails.
    """
    port = str(free_port())
    nodes = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
               "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
               "--master-port", port, str(script_path), *args]
        log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: no node blocks on a full pipe
        proc = subprocess.Popen(cmd, env=child_env(env), stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, cwd=str(REPO_ROOT))
        nodes.append((proc, log))
    # Stop waiting as soon as one node fails: the others would block in a collective until the timeout.
    deadline = time.monotonic() + timeout
    while True:
        codes = [proc.poll() for proc, _ in nodes]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            timed_out = False
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.2)
    outputs, failed = [], []
    for i, (proc, log) in enumerate(nodes):
        if proc.poll() is None:  # stopped by us: another node failed or time ran out
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        elif proc.returncode != 0:
            failed.append(i)
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if timed_out or failed:
        what = f"timed out after {timeout}s" if timed_out else f"node(s) {failed} failed"
        tails = "\n".join(f"=== node {i} ===\n{_tail(out, 120)}" for i, out in enumerate(outputs))
        raise RuntimeError(f"{what}: {script_path} on {nnodes} nodes\n{tails}")
    return outputs


def run_deepspeed(script_path: str | Path, nproc: int, args: Sequence[str] = (),
                  env: dict[str, str] | None = None, timeout: float = 300,
                  module: bool = False) -> subprocess.CompletedProcess:
    """Run ``script_path`` (or, with ``module=True``, a module as ``python -m`` would) on
    ``nproc`` local ranks with the ``deepspeed`` launcher.

    On a CPU-only machine the launcher counts one "device" per NUMA node (``LOCAL_SIZE``
    overrides it), so ``--num_gpus N`` is what asks for N ranks; it exports RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_SIZE, CUDA_VISIBLE_DEVICES=0..N-1 and passes
    ``--local_rank=<i>`` to the script, which must accept it.

    Args:
        script_path: the worker script.
        nproc: number of ranks.
        args: arguments for the script.
        env: extra environment variables.
        timeout: seconds before the job is killed.
        module: ``script_path`` is a module name (the launcher's ``--module``).
    """
    launcher = _BIN / "deepspeed"
    head = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd = [*head, "--num_gpus", str(nproc), "--master_port", str(free_port()),
           *(["--module"] if module else []), str(script_path), *args]
    return run_command(cmd, env=env, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Toy model, data and configs
# --------------------------------------------------------------------------------------------


def toy_model(seed: int = 0) -> nn.Module:
    """Conv -> BN -> ReLU -> pool -> Linear: small, but with BatchNorm (batch statistics and
    running buffers) so per-rank batches matter the way they do in a ResNet."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def global_batch(step: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of optimizer step ``step``, identical in every process. ``(B,3,8,8)``."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(size, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (size,), generator=g)
    return x, y


def micro_batches(step: int, rank: int, world: int, grad_accum: int, global_size: int,
                  seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``grad_accum`` micro-batches ``rank`` feeds in optimizer step ``step``.

    Slice index ``rank * grad_accum + j``: with 2 ranks and no accumulation rank i gets slice
    i; with 1 rank and grad_accum 2 accumulation micro-step i gets slice i. Same samples, so
    BatchNorm batch statistics match between the two set-ups.
    """
    x, y = global_batch(step, global_size, seed)
    micro = global_size // (world * grad_accum)
    out = []
    for j in range(grad_accum):
        i = rank * grad_accum + j
        out.append((x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]))
    return out


def train_steps(engine, steps: int, rank: int, world: int, grad_accum: int, global_size: int,
                seed: int = 0) -> list[float]:
    """Run ``steps`` optimizer steps of the toy task through ``engine``; per-micro-batch losses."""
    from spnet_dist.engine import engine_step

    losses = []
    for step in range(steps):
        for x, y in micro_batches(step, rank, world, grad_accum, global_size, seed):
            out = engine(x.to(engine.device))
            loss = F.cross_entropy(out.float(), y.to(engine.device))
            engine.backward(loss)
            engine_step(engine)
            losses.append(loss.item())
    return losses


def make_cfg(**overrides):
    """A real ``spnet_dist.config.Config`` with toy values; ``section__field=value`` overrides.

    Example: ``make_cfg(engine__zero_stage=2, schedule__milestones=[1, 2])``.
    """
    from spnet_dist.config import Config

    cfg = Config()
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 0.1, 0.9, 1e-4
    cfg.schedule.kind, cfg.schedule.epochs, cfg.schedule.milestones = "multistep", 4, [2, 3]
    cfg.schedule.decay, cfg.schedule.warmup_epochs = 0.1, 0.0
    cfg.engine.global_batch_size, cfg.engine.grad_accum = 8, 1
    cfg.engine.zero_stage, cfg.engine.precision, cfg.engine.backend = 2, "fp32", "gloo"
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def ds_config(cfg, world_size: int) -> dict:
    """The DeepSpeed dict for ``cfg``, written by ``spnet_dist.engine`` (never by hand)."""
    from spnet_dist.engine import deepspeed_config

    return deepspeed_config(cfg, world_size)


# --------------------------------------------------------------------------------------------
# Evaluation: a tiny problem and its expected result computed by hand
# --------------------------------------------------------------------------------------------


def eval_problem(num_images: int = 7, seed: int = 0):
    """A gated ResNet-20 in eval mode, ``num_images`` random 8x8 images and labels, the same in
    every process.

    The routers' last-layer biases are zeroed, so each block executes for roughly half of the
    images (rates strictly between 0 and 1, unlike the initial bias that opens nearly all).
    The labels are the final head's predictions on even indices and a wrong class on odd
    ones: top-1 is exactly ceil(n/2)/n, and on 2 ranks (strided shards) rank 0 scores 100 %
    and rank 1 scores 0 %, so a mean of per-rank accuracies (50 %) differs from the true ratio.

    Returns:
        (model, images (n, 3, 8, 8), targets (n,)).
    """
    from spnet_dist.models import create_model

    torch.manual_seed(seed)
    model = create_model("spnet_cifar_resnet20", num_classes=10).eval()
    with torch.no_grad():
        for block in model.gated_blocks():
            block.router.fc2.bias.zero_()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, 8, 8, generator=g)
    with torch.no_grad():
        predicted = model(images).logits.argmax(dim=1)
    even = torch.arange(num_images) % 2 == 0
    targets = torch.where(even, predicted, (predicted + 1) % 10)
    return model, images, targets


@torch.no_grad()
def hand_evaluation(model, images: torch.Tensor, targets: torch.Tensor, profile) -> dict:
    """What ``spnet_dist.evaluate.evaluate`` must report, computed another way: one eval-mode
    forward of the whole set on the masked path, top-1 from the final head's logits, execution
    rates from the hard gate decisions, MACs summed per image from the profile's parts.

    Args:
        model: a GatedResNet (its mode is restored).
        images: (n, 3, H, W) every image of the set.
        targets: (n,) labels.
        profile: the model's ``MacProfile``.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(images)
    finally:
        model.train(was_training)
    n = len(targets)
    decisions = out.gate_decisions.double()  # (n, N), 0 or 1
    assert set(decisions.unique().tolist()) <= {0.0, 1.0}
    per_image = [profile.fixed + sum(r for r, d in zip(profile.residual, row) if d == 1.0)
                 for row in decisions.tolist()]
    static = profile.fixed + sum(profile.residual)
    rates = [float(x) for x in decisions.sum(dim=0) / n]
    macs = sum(per_image) / n
    return {
        "top1": 100.0 * int((out.logits.argmax(dim=1) == targets).sum()) / n,
        "gmacs": macs / 1e9,
        "static_gmacs": static / 1e9,
        "mac_ratio": macs / static,
        "exec_rates": rates,
        "exec_rate": sum(rates) / len(rates),
        "images": n,
    }


def assert_evaluation_matches(record: dict, expected: dict) -> None:
    """``record`` (from ``evaluate``) equals ``expected`` (from :func:`hand_evaluation`) up to
    float rounding of the MAC sums; counts and top-1 exactly."""
    assert record["images"] == expected["images"]
    for key, rel in (("top1", 1e-12), ("exec_rates", 1e-12), ("gmacs", 1e-9), ("static_gmacs", 1e-9),
                     ("mac_ratio", 1e-9), ("exec_rate", 1e-9)):
        assert record[key] == pytest.approx(expected[key], rel=rel), \
            f"{key}: evaluate() gave {record[key]}, by hand {expected[key]}"
    assert record["gmacs_paper"] == pytest.approx(2 * expected["gmacs"], rel=1e-9)
