"""Benchmark: cost of a full SP-Net training step relative to a vanilla gated step, before and
after the GPU hot-path changes (hookless teacher, no throughput timer, cached EMA update,
vectorised L_evo), with the host-device synchronisations of each step.

Every variant runs the same gated model through the same DeepSpeed engine in this process:

* ``vanilla``: what SP-Net adds switched off (EMA teacher, L_path/L_logits, stage classifiers, L_evo);
* ``before``: the full step as it was: the teacher deep-copied WITH the student engine's forward
  hooks, DeepSpeed's synchronized throughput timer on, the per-step name-matching EMA update
  and the Python loop over L_evo pairs (both kept below, callable, for this comparison);
* ``after``: the full step as it is now.

Both full variants run the teacher on the masked path (every teacher block executed: the
worst case on CPU and the CUDA default), so the ratio bounds the cost at any execution rate;
``after-skip`` adds the CPU default (closed teacher blocks skipped).

Timing: each round runs every variant for ``--steps`` steps, in an order shuffled afresh every
round (seeded, ``--seed``). A fixed order moved the answer: a variant pays for what the one run
just before it left behind (caches, the allocator's free lists, the CPU's clock), and in a fixed
order the same variant pays it every round: on one quiet 2-core machine the fixed order gave the
full step 1.68x the vanilla step (R110, teacher all-open) where timing only those two,
interleaved the same way, gave 1.36x. Each question is answered by ONE ratio, computed within
each round (the two variants it compares ran minutes apart at most) and reported as the median
and the [min-max] spread over the rounds; per-variant seconds get the same spread.

    python tools/bench_step.py                   # CIFAR ResNet-110 (32 px) and ResNet-50 (112 px)
    python tools/bench_step.py --case resnet50@112 --rounds 7

No assertion: a benchmark reports, it does not pass or fail.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence
from unittest import mock

import torch
import torch.nn.functional as F

from spnet_dist import distributed as D
from spnet_dist import losses
from spnet_dist.config import load_config
from spnet_dist.device_audit import HostSyncCounter
from spnet_dist.execution import set_execution
from spnet_dist.teacher import EMATeacher
from spnet_dist.models.from_config import build_model
from spnet_dist.training import step as step_module
from spnet_dist.training.reproducibility import seed_everything
from spnet_dist.training.step import SPNetStep

REPO = Path(__file__).resolve().parents[1]
VANILLA = ["teacher.enabled=false", "loss.alpha=0", "loss.beta=0", "loss.stage_heads=false",
           "loss.evo_strategy=none", "loss.gamma=0"]
CASES = {
    "cifar_resnet110@32": ("configs/cifar10/spnet_r110.yaml", 32, 32),
    "resnet50@112": ("configs/imagenet/spnet_r50.yaml", 112, 8),
}


# ------------------------------------------------------------------ the implementations replaced
@torch.no_grad()
def legacy_teacher_update(teacher: EMATeacher, student: torch.nn.Module) -> None:
    """The EMA update before the hot-path changes: names matched and tensors cast every step, buffers copied one by one."""
    weight = 1.0 - teacher.momentum

    def matching(named, like):
        pairs = list(named)
        assert [n for n, _ in pairs] == [n for n, _ in like]
        return [s.detach().to(device=t.device, dtype=t.dtype) for (_, s), (_, t) in zip(pairs, like)]

    t_named = list(teacher.module.named_parameters())
    torch._foreach_lerp_([t for _, t in t_named], matching(student.named_parameters(), t_named), weight)
    t_bufs = list(teacher.module.named_buffers())
    for (_, t), s in zip(t_bufs, matching(student.named_buffers(), t_bufs)):
        t.copy_(s)
    teacher.num_updates += 1


def legacy_evolution_loss(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_evo before vectorisation: a Python loop over consecutive pairs of differences."""
    if len(features) < 3:
        return torch.zeros((), device=features[0].device if features else None)
    fs = [f.float() for f in features]
    diffs = [b - a for a, b in zip(fs[:-1], fs[1:])]
    total = 0.0
    for d_prev, d_next in zip(diffs[:-1], diffs[1:]):
        total = total + (1.0 - F.cosine_similarity(d_next, d_prev, dim=-1)).mean()
    return 0.5 * total


def _ds_config_before(*args, **kwargs) -> dict:
    ds = train_deepspeed_config(*args, **kwargs)
    ds.pop("timers")  # DeepSpeed's default: throughput timer enabled and synchronized
    return ds


train_deepspeed_config = step_module.deepspeed_config


# ------------------------------------------------------------------ variants
class Variant:
    """One SPNetStep plus the patches that make it behave as ``label`` says."""

    def __init__(self, label: str, cfg, before: bool = False) -> None:
        self.label = label
        self.before = before
        seed_everything(0)
        patches = [mock.patch.object(step_module, "deepspeed_config", _ds_config_before),
                   mock.patch("spnet_dist.teacher.remove_module_hooks", lambda module: None)] if before else []
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            self.step = SPNetStep(cfg, build_model(cfg), torch.device("cpu"), world_size=1, steps_per_epoch=1000)
        if before and self.step.teacher is not None:
            teacher = self.step.teacher
            teacher.update = lambda student: legacy_teacher_update(teacher, student)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        with (mock.patch.object(losses, "evolution_loss", legacy_evolution_loss) if self.before
              else contextlib.nullcontext()):
            self.step(images, targets)


def _seconds(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, per_round: int,
                rng: random.Random) -> dict[str, list[float]]:
    """Mean seconds per call of every function in every round (a list per function, one entry per round).

    Every round runs every function ``per_round`` times, in an order ``rng`` shuffles afresh each
    round, so no function always runs right after the same other one.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            times[name].append(_seconds(fns[name], per_round))
    return times


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """``num / den`` within each round (paired), as (median, min, max) over the rounds."""
    return spread([a / b for a, b in zip(times[num], times[den])])


def fmt(values: tuple[float, float, float], unit: str = "", digits: int = 3) -> str:
    med, lo, hi = values
    return f"{med:.{digits}f}{unit} [{lo:.{digits}f}-{hi:.{digits}f}]"


def syncs_per_step(variant: Variant, images, targets, steps: int = 2) -> dict[str, float]:
    with HostSyncCounter() as counter:
        for _ in range(steps):
            variant(images, targets)
    return {k: v / steps for k, v in sorted(counter.counts.items())}


def bench_case(config: str, size: int, batch: int, precision: str, rounds: int, steps: int,
               warmup: int, rng: random.Random) -> dict[str, object]:
    common = [f"data.image_size={size}", f"engine.global_batch_size={batch}", f"engine.precision={precision}",
              "engine.zero_stage=0"]
    load = lambda extra: load_config(REPO / config, common + extra, check_paths=False, world_size=1)  # noqa: E731
    variants = {
        "vanilla": Variant("vanilla", load(VANILLA)),
        "before": Variant("before", load(["teacher.execution=masked"]), before=True),
        "after": Variant("after", load(["teacher.execution=masked"])),
        "after-skip": Variant("after-skip", load(["teacher.execution=skip"])),
    }
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = torch.randint(0, variants["after"].step.model.num_classes, (batch,), generator=g)
    for v in variants.values():  # warm-up, and past DeepSpeed's throughput-timer start_step (2)
        for _ in range(max(warmup, 3)):
            v(images, targets)
    r: dict[str, object] = {"step": interleaved({k: (lambda v=v: v(images, targets)) for k, v in variants.items()},
                                                rounds, steps, rng)}
    r["syncs"] = {k: syncs_per_step(variants[k], images, targets) for k in ("before", "after", "after-skip")}

    # Components of the extra time, on the "after" step's own teacher and student.
    step = variants["after"].step
    teacher = step.teacher
    with torch.no_grad():
        set_execution(teacher.module, "masked")
        r["teacher_forward"] = interleaved({"masked": lambda: teacher(images)}, rounds, steps, rng)["masked"]
    r["update"] = interleaved({"before": lambda: legacy_teacher_update(teacher, step.model),
                               "after": lambda: teacher.update(step.model)}, rounds, steps, rng)
    # L_evo forward + backward on the widest chain the model offers: every block ('blocks' strategy).
    n_blocks, dim = step.model.num_blocks, step.model.num_features
    feats = [torch.randn(batch, dim, generator=g).requires_grad_() for _ in range(n_blocks)]
    r["evo"] = interleaved({"before": lambda: legacy_evolution_loss(feats).backward(),
                            "after": lambda: losses.evolution_loss(feats).backward()}, rounds, 5 * steps, rng)
    heads = sum(p.numel() for p in step.model.aux_heads.parameters())
    r["params"] = (sum(p.numel() for p in step.model.parameters()) - heads, heads)
    r["n_blocks"] = n_blocks
    return r


# The questions this benchmark answers, one ratio each: (question, numerator, denominator).
QUESTIONS = (
    ("what the full SP-Net step costs over the vanilla step (teacher runs every block)", "after", "vanilla"),
    ("what the GPU hot-path changes saved (step before / after)", "before", "after"),
    ("what the CPU's skipping teacher saves (after-skip / after)", "after-skip", "after"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="rounds (median and [min-max] reported)")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round variant order")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="autocast precision (CPU bf16 convolutions are slow; fp32 is the CPU default)")
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: all cases")
    args = parser.parse_args()
    D.init_distributed("gloo")
    rng = random.Random(args.seed)
    print(f"threads={torch.get_num_threads()} precision={args.precision}: {args.rounds} rounds x {args.steps} "
          f"steps per variant, order shuffled every round (seed {args.seed}); median [min-max] over the rounds")
    for name in args.case or CASES:
        config, size, batch = CASES[name]
        r = bench_case(config, size, batch, args.precision, args.rounds, args.steps, args.warmup, rng)
        t = r["step"]
        print(f"\n{name} batch {batch}:")
        for k in ("vanilla", "before", "after", "after-skip"):
            print(f"  {k:10s} {fmt(spread(t[k]), ' s/step')}")
        for question, num, den in QUESTIONS:
            print(f"  {question}: {fmt(ratio(t, num, den), 'x')}")
        for k, counts in r["syncs"].items():
            shown = ", ".join(f"{n} {c:g}" for n, c in counts.items()) or "none"
            print(f"  host syncs per step, {k:10s}: {shown}")
        up, evo = r["update"], r["evo"]
        print(f"  teacher EMA update: before {1e3 * statistics.median(up['before']):.1f} ms, after "
              f"{1e3 * statistics.median(up['after']):.1f} ms ({fmt(ratio(up, 'before', 'after'), 'x', 2)})")
        print(f"  L_evo fwd+bwd over {r['n_blocks']} block features: before {1e3 * statistics.median(evo['before']):.2f} ms, "
              f"after {1e3 * statistics.median(evo['after']):.2f} ms ({fmt(ratio(evo, 'before', 'after'), 'x', 2)})")
        extra = statistics.median([a - b for a, b in zip(t["after"], t["vanilla"])])
        forward, update = statistics.median(r["teacher_forward"]), statistics.median(up["after"])
        rest = extra - forward - update
        backbone, heads = r["params"]
        print(f"  after: extra {extra:.3f} s (median of the rounds' differences) = teacher forward {forward:.3f} "
              f"+ EMA update {update:.3f} + stage heads/L_path/L_logits/L_evo with backward and optimizer {rest:.3f}")
        print(f"  stage heads hold {heads / 1e6:.2f} M parameters next to the network's {backbone / 1e6:.2f} M: "
              f"SGD, gradient bucketing and the EMA cover {100 * heads / backbone:.0f} % more tensors "
              f"whatever the batch size")
    D.destroy()


if __name__ == "__main__":
    main()
