"""Every script in tools/ imports against the package as it is: a module move in spnet_dist must
not leave a benchmark that dies at its first line (tools/bench_fashion.py imported the trainer
from its old place after the restructure, and nothing ran it)."""
import importlib.util

import pytest

from .conftest import REPO_ROOT

TOOLS = sorted((REPO_ROOT / "tools").glob("*.py"))


@pytest.mark.parametrize("path", TOOLS, ids=[path.stem for path in TOOLS])
def test_tool_imports(path):
    spec = importlib.util.spec_from_file_location(f"tools_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # module level only: every tool runs its work under __main__
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"

