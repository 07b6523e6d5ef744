"""The layering contracts of setup.cfg ([importlinter]) hold: no import cycles, one direction of
flow with models/ at the bottom, export never importing the trainer. Imports inside functions
count (grimp reads every import statement of the package)."""
import subprocess
import sys
from pathlib import Path

from .conftest import REPO_ROOT


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache", str(REPO_ROOT / "setup.cfg")], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout, out.stdout[-2000:]
