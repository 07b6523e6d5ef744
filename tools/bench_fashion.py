"""Benchmark: the Fashion-MNIST recipe's cost per training and per evaluated image, by method and resolution.

Per-image mode (default), one case per process (``--config``, ``--size``): builds the real :class:`spnet_dist.training.trainer.Trainer`
(DeepSpeed engine, teacher, losses, the fashion_mnist loader in the main process) in a temporary
directory, trains ``--warmup`` steps untimed, then ``--steps`` timed steps, then evaluates the
validation split once. Prints one JSON line: CPU seconds (``time.process_time``: all threads of
the process, so contention from other processes does not inflate it) and wall seconds per
training image and per evaluated image, and the execution rate at the timed evaluation.

    OMP_NUM_THREADS=1 nice -n 10 python tools/bench_fashion.py --config configs/fashion/spnet.yaml --size 28

Whole-run mode (``--run``): trains the config to its end (``fit``), then evaluates the final
student on the official test set; prints the run's CPU and wall seconds (imports excluded, about
6 CPU-s more), the test evaluation's, and validation / test top-1 and MAC ratio.

    OMP_NUM_THREADS=1 nice -n 10 python tools/bench_fashion.py --run --config configs/fashion/baseline.yaml --size 16

Training cost falls with the execution rate (closed blocks are skipped by the CPU teacher and by
evaluation); measured in the first epoch, where the routers are still mostly open, the figures
are an upper bound for trained runs at t <= 0.7. No assertion: a benchmark reports.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import islice

import torch

from spnet_dist import distributed as D
from spnet_dist.config import load_config
from spnet_dist.data import build_test_loader
from spnet_dist.evaluate import evaluate
from spnet_dist.training.trainer import Trainer


def whole_run(cfg) -> dict:
    """``fit`` the config, then the official test set: seconds and accuracies."""
    cpu, wall = time.process_time(), time.perf_counter()
    trainer = Trainer(cfg)
    record = trainer.fit()
    fit_cpu, fit_wall = time.process_time() - cpu, time.perf_counter() - wall
    cpu, wall = time.process_time(), time.perf_counter()
    test = evaluate(trainer.model, build_test_loader(cfg.data), trainer.mac_profile, trainer.device,
                    trainer.step_fn.autocast)
    return {"fit_cpu_s": round(fit_cpu, 1), "fit_wall_s": round(fit_wall, 1),
            "test_cpu_s": round(time.process_time() - cpu, 1), "test_wall_s": round(time.perf_counter() - wall, 1),
            "val_top1": record["top1"], "val_mac_ratio": round(record["mac_ratio"], 4),
            "test_top1": test["top1"], "test_mac_ratio": round(test["mac_ratio"], 4),
            "test_exec_rate": round(test["exec_rate"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/fashion/spnet.yaml")
    p.add_argument("--size", type=int, default=28, help="data.image_size")
    p.add_argument("--warmup", type=int, default=10, help="untimed training steps first")
    p.add_argument("--steps", type=int, default=30, help="timed training steps")
    p.add_argument("--run", action="store_true", help="whole-run mode: fit, then the test set")
    p.add_argument("overrides", nargs="*", help="more section.key=value overrides")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [f"data.image_size={args.size}", f"run.out_dir={out}", "run.progress=none",
                                        "run.tensorboard=false", "run.resume=never", *args.overrides], world_size=1)
        if args.run:
            try:
                print(json.dumps({"config": args.config, "size": args.size, "overrides": args.overrides,
                                  **whole_run(cfg)}), flush=True)
            finally:
                D.destroy()
            return
        trainer = Trainer(cfg)
        try:
            trainer.model.train()
            trainer.train_loader.set_epoch(0)
            batches = iter(trainer.train_loader)
            for images, targets in islice(batches, args.warmup):
                trainer.train_step(images, targets)
            cpu, wall, n = time.process_time(), time.perf_counter(), 0
            for images, targets in islice(batches, args.steps):
                terms, _ = trainer.train_step(images, targets)
                n += images.shape[0]
            float(terms["total"])
            train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall
            cpu, wall = time.process_time(), time.perf_counter()
            record = trainer.evaluate()
            eval_cpu, eval_wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            trainer.log.close()
            trainer._undo_deterministic()
            D.destroy()
    images_eval = trainer.val_loader.num_samples
    print(json.dumps({
        "config": args.config, "size": args.size, "train_images": n, "eval_images": images_eval,
        "train_ms_cpu": round(1e3 * train_cpu / n, 3), "train_ms_wall": round(1e3 * train_wall / n, 3),
        "train_img_s_cpu": round(n / train_cpu, 1), "train_img_s_wall": round(n / train_wall, 1),
        "eval_ms_cpu": round(1e3 * eval_cpu / images_eval, 3), "eval_ms_wall": round(1e3 * eval_wall / images_eval, 3),
        "exec_rate": round(record["exec_rate"], 3), "mac_ratio": round(record["mac_ratio"], 3),
        "static_gmacs": round(record["static_gmacs"], 5),
    }), flush=True)


if __name__ == "__main__":
    main()
