"""Runs the export tests share: a 2-rank ZeRO-2 run with its export, a 1-rank run with two checkpoints."""
import subprocess
import sys

import pytest

from ..conftest import CALIBRATED, REPO_ROOT, tiny_overrides
from ..dist_helpers import WORKERS, run_torchrun

DEMO = str(REPO_ROOT / "configs" / "demo.yaml")


def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "spnet_dist.export", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=str(REPO_ROOT))


def export_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """``spnet-export ARGS`` through its ``cli()`` in this process, as a CompletedProcess: for the
    error cases, where a fresh interpreter (5-6 s of imports each) adds nothing the subprocess
    cases do not already show (one line on stderr, exit status 2, no traceback)."""
    from spnet_dist.export.writer import cli

    capsys.readouterr()
    try:
        cli([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["spnet-export", *map(str, args)], code, out, err)


def error_line(done) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    return lines[0]


# --------------------------------------------------------------------------------------------
# 2 ranks, ZeRO-2: the demo trained briefly by the real Trainer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="package")
def zero2_run(tmp_path_factory, digits_root):
    run = tmp_path_factory.mktemp("zero2") / "run"
    run_torchrun(WORKERS / "checkpoint_job.py", 2,
                 ["--config", DEMO, *tiny_overrides(digits_root, run), CALIBRATED, "engine.zero_stage=2",
                  "run.max_steps=8"],
                 timeout=1800)  # a shared 2-core machine can take 4x longer than idle
    return run


@pytest.fixture(scope="package")
def zero2_export(zero2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "student"
    done = export_cli("--run", zero2_run, "--out", out)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="package")
def two_checkpoints(tmp_path_factory, digits_root):
    """A 1-rank ZeRO-1 run of 4 steps with checkpoints at steps 2 and 4 (`final`)."""
    from spnet_dist import distributed as D
    from spnet_dist.config import load_config
    from spnet_dist.training import Trainer

    run = tmp_path_factory.mktemp("swap") / "run"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(var, raising=False)
        D.destroy()
        cfg = load_config(DEMO, tiny_overrides(digits_root, run) + [
            "engine.zero_stage=1", "run.max_steps=4", "run.checkpoint_every=2", "run.tensorboard=false"])
        trainer = Trainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer._undo_deterministic()
            D.destroy()
    return run


