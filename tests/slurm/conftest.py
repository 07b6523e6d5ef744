"""A real SLURM cluster (tests/slurm/cluster.py) for the tests marked ``slurm``, once per session.

Skipped, with the reason, only where it cannot exist: not root, or no apt-get to install Debian's
packages. Under CI (``CI`` set) those reasons fail the tests instead of skipping them silently.
"""
import os

import pytest

from ..submit_helpers import run_reference
from . import cluster

STATE_DIR = cluster.DEFAULT_DIR
EPOCHS = 3  # the submitted jobs' run: 3 x 44 optimizer steps on 2 ranks


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (Debian packages, munged and slurmd as system daemons)"
    if cluster.missing_programs() and cluster.can_install():
        return f"SLURM packages missing and cannot be installed: {cluster.can_install()}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start MariaDB, munged, slurmdbd, slurmctld and slurmd n1/n2; stop exactly those afterwards.

    Yields the client environment (``SLURM_CONF``), which is also exported to this process so
    that submitit's sbatch/sacct/scontrol calls and srun find the cluster.
    """
    reason = _cannot_run()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the slurm tests, but {reason}")
        pytest.skip(reason)
    cluster.stop(STATE_DIR)  # daemons a crashed earlier session recorded (by PID, never by name)
    env = cluster.start(STATE_DIR)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        cluster.stop(STATE_DIR)


@pytest.fixture(scope="session")
def reference(digits_root, tmp_path_factory):
    """The uninterrupted 2-rank run every job test compares with (3 epochs, 132 steps)."""
    return run_reference(digits_root, tmp_path_factory.mktemp("reference") / "run", EPOCHS)
