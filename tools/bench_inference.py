"""Benchmark: skipping inference vs the dense masked form on an exported SP-Net, against the ideal.

One run measures, on CPU, an exported SP-Net ResNet-50 at 224 px (``spnet_dist.load_model``):

* routers calibrated so every block opens for about ``rate`` of the samples, decided per
  sample (router BN statistics and thresholds set on a calibration batch; the timed batches
  are other images, so rates and MACs are measured on them, not assumed);
* masked ("dense": every block computed, multiplied by its 0/1 gate) and skipping runs
  interleaved repeat by repeat, at batch 1 and batch 32; batch 1 times ``--batch1-images``
  distinct images one forward each (a single image's block pattern decides alone whether its
  speed-up lands above or below 1 / MAC-ratio: at batch 1 the stage-4 blocks, weight-memory
  bound, cost ~1.8x more per MAC than the others);
* printed: median seconds (and min-max spread) of each, the measured speed-up (median of the
  per-repeat ratios masked/skip of adjacent runs, which cancels slow load changes on a shared
  machine better than a ratio of medians; its min-max in brackets), the ideal
  speed-up 1 / MAC-ratio of the very same batches (MACs from ``spnet_dist.flops``), the
  fraction of ideal, and where the skipping forward spends its time (routers, gathers /
  scatter-adds, the rest) from ``torch.profiler``;
* the kernel-time bound: all blocks closed (fixed layers only: stem, projection shortcuts,
  routers, head) and all blocks open, timed with the same model, give the time the skipping
  forward would take if it had no overhead at all, T_closed + (T_open - T_closed) x (executed
  residual MACs / all residual MACs). The ideal 1 / MAC-ratio assumes instead that every layer
  runs at the same speed per MAC; the fixed layers do not (memory-bound projections, the stem).

Both forms run the model's inference schedule as ``load_model`` sets it: on the CPU the stem and
stages 1-2 image by image, stages 3-4 on the batch (``--per-image-stages off``: whole batches
throughout, to compare).

    python tools/bench_inference.py                       # rates 0.5 and 0.75, batches 1 and 32
    python tools/bench_inference.py --repeats 3 --rates 0.5 --batches 1

The machine may be shared: run under ``nice``, read the spread. No assertion: it reports.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from spnet_dist import load_model
from spnet_dist.config import Config
from spnet_dist.execution import PER_IMAGE_STAGES
from spnet_dist.export import export_module
from spnet_dist.flops import profile_macs
from spnet_dist.models import create_model
from spnet_dist.models.gates import GateOutput


def calibrate_routers(model, images: torch.Tensor, rate: float, seed: int = 0) -> None:
    """Make every router open for about ``rate`` of the samples, decided per sample.

    Router BN statistics are set from ``images`` (so hidden features vary O(1) between
    samples), the last layer is random, and its execute-bias is shifted so that the
    ``rate`` quantile of logit1 - logit0 is 0, block after block in one forward pass (each
    block's threshold sees the inputs the earlier, already calibrated blocks produce).
    """
    g = torch.Generator().manual_seed(seed)
    routers = [block.router for block in model.gated_blocks()]
    for router in routers:
        router.fc2.weight.data.normal_(0, 1.0, generator=g)
        router.fc2.bias.data.zero_()
        router.bn.momentum = 1.0
    model.train()  # router BN running stats <- calibration batch (momentum 1); dropout off below
    for router in routers:
        router.dropout.p = 0.0
        router.force = True  # every block open while the statistics are collected
    with torch.no_grad():
        model(images)
    for router in routers:
        router.force = None
    model.eval()

    def shift(router, _inputs, out: GateOutput) -> GateOutput:
        diff = out.logits[:, 1] - out.logits[:, 0]
        threshold = torch.quantile(diff, 1.0 - rate)
        router.fc2.bias.data[1] -= threshold
        logits = out.logits.clone()
        logits[:, 1] -= threshold
        return GateOutput(logits, logits.softmax(-1)[:, 1], (logits[:, 1] > logits[:, 0]).to(logits.dtype))

    hooks = [r.register_forward_hook(shift) for r in routers]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()


def seconds(model, batches: list[torch.Tensor]) -> float:
    """One measurement: mean seconds per forward over one pass through ``batches``."""
    start = time.perf_counter()
    for x in batches:
        model(x)
    return (time.perf_counter() - start) / len(batches)


def breakdown(model, batches: list[torch.Tensor]) -> dict[str, float]:
    """Seconds of one skipping forward spent in routers, in gathers/scatter-adds, and elsewhere."""
    originals = {}
    for block in model.gated_blocks():
        router = block.router
        originals[router] = router.forward

        def timed(*args, _forward=router.forward):
            with record_function("router"):
                return _forward(*args)

        router.forward = timed
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for x in batches:
                model(x)
            wall = time.perf_counter() - start
    finally:
        for router, forward in originals.items():
            router.forward = forward
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    gathers = sum(totals.get(k, 0.0) for k in ("aten::index", "aten::index_select", "aten::index_add_",
                                                 "aten::index_copy_", "aten::nonzero", "aten::argsort"))
    routers = totals.get("router", 0.0)
    return {"wall": wall, "routers": routers, "gathers": gathers, "other": wall - routers - gathers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch1-images", type=int, default=8,
                   help="distinct images timed one by one at batch 1: the speed-up of a population of images, "
                        "not of the block pattern of a single one (blocks differ ~2x in time per MAC at batch 1)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least disturbed by neighbours)")
    p.add_argument("--per-image-stages", choices=PER_IMAGE_STAGES, default="auto",
                   help="load_model's schedule: 'auto' (default) runs the large early stages image by image on the CPU")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # Randomly initialised ResNet-50s can carry denormal activations, which run ~10x slower on
    # x86 and would make the timings about the FPU, not about skipping (a rate-0.75 model
    # measured 2.9 s per masked forward at batch 1 without this, vs 0.14-0.3 s at rate 0.5).
    torch.set_flush_denormal(True)

    cfg = Config()
    cfg.model.name, cfg.model.num_classes = "spnet_resnet50", 1000
    cfg.data.format, cfg.data.image_size = "imagefolder", a.size
    g = torch.Generator().manual_seed(1)
    calibration = torch.randn(64, 3, a.size, a.size, generator=g)
    # batch 1: several images, each its own forward; larger batches: one batch
    timed = {b: list(torch.randn(a.batch1_images if b == 1 else 1, b, 3, a.size, a.size, generator=g))
             for b in a.batches}
    print(f"SP-Net ResNet-50 at {a.size} px, CPU, {a.threads} thread(s), {a.repeats} interleaved repeats, "
          f"batch 1 over {a.batch1_images} images, per-image stages {a.per_image_stages}; "
          "times are medians [min-max] per forward")
    print(f"{'rate':>5} {'batch':>5} {'exec':>6} {'masked s':>24} {'skip s':>24} {'speed-up':>20} "
          f"{'ideal':>6} {'of ideal':>8}")
    rows = []
    for rate in a.rates:
        torch.manual_seed(0)  # the same backbone at every rate; only the routers differ
        model = create_model(cfg.model.name, num_classes=1000)
        calibrate_routers(model, calibration, rate)
        with tempfile.TemporaryDirectory() as tmp:
            out = export_module(model, cfg, Path(tmp) / "export")
            net = load_model(out, execution="skip", per_image_stages=a.per_image_stages)  # as a user gets it
        mac_profile = profile_macs(net, (a.size, a.size))
        for batch in a.batches:
            x = timed[batch]
            with torch.no_grad():
                decisions = torch.cat([net(xb).gate_decisions for xb in x])  # (images, blocks)
            mac_ratio = mac_profile.dynamic(decisions).mean().item() / mac_profile.static()
            times = {"masked": [], "skip": []}
            with torch.inference_mode():
                for mode in ("masked", "skip"):  # warm-up
                    net.set_execution(mode)
                    seconds(net, x)
                for _ in range(a.repeats):
                    for mode in ("masked", "skip"):
                        net.set_execution(mode)
                        times[mode].append(seconds(net, x))
                net.set_execution("skip")
                parts = breakdown(net, x)
            med = {m: statistics.median(t) for m, t in times.items()}
            ratios = [m / s for m, s in zip(times["masked"], times["skip"])]
            speedup, ideal = statistics.median(ratios), 1.0 / mac_ratio
            spread = {m: f"{med[m]:.4f} [{min(t):.4f}-{max(t):.4f}]" for m, t in times.items()}
            ratio_text = f"{speedup:.3f} [{min(ratios):.2f}-{max(ratios):.2f}]"
            print(f"{rate:5.2f} {batch:5d} {decisions.mean().item():6.3f} {spread['masked']:>24} "
                  f"{spread['skip']:>24} {ratio_text:>20} {ideal:6.3f} {speedup / ideal:8.3f}", flush=True)
            with torch.inference_mode():
                bound = {True: [], False: []}
                for _ in range(max(2, a.repeats // 2)):
                    for force in (False, True):
                        net.set_gate_override(force)
                        bound[force].append(seconds(net, x))
                net.set_gate_override(None)
            closed, opened = statistics.median(bound[False]), statistics.median(bound[True])
            residual_share = ((decisions.double() @ torch.tensor(mac_profile.residual, dtype=torch.float64)).mean()
                              / sum(mac_profile.residual)).item()
            kernel_s = closed + (opened - closed) * residual_share
            rows.append((rate, batch, med, mac_ratio, parts, closed, opened, kernel_s,
                         mac_profile.fixed / mac_profile.static()))
    print("\nWhere a skipping forward spends its time (one profiled forward; profiler overhead included),")
    print("and the kernel-time bound (all closed / all open timed; bound = closed + (open - closed) x executed share):")
    print(f"{'rate':>5} {'batch':>5} {'ideal s':>8} {'skip s':>8} {'routers':>8} {'gathers':>8} {'other':>8} "
          f"{'closed s':>8} {'open s':>8} {'fixed time':>10} {'fixed MACs':>10} {'bound s':>8} {'skip/bound':>10}")
    for rate, batch, med, mac_ratio, parts, closed, opened, kernel_s, fixed_macs in rows:
        ideal_s = med["masked"] * mac_ratio  # medians: indicative only
        print(f"{rate:5.2f} {batch:5d} {ideal_s:8.4f} {med['skip']:8.4f} {parts['routers'] / parts['wall']:8.1%} "
              f"{parts['gathers'] / parts['wall']:8.1%} {parts['other'] / parts['wall']:8.1%} {closed:8.4f} "
              f"{opened:8.4f} {closed / opened:10.1%} {fixed_macs:10.1%} {kernel_s:8.4f} {med['skip'] / kernel_s:10.3f}")
    print("ideal s = masked median x MAC ratio; routers / gathers / other as shares of the profiled wall time "
          "(gathers = index / index_select (gather) + index_add_ / index_copy_ (scatter) + nonzero / argsort; other = convolutions, BN, ReLU, stem, head, Python)")


if __name__ == "__main__":
    main()
