"""Benchmark: DALI CPU training loader vs the torchvision DataLoader, same images, same augmentation.

Both loaders come from ``spnet_dist.data.build_loaders`` (what the trainer runs): ImageNet
training recipe (RandomResizedCrop 0.08-1 / 3:4-4:3 to 224 px, flip, normalise to float32 NCHW),
one rank, the same batch size, and the same CPU parallelism (``--workers`` DALI threads vs
``--workers`` DataLoader worker processes). The machine is shared, so the two are measured in
alternation (``--repeats`` rounds of one full epoch each, after one warm-up epoch each) and the
spread of the per-round ratios is printed, with the CPU time per image of each (all threads and
worker processes), which the neighbours' load affects far less than wall time. Then a
one-thread per-stage breakdown in CPU time says where the time goes. The last line is the ratio.

    python tools/make_fake_imagenet.py /tmp/fake --classes 10 --per-class 200
    python tools/bench_loader.py --data /tmp/fake

No assertion: a benchmark reports, it does not pass or fail.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import time
import types
from pathlib import Path

import psutil
import torch


def _cfg(root: str, backend: str, workers: int, size: int):
    return types.SimpleNamespace(format="imagefolder", root=root, image_size=size, augment="imagenet",
                                 num_workers=workers, eval_batch_size=64, backend=backend,
                                 dali_device="cpu", on_corrupt="error")


def _cpu_seconds() -> float:
    """CPU time of this process (all DALI threads) + its live children (DataLoader workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _epoch_rate(loader, epoch: int) -> tuple[float, float]:
    """(images per wall second, CPU milliseconds per image) over one full epoch."""
    loader.set_epoch(epoch)
    cpu, start, images = _cpu_seconds(), time.perf_counter(), 0
    for x, y in loader:
        images += y.numel()
    wall = time.perf_counter() - start
    return images / wall, (_cpu_seconds() - cpu) * 1e3 / images


def _breakdown(root: str, size: int, n: int) -> list[str]:
    """CPU milliseconds per image of each stage, one thread, both backends, first ``n`` train files.

    CPU time (``time.process_time``), not wall time: on a shared machine the wall clock mostly
    measures the neighbours.
    """
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image
    from torchvision import transforms as T

    from spnet_dist.data.folder import load_split
    from spnet_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    samples = load_split(root, "train").samples[:n]
    blobs = [Path(p).read_bytes() for p, _ in samples]

    def cpu_ms(fn_) -> float:
        start = time.process_time()
        fn_()
        return (time.process_time() - start) * 1e3 / n

    torch.manual_seed(0)
    rrc, flip = T.RandomResizedCrop(size), T.RandomHorizontalFlip()
    to_tensor, norm = T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    decoded, cropped = [], []
    tv = {"decode (full image)": cpu_ms(lambda: decoded.extend(Image.open(io.BytesIO(b)).convert("RGB") for b in blobs)),
          "RandomResizedCrop+flip": cpu_ms(lambda: cropped.extend(flip(rrc(im)) for im in decoded)),
          "ToTensor+Normalize": cpu_ms(lambda: [norm(to_tensor(im)) for im in cropped])}

    files, batch = [p for p, _ in samples], 32

    def dali_until(stage: str, **resize_kwargs) -> float:
        @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=0)
        def pipe():
            jpegs, _ = fn.readers.file(files=files)
            if stage == "read":
                return jpegs
            images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
            if stage == "decode":
                return images
            resize = {"interp_type": types.INTERP_LINEAR, "antialias": True, **resize_kwargs}
            images = fn.resize(images, resize_x=size, resize_y=size, **resize)
            if stage == "resize":
                return images
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, mirror=fn.random.coin_flip(),
                                            mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])

        p = pipe()
        p.build()
        p.run()  # warm-up
        runs = max(1, n // batch - 1)
        start = time.process_time()
        for _ in range(runs):
            p.run()
        p._shutdown()
        return (time.process_time() - start) * 1e3 / (runs * batch)

    cumulative = {stage: dali_until(stage) for stage in ("read", "decode", "resize", "normalise")}
    dali = {"read file": cumulative["read"],
            "fused decode + random crop": cumulative["decode"] - cumulative["read"],
            "resize (antialiased)": cumulative["resize"] - cumulative["decode"],
            "flip + normalise to float": cumulative["normalise"] - cumulative["resize"]}
    # What-if: the resampler is DALI's largest stage; cheaper filters change the augmentation
    # (torchvision/PIL antialias when downscaling), so the loaders do not use them.
    filters = {"linear, no antialias": dict(antialias=False),
               "nearest": dict(antialias=False, interp_type=types.INTERP_NN)}
    what_if = {k: dali_until("resize", **kw) - cumulative["decode"] for k, kw in filters.items()}
    return [f"  torchvision/PIL: " + ", ".join(f"{k} {v:.2f}" for k, v in tv.items()) + f"  = {sum(tv.values()):.2f} ms",
            f"  DALI CPU:        " + ", ".join(f"{k} {v:.2f}" for k, v in dali.items()) + f"  = {cumulative['normalise']:.2f} ms",
            "  DALI resize with other filters (not used: they change the augmentation): "
            + ", ".join(f"{k} {v:.2f}" for k, v in what_if.items()) + " ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ImageNet-layout root (tools/make_fake_imagenet.py)")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader workers")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--size", type=int, default=224, help="output side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurement rounds")
    parser.add_argument("--breakdown-images", type=int, default=160, help="images in the 1-thread breakdown")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collects batches; parallelism is the workers'

    from spnet_dist.data import build_loaders

    loaders = {name: build_loaders(_cfg(args.data, name, args.workers, args.size), args.batch)[0]
               for name in ("torchvision", "dali")}
    n = len(loaders["dali"]) * args.batch
    print(f"{n} images/epoch of {args.data}, batch {args.batch}, {args.size} px, {args.workers} "
          f"DataLoader workers vs {args.workers} DALI threads, {torch.get_num_threads()} torch thread(s)")
    for name, loader in loaders.items():  # warm-up: worker start-up, page cache, allocators
        _epoch_rate(loader, 0)
    rates = {name: [] for name in loaders}
    cpu_ms = {name: [] for name in loaders}
    for r in range(args.repeats):
        for name, loader in loaders.items():
            rate, ms = _epoch_rate(loader, r + 1)
            rates[name].append(rate)
            cpu_ms[name].append(ms)
        print(f"  round {r + 1}: torchvision {rates['torchvision'][-1]:7.1f} img/s   "
              f"DALI {rates['dali'][-1]:7.1f} img/s   ratio {rates['dali'][-1] / rates['torchvision'][-1]:.2f}   "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    ratios = [d / t for d, t in zip(rates["dali"], rates["torchvision"])]
    print("where the time goes: CPU time per image, all threads and worker processes included: "
          f"torchvision {statistics.median(cpu_ms['torchvision']):.2f} ms, "
          f"DALI {statistics.median(cpu_ms['dali']):.2f} ms "
          f"({statistics.median(cpu_ms['torchvision']) / statistics.median(cpu_ms['dali']):.2f}x less work)")
    print("per stage, CPU ms per image (one thread, same files):")
    for row in _breakdown(args.data, args.size, args.breakdown_images):
        print(row)
    tv, dali = statistics.median(rates["torchvision"]), statistics.median(rates["dali"])
    print(f"median: torchvision {tv:.1f} img/s, DALI CPU {dali:.1f} img/s; per-round ratio "
          f"min {min(ratios):.2f} / median {statistics.median(ratios):.2f} / max {max(ratios):.2f}")
    print(f"DALI/torchvision images/s ratio: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
