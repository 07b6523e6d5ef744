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



def _load_tool(name: str):
    path = REPO_ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_shares_add_up_on_a_real_checkpoint(tiny_config, own_process_group):
    """tools/loss_shares.py on a 2-step demo run (teacher, stage heads, L_evo, L_cost): the weighted
    terms are the total's parts and their gradients add up to the total's, so a term left out or
    weighted wrongly (alpha for beta, say) fails here."""
    from spnet_dist.training import Trainer

    cfg = tiny_config("run.max_steps=2", "run.tensorboard=false")
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer._undo_deterministic()
    result = _load_tool("loss_shares").measure(cfg.run.out_dir, batches=2)
    terms = result["terms"]
    assert set(terms) == {"cls", "path", "logits", "evo", "cost"} and result["batches"] == 2
    assert abs(sum(row["loss share"] for row in terms.values()) - 1.0) < 1e-5
    assert result["gradient_sum_residual"] < 1e-4
    assert all(terms[name]["router grad"] > 0 for name in ("cls", "path", "cost"))
