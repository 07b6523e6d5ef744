"""Benchmark: cost of a full SP-Net training step relative to a vanilla gated step.

Both steps run the same gated model through the same DeepSpeed engine in this process; the
vanilla step switches off what SP-Net adds (the EMA teacher with L_path/L_logits, the stage
classifiers, L_evo). Printed: median seconds per step of each, their ratio, and where the
extra time goes (teacher forward, teacher EMA update, the extra loss terms and their backward).

    python tools/bench_step.py                   # CIFAR ResNet-110 (32 px) and ResNet-50 (112 px)
    python tools/bench_step.py --steps 10 --precision bf16

No assertion: a benchmark reports, it does not pass or fail.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from spnet_dist import distributed as D
from spnet_dist.config import load_config
from spnet_dist.train import SPNetStep, build_model, seed_everything

REPO = Path(__file__).resolve().parents[1]
VANILLA = ["teacher.enabled=false", "loss.alpha=0", "loss.beta=0", "loss.stage_heads=false",
           "loss.evo_strategy=none", "loss.gamma=0"]
CASES = {
    "cifar_resnet110@32": ("configs/cifar10/spnet_r110.yaml", 32, 32),
    "resnet50@112": ("configs/imagenet/spnet_r50.yaml", 112, 8),
}


def _median_seconds(fn, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(config: str, size: int, batch: int, precision: str, steps: int, warmup: int) -> dict[str, float]:
    common = [f"data.image_size={size}", f"engine.global_batch_size={batch}", f"engine.precision={precision}",
              "engine.zero_stage=0", "model.router_dropout=0.4"]
    results = {}
    for label, extra in (("full", []), ("vanilla", VANILLA)):
        cfg = load_config(REPO / config, common + extra, check_paths=False, world_size=1)
        seed_everything(0)
        step = SPNetStep(cfg, build_model(cfg), torch.device("cpu"), world_size=1, steps_per_epoch=1000)
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, size, size, generator=g)
        targets = torch.randint(0, cfg.model.num_classes, (batch,), generator=g)
        results[label] = _median_seconds(lambda: step(images, targets), steps, warmup)
        if step.teacher is not None:  # break the extra time down
            teacher = step.teacher
            with torch.no_grad():
                results["teacher_forward"] = _median_seconds(lambda: teacher(images), steps, 1)
                # an eval-mode teacher skips its closed blocks: its cost depends on this rate
                results["teacher_exec_rate"] = teacher(images).gate_decisions.mean().item()
                teacher.module.set_gate_override(True)  # worst case: the teacher runs every block
                results["teacher_forward_all_open"] = _median_seconds(lambda: teacher(images), steps, 1)
                teacher.module.set_gate_override(None)
            results["teacher_update"] = _median_seconds(lambda: teacher.update(step.model), steps, 1)
    results["ratio"] = results["full"] / results["vanilla"]
    results["ratio_all_open"] = (results["full"] - results["teacher_forward"]
                                 + results["teacher_forward_all_open"]) / results["vanilla"]
    results["other_extra"] = results["full"] - results["vanilla"] - results["teacher_forward"] - results["teacher_update"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="autocast precision (CPU bf16 convolutions are slow; fp32 is the CPU default)")
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: all cases")
    args = parser.parse_args()
    D.init_distributed("gloo")
    print(f"threads={torch.get_num_threads()} precision={args.precision} steps={args.steps} (median)")
    for name in args.case or CASES:
        config, size, batch = CASES[name]
        r = bench_case(config, size, batch, args.precision, args.steps, args.warmup)
        extra = r["full"] - r["vanilla"]
        print(f"{name} batch {batch}: full {r['full']:.3f} s/step, vanilla {r['vanilla']:.3f} s/step, "
              f"ratio {r['ratio']:.3f}x")
        print(f"  extra {extra:.3f} s = teacher forward {r['teacher_forward']:.3f} + teacher EMA update "
              f"{r['teacher_update']:.3f} + stage heads/L_evo/L_path/L_logits and their backward {r['other_extra']:.3f}")
        print(f"  teacher execution rate {r['teacher_exec_rate']:.2f} (an eval-mode teacher skips closed blocks); "
              f"with every teacher block executed: teacher forward {r['teacher_forward_all_open']:.3f} s, "
              f"ratio {r['ratio_all_open']:.3f}x")
    D.destroy()


if __name__ == "__main__":
    main()
