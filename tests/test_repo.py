"""The repository's own contracts: CI runs the README's test command, every CLI field is documented."""
from .conftest import REPO_ROOT


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
                  if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci_command) == 1
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"```bash\n{ci_command[0]}\n```" in readme


def test_readme_main_job_is_the_demo():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "spnet-train --config configs/demo.yaml\n```" in readme
    assert (REPO_ROOT / "configs" / "demo.yaml").is_file()
