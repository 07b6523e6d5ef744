"""Issue 11 finding 6: how far an eval-mode teacher is from a train-mode one before training.

With identical parameters (the teacher is a copy of the student at step 0), the eval-mode
teacher normalises with BatchNorm running statistics that are still at their initial values
(mean 0, var 1), while the student and a train-mode teacher use batch statistics. This prints,
for a fresh gated ResNet and after ``k`` BN warm-up batches (train-mode forwards that only move
the running statistics, as the student's first k steps do): the teacher's largest |logit|, its
execution rate, and L_path / L_logits (paper forms) against the train-mode student.

    python tools/teacher_step0.py --model spnet_cifar_resnet110 --size 32 --warmup 0 10 50 200
"""
from __future__ import annotations

import argparse
import copy

import torch

from spnet_dist.losses import logits_loss, path_loss
from spnet_dist.models import create_model


def measure(model_name: str, size: int, batch: int, warmups: list[int], seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    student = create_model(model_name, num_classes=10).train()
    # Fixed inputs with image-like statistics (normalised pixels); the point is BN, not the data.
    x = torch.randn(batch, 3, size, size)
    rows = []
    done = 0
    for k in sorted(warmups):
        with torch.no_grad():
            for _ in range(k - done):  # BN warm-up: train-mode forwards move the running stats
                student(torch.randn(batch, 3, size, size))
        done = k
        teacher = copy.deepcopy(student)
        with torch.no_grad():
            torch.manual_seed(seed + 1)
            s_out = student.train()(x)
            t_eval = teacher.eval()(x)
            torch.manual_seed(seed + 2)
            t_train = teacher.train()(x)
        for mode, t_out in (("eval", t_eval), ("train", t_train)):
            rows.append({"warmup": k, "teacher": mode,
                         "max_abs_logit": t_out.logits.abs().max().item(),
                         "teacher_exec_rate": t_out.gate_decisions.mean().item(),
                         "student_exec_rate": s_out.gate_decisions.mean().item(),
                         "L_path": path_loss(s_out, t_out, "paper").item(),
                         "L_logits": logits_loss(s_out, t_out, "paper").item()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="spnet_cifar_resnet110")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, nargs="+", default=[0, 10, 50])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print("| model | BN warm-up batches | teacher | max abs logit | teacher exec. rate | student exec. rate | L_path | L_logits |")
    print("|---|---|---|---|---|---|---|---|")
    for r in measure(a.model, a.size, a.batch, a.warmup, a.seed):
        print(f"| {a.model} | {r['warmup']} | {r['teacher']} | {r['max_abs_logit']:.3g} | {r['teacher_exec_rate']:.3f} | "
              f"{r['student_exec_rate']:.3f} | {r['L_path']:.3f} | {r['L_logits']:.3f} |")


if __name__ == "__main__":
    main()
