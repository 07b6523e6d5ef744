"""No arbitrary unpickling: resume and export at ZeRO 0, 1 and 2 never reach a
``torch.load(weights_only=False)``, and a checkpoint file naming a foreign global is refused by name."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spnet_dist import checkpoint as C
from spnet_dist import distributed as D
from spnet_dist.checkpoint.safe_load import DEEPSPEED_GLOBALS, _allowed, load
from spnet_dist.config import load_config

from ..conftest import REPO_ROOT, tiny_overrides
from ..dist_helpers import WORKERS, run_torchrun
from ..load_guard import UnsafeLoad, refuse_unsafe_torch_load

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
RUN = ["run.tensorboard=false", "run.checkpoint_every=2", "schedule.epochs=2"]


def _overrides(digits_root, run, zero, steps):
    return tiny_overrides(digits_root, run) + RUN + [f"engine.zero_stage={zero}", f"run.max_steps={steps}"]


def _train_here(digits_root, run, zero, steps):
    """One attempt of the trainer in this process (1 rank); returns the trainer."""
    from spnet_dist.training import Trainer

    D.destroy()
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(var, None)
    trainer = Trainer(load_config(DEMO, _overrides(digits_root, run, zero, steps)))
    try:
        trainer.fit()
    finally:
        trainer._undo_deterministic()
    return trainer


def _export(run, out, *args):
    return subprocess.run([sys.executable, "-m", "spnet_dist.export", "--run", str(run), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=str(REPO_ROOT))


def _reseal(ckpt: Path, name: str) -> None:
    """Record ``name``'s new size and SHA-256 in the marker, as if the save had written it."""
    marker = json.loads((ckpt / C.MARKER).read_text())
    data = (ckpt / name).read_bytes()
    marker["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / C.MARKER).write_text(json.dumps(marker))
    C.validate_checkpoint(ckpt)  # valid as far as the marker can tell


@pytest.fixture(scope="module")
def one_rank_runs(tmp_path_factory, digits_root):
    """Runs of 2 steps (checkpoint step_00000002 = final) at ZeRO 0, 1 and 2 on one rank."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(var, raising=False)
        for zero in (0, 1, 2):
            runs[zero] = tmp_path_factory.mktemp(f"zero{zero}") / "run"
            _train_here(digits_root, runs[zero], zero, 2)
        D.destroy()
    return runs


# --------------------------------------------------------------------------------------------
# The loader itself
# --------------------------------------------------------------------------------------------


def test_a_foreign_global_is_refused_in_one_line_naming_file_and_global(tmp_path):
    path = tmp_path / "states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "hook": os.system}, path)
    with pytest.raises(C.CheckpointError) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "posix.system" in message, message
    torch.save({"module": {"w": torch.ones(2)}}, path)
    assert torch.equal(load(path)["module"]["w"], torch.ones(2))  # plain tensors load


def test_the_allow_list_names_deepspeed_classes_only():
    assert all(name.startswith("deepspeed.") for name in DEEPSPEED_GLOBALS)
    assert len(DEEPSPEED_GLOBALS) == 3
    # ... and resolves to those very classes (what torch's safe_globals is given)
    assert [f"{g.__module__}.{g.__qualname__}" for g in _allowed()] == list(DEEPSPEED_GLOBALS)


def test_load_maps_onto_the_device_asked_for(tmp_path):
    """Rank i of a GPU job loads onto its own device, not the one the file was saved from."""
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert load(path, map_location="meta")["w"].is_meta


def test_the_guard_catches_deepspeeds_own_loader(tmp_path):
    # The test below relies on this: DeepSpeed's loaders, unwrapped, trip the guard.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    path = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, path)
    with refuse_unsafe_torch_load(), pytest.raises(UnsafeLoad):
        TorchCheckpointEngine().load(str(path))


# --------------------------------------------------------------------------------------------
# Resume and export with torch.load refusing to unpickle
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_resume_and_export_on_one_rank_never_unpickle(one_rank_runs, digits_root, tmp_path, own_process_group,
                                                     zero, capsys):
    from spnet_dist import export

    run = tmp_path / "run"
    shutil.copytree(one_rank_runs[zero], run, symlinks=True)
    ckpt = C.resolve_checkpoint(run, "final")
    with refuse_unsafe_torch_load() as loaded:
        trainer = _train_here(digits_root, run, zero, 3)  # resumes from step 2, trains step 3
        assert "resumed from step_00000002" in capsys.readouterr().out and trainer.state.step == 3
        resumed = list(loaded)
        export.export(run, tmp_path / "out", tag="step_00000002")
    expected = {C.MODEL_STATES} | ({C.optim_states_file(0)} if zero else set())
    assert {Path(f).name for f in resumed} == expected, resumed
    assert {Path(f).name for f in loaded[len(resumed):]} == expected  # export read the same files, safely
    assert all(Path(f).parent == ckpt for f in loaded)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_and_export_on_two_ranks_never_unpickle(digits_root, tmp_path):
    """ZeRO 2 only: DeepSpeed builds one optimizer class for stages 1 and 2
    (``DeepSpeedZeroOptimizer``, ``partition_grads=stage == 2``) and loads both through the same
    ``_load_zero_checkpoint``, so a ZeRO-1 case here read the same files by the same calls (30 s
    of the default run); ZeRO 0, 1 and 2 each resume under the guard on one rank above."""
    from spnet_dist import export

    zero = 2

    run = tmp_path / "run"
    run_torchrun(WORKERS / "resume_job.py", 2, ["--config", DEMO, *_overrides(digits_root, run, zero, 2)],
                 timeout=1800)
    ckpt = C.resolve_checkpoint(run, "final")
    assert {C.optim_states_file(0), C.optim_states_file(1)} <= {p.name for p in ckpt.iterdir()}
    # Every rank resumes with the guard installed (it raises in DeepSpeed's own loader otherwise).
    done = run_torchrun(WORKERS / "resume_job.py", 2,
                        ["--config", DEMO, "--refuse-unsafe-load", *_overrides(digits_root, run, zero, 4)],
                        timeout=1800)
    assert "resuming from" in done.stdout and "step_00000002" in done.stdout, done.stdout[-3000:]
    counts = sorted(re.findall(r"SAFE-LOADS=(\d+) rank=(\d)", done.stdout), key=lambda c: c[1])
    assert [r for _, r in counts] == ["0", "1"] and all(int(n) >= 2 for n, _ in counts), done.stdout[-3000:]
    with refuse_unsafe_torch_load() as loaded:
        export.export(run, tmp_path / "out", tag="step_00000002")
    assert {Path(f).name for f in loaded} == {C.MODEL_STATES, C.optim_states_file(0), C.optim_states_file(1)}


# --------------------------------------------------------------------------------------------
# A file naming a foreign global, re-sealed with a valid marker
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("zero,victim", [(0, C.MODEL_STATES), (1, C.optim_states_file(0))])
def test_a_resealed_file_with_a_foreign_global_is_refused_by_export_and_resume(
        one_rank_runs, digits_root, tmp_path, own_process_group, capsys, zero, victim):
    from spnet_dist import training

    run = tmp_path / "run"
    shutil.copytree(one_rank_runs[zero], run, symlinks=True)
    ckpt = C.resolve_checkpoint(run, "final")
    state = torch.load(ckpt / victim, map_location="cpu", weights_only=False)  # our own file: trusted here
    state["payload"] = os.system  # what a hostile copy would carry
    torch.save(state, ckpt / victim)
    _reseal(ckpt, victim)

    out = tmp_path / "out"
    done = _export(run, out)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{ckpt / victim}: refused to unpickle posix.system" in lines[0], done.stderr
    assert not out.exists()

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(var, None)
    with pytest.raises(SystemExit) as exit_:
        training.cli(["--config", DEMO, *_overrides(digits_root, run, zero, 3)])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{ckpt / victim}: refused to unpickle posix.system" in last, last
