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


def _plot_records():
    """Two methods x 2 seeds at t = 0.3 / 0.5: paths snapshotted at steps 10 and 20, 4-bin histograms."""
    records = []
    for method, bump in (("baseline", 0.0), ("SP-Net", 1.0)):
        for seed in (0, 1):
            for target in (0.3, 0.5):
                records.append({
                    "method": method, "target": target, "seed": seed, "final_top1": 80 + 10 * target + bump + seed,
                    "final_mac_ratio": target + 0.01 * seed, "bestval_top1": 80 + 10 * target + bump,
                    "bestval_mac_ratio": target + 0.01 * seed, "besttest_top1": 81 + 10 * target + bump,
                    "path_flips": [0.2 + 0.1 * seed, 0.1], "path_flips_chance": [0.4, 0.3 + 0.1 * seed],
                    "path_steps": [10, 20], "paper_rule_gate_prob_hist": ([1, 3, 3, 1], [0, 2, 2, 4])[seed] if method == "SP-Net" else [4, 0, 0, 4],
                    "gate_prob_hist": [2, 2, 2, 2]})
    return records


def test_plot_comparison_series_by_hand_and_the_five_plots(tmp_path):
    import json

    from spnet_dist import compare as C

    tool = _load_tool("plot_comparison")
    records = C.as_records(_plot_records())
    flips = tool.flip_series(records)
    s = flips["SP-Net", 0.5]
    # step 10: seeds' flips 0.2 and 0.3 -> 0.25, chance 0.4; step 20: 0.1, chance (0.3 + 0.4) / 2
    assert s["runs"] == 2 and s["steps"] == [10, 20]
    assert s["flips"] == pytest.approx([0.25, 0.1]) and s["chance"] == pytest.approx([0.4, 0.35])
    densities = tool.probability_densities(records)
    # pooled over the two seeds, as shares: [1, 5, 5, 5] / 16 under the paper's rule, flat when calibrated
    assert densities["SP-Net", 0.3]["paper"] == pytest.approx([1 / 16, 5 / 16, 5 / 16, 5 / 16])
    assert densities["baseline", 0.3]["paper"] == pytest.approx([0.5, 0, 0, 0.5])
    assert densities["baseline", 0.5]["calibrated"] == pytest.approx([0.25] * 4)
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _plot_records()) + "\n")
    assert tool.main([str(path), "--baseline", "baseline", "--out-dir", str(tmp_path / "plots"),
                      "--mac-ratios", "0.31", "0.4"]) == 0
    for name in tool.PLOTS:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert tool.main([str(path), "--baseline", "nobody", "--out-dir", str(tmp_path / "plots")]) == 2
