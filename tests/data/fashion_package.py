#!/usr/bin/env python3
"""Debian's ``dataset-fashion-mnist`` for the tests that read the real Fashion-MNIST files.

    python3 tests/data/fashion_package.py install   # apt-get it when the files are missing

Installed when any of the four idx files is missing from ``/usr/share/datasets/fashion-mnist``
and this process may (root, ``apt-get`` present), as ``tests/slurm/cluster.py`` installs SLURM;
the stale-package-list case is retried once after ``apt-get update``. Only the standard library:
it runs before any virtualenv exists.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "dataset-fashion-mnist"
ROOT = Path("/usr/share/datasets/fashion-mnist")  # spnet_dist.data.fashion_mnist.DEFAULT_ROOT
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")


class PackageError(RuntimeError):
    """The package is missing and cannot be installed; the message says why."""


def missing_files() -> list[str]:
    return [name for name in FILES if not (ROOT / name).is_file()]


def can_install() -> str | None:
    """None if this process may install Debian packages, else the reason it may not."""
    if shutil.which("apt-get") is None:
        return "apt-get not found"
    if os.geteuid() != 0:
        return "needs root (apt-get install)"
    return None


def install() -> None:
    """``apt-get install -y dataset-fashion-mnist`` when any file is missing.

    Raises:
        PackageError: files missing and no way to install them, or still missing afterwards.
    """
    if not missing_files():
        return
    reason = can_install()
    if reason:
        raise PackageError(f"{PACKAGE} missing ({', '.join(missing_files())} not in {ROOT}); cannot install: {reason}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE]
    if subprocess.run(cmd, env=env).returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)
    if missing_files():
        raise PackageError(f"installed {PACKAGE} but {', '.join(missing_files())} still missing from {ROOT}")


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit(__doc__)
    try:
        install()
    except (PackageError, subprocess.CalledProcessError) as err:
        sys.exit(f"{Path(__file__).name}: {err}")
    print(f"{PACKAGE}: {ROOT} holds the four idx files")
