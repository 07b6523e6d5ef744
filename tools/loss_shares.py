"""Issue 20: each loss term's share of the total loss and of the routers' gradient.

Is a term inert (L_evo at gamma = 1e-4, say), or does it steer the routers? For a checkpoint of a
run this rebuilds the student and the EMA teacher, draws training batches (one seed fixes the
batches, their augmentation, the Gumbel noise and the router dropout; the student is in train mode
as in a training step), and per batch computes every term of the criterion and the gradient of
each WEIGHTED term alone. It prints, averaged over batches:

- ``loss share``: weight x term / total (the weighted terms sum to the total: checked);
- ``router grad``: ||g_term|| / ||g_total|| over the routers' parameters (the gate MLPs);
- ``all grad``: the same over every trainable parameter.

The per-term gradients must add up to the total's (checked, relative error printed): a term
missed or weighted twice would show there. Norm ratios do not sum to 1 (terms can pull against
each other); they say how large each pull is next to the whole.

    python tools/loss_shares.py runs/fashion/spnet --tag final --batches 20
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from spnet_dist import checkpoint as C
from spnet_dist.config import load_config
from spnet_dist.data.datasets import build_datasets
from spnet_dist.data.torchvision_loader import build_train_loader
from spnet_dist.losses import SPNetCriterion
from spnet_dist.models.from_config import build_model
from spnet_dist.teacher import EMATeacher
from spnet_dist.training.reproducibility import seed_everything

def term_weights(criterion: SPNetCriterion) -> dict[str, float]:
    """The weight of each term in ``total`` (eq. 12): cls 1, path alpha, logits beta, evo gamma, cost w."""
    return {"cls": 1.0, "path": criterion.alpha, "logits": criterion.beta, "evo": criterion.gamma,
            "cost": criterion.cost_weight}


def _norm(grads: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def measure(run_dir: Path, tag: str = "final", batches: int = 10, seed: int = 0) -> dict[str, Any]:
    """Shares of every term over ``batches`` training batches of checkpoint ``tag`` of ``run_dir``."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", world_size=1)
    ckpt = C.resolve_checkpoint(run_dir, tag)
    model = build_model(cfg)
    model.load_state_dict(C.student_weights(ckpt))
    model.train()
    teacher = None
    if cfg.teacher.enabled:
        teacher = EMATeacher(model, cfg.teacher.momentum, cfg.teacher.forward_mode, cfg.teacher.buffers)
        teacher.module.load_state_dict(C.teacher_weights(ckpt))
    criterion = SPNetCriterion.from_config(cfg.loss, teacher_enabled=cfg.teacher.enabled)
    weights = term_weights(criterion)
    params = [p for p in model.parameters() if p.requires_grad]
    router_ids = {id(p) for block in model.gated_blocks() for p in block.router.parameters()}
    router = [i for i, p in enumerate(params) if id(p) in router_ids]
    if not router:
        raise ValueError(f"{run_dir}: the model has no gated blocks (no router parameters)")

    train_set, _ = build_datasets(cfg.data)
    loader = build_train_loader(train_set, cfg.engine.global_batch_size, seed=seed)
    seed_everything(seed)  # the train-mode forwards' Gumbel noise and router dropout
    sums: dict[str, dict[str, float]] = {}
    worst_residual = 0.0
    seen = 0
    for images, targets in loader:
        if seen == batches:
            break
        student = model(images)
        with torch.no_grad():
            teacher_out = teacher(images) if teacher is not None else None
        terms = criterion(student, targets, teacher_out)
        total_grads = torch.autograd.grad(terms["total"], params, retain_graph=True, allow_unused=True)
        total_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, total_grads)]
        total = float(terms["total"].detach())
        total_router_norm, total_norm = _norm([total_grads[i] for i in router]), _norm(total_grads)
        summed = [torch.zeros_like(p) for p in params]
        for name, value in terms.items():
            if name == "total":
                continue
            if name not in weights:
                raise ValueError(f"loss term {name!r} has no known weight (tools/loss_shares.py term_weights)")
            weighted = weights[name] * value
            grads = (torch.autograd.grad(weighted, params, retain_graph=True, allow_unused=True)
                     if weighted.requires_grad else [None] * len(params))
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            for acc, g in zip(summed, grads):
                acc += g
            row = sums.setdefault(name, {"loss share": 0.0, "router grad": 0.0, "all grad": 0.0})
            row["loss share"] += float(weighted.detach()) / total
            row["router grad"] += _norm([grads[i] for i in router]) / total_router_norm
            row["all grad"] += _norm(grads) / total_norm
        residual = _norm([a - t for a, t in zip(summed, total_grads)]) / total_norm
        worst_residual = max(worst_residual, residual)
        seen += 1
    if seen == 0:
        raise ValueError(f"{run_dir}: the training set gave no batch of {cfg.engine.global_batch_size}")
    return {"run": str(run_dir), "checkpoint": ckpt.name, "batches": seen, "weights": weights,
            "terms": {name: {k: v / seen for k, v in row.items()} for name, row in sums.items()},
            "gradient_sum_residual": worst_residual}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (config.yaml, checkpoints/)")
    parser.add_argument("--tag", default="final", help="checkpoint tag (default: final)")
    parser.add_argument("--batches", type=int, default=10, help="training batches to average over")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order, augmentation, Gumbel noise and router dropout")
    parser.add_argument("--json", type=Path, help="also write the results as JSON lines here")
    args = parser.parse_args()
    results = [measure(run, args.tag, args.batches, args.seed) for run in args.runs]
    print("| run | term | weight | loss share | router grad / total | all grad / total |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for name, row in result["terms"].items():
            print(f"| {result['run']} ({result['checkpoint']}) | {name} | {result['weights'][name]:g} | "
                  f"{row['loss share']:.4g} | {row['router grad']:.4g} | {row['all grad']:.4g} |")
    for result in results:
        print(f"{result['run']}: {result['batches']} batches; sum of the per-term gradients vs the total's: "
              f"relative error {result['gradient_sum_residual']:.1e}")
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
