"""Fixtures shared across the test suite."""
import os
import signal
import sys
from pathlib import Path

import pytest

# DeepSpeed JIT-compiles its CPU shared-memory communication op on the first initialize() and
# caches it under ~/.cache/torch_extensions, keyed by name only. Virtual environments at other
# paths write different build files there, so on a machine shared by several checkouts each
# one's first engine rebuilds the op (1-3 minutes on 2 busy cores, measured) whenever another
# checkout built last. One cache per environment (inherited by launched ranks) builds it once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

from spnet_dist.config import load_config
from spnet_dist.data import prepare_digits

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """scikit-learn's digits as an ImageNet-layout JPEG folder, built once per test session."""
    return prepare_digits(tmp_path_factory.mktemp("digits"))


# The user default (model.gate_calibration=target), for the tests of the calibrated evaluation:
# append it after tiny_overrides(...).
CALIBRATED = "model.gate_calibration=target"


def tiny_overrides(digits_root: Path, out_dir: Path) -> list[str]:
    """The demo config shrunk to a few seconds of CPU: 8x8 images, a handful of steps.

    Evaluations use the paper's router rule (``model.gate_calibration=none``): the routers of a
    6-step network are nearly constant per block, their execution rate is a staircase in the
    threshold, and calibrating it to the target took 8-10 validation passes per evaluation
    (measured: 40 % of the time of the in-process training tests). The tests of the calibrated
    path (the hand evaluations on 1 and 2 ranks, kill-anywhere resume, the export that bakes the
    threshold, spnet-eval, the issue-19 acceptance runs) append :data:`CALIBRATED`.
    """
    return [
        f"data.root={digits_root}",
        f"run.out_dir={out_dir}",
        "data.image_size=8",
        "engine.global_batch_size=32",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "run.max_steps=6",
        "run.log_every=2",
        "run.progress=log",
        "model.gate_calibration=none",
    ]


@pytest.fixture
def tiny_config(digits_root, tmp_path):
    """A factory: ``tiny_config("loss.beta=0", ...)`` -> validated Config."""

    def make(*overrides: str):
        return load_config(REPO_ROOT / "configs" / "demo.yaml", tiny_overrides(digits_root, tmp_path / "run") + list(overrides))

    return make


@pytest.fixture(autouse=True)
def stop_handlers_restored():
    """A Trainer installs its SIGUSR2/SIGTERM handlers at set-up and restores them at the end of
    fit(); one a test builds and never fits must not leave them on the test process."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def own_process_group(monkeypatch):
    """Run a test as a plain process would (no launcher variables) and tear down the 1-rank
    group it creates, so tests that need 'no group yet' still get one state to start from."""
    from spnet_dist import distributed as D

    D.destroy()
    for var in LAUNCH_VARS:  # setenv first so the undo also removes what init_distributed adds
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    yield
    D.destroy()
