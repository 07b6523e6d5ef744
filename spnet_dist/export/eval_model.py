"""spnet-eval: evaluate an exported SP-Net on an image folder, on 1 or N ranks.

Reports top-1, dynamic MACs per image (mean and distribution, plain MACs and the paper's
2 x MACs), per-block execution rates and images/s; every image is counted exactly once across
ranks (the trainer's sharded evaluation loader and integer all-reduces, so the numbers equal
the trainer's final evaluation of the same weights). Writes ``report.json``,
``exec_rates.png`` (per-block execution rates) and ``macs_hist.png`` (per-image MACs).

    spnet-eval --model OUT --data DIR [--batch-size B] [--device cpu|cuda] [--out REPORT_DIR]
    torchrun --nproc_per_node 2 -m spnet_dist.export.eval_model --model OUT --data DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .. import distributed as D
from ..config import Config
from ..data import build_eval_loader
from ..data.folder import ImageFolderDataset
from ..data.transforms import build_transform
from ..device_profile import resolve_device_profile
from ..evaluate import evaluate
from ..flops import paper_units, profile_macs
from .inference import ExportError, load_model, read_export_config

REPORT_FILE = "report.json"
RATES_PNG = "exec_rates.png"
MACS_PNG = "macs_hist.png"


def open_folder(data: Path, config: dict[str, Any]) -> ImageFolderDataset:
    """``DIR/val`` if it exists, else ``DIR`` itself, as class folders with the export's transform.

    Raises:
        ExportError: the folder is missing or its classes differ from the training classes.
    """
    folder = data / "val" if (data / "val").is_dir() else data
    if not folder.is_dir():
        raise ExportError(f"--data: {data} is not a directory")
    pre = config["preprocessing"]
    try:
        dataset = ImageFolderDataset(str(folder), transform=build_transform(pre["recipe"], pre["image_size"], train=False))
    except FileNotFoundError as err:
        raise ExportError(f"--data: {' '.join(str(err).split())}") from None
    classes = config.get("classes")
    if classes is not None and dataset.classes != classes:
        raise ExportError(f"--data: class folders of {folder} ({dataset.classes[:4]}...) differ from the "
                          f"training classes ({classes[:4]}...); labels would not match")
    if len(dataset.classes) != config["architecture"]["num_classes"]:
        raise ExportError(f"--data: {folder} has {len(dataset.classes)} classes, the model "
                          f"{config['architecture']['num_classes']}")
    return dataset


def _gather_floats(values: list[float], device: torch.device) -> list[float]:
    # Every rank's per-image MACs (variable counts); evaluation only, not a training step.
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


def run_eval(model_dir: Path, data: Path, batch_size: int, device: torch.device,
             precision: Optional[str] = None) -> dict[str, Any]:
    """Evaluate the export on this rank's shard and reduce across ranks; every rank returns the report.

    Args:
        model_dir: the export directory.
        data: image folder (``DIR/val/<class>/*`` or ``DIR/<class>/*``).
        batch_size: images per forward on each rank.
        device: where to run.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast; None: the precision the run
            trained and evaluated with (so the trainer's numbers are reproduced).
    """
    config = read_export_config(model_dir)
    if config.get("static"):
        raise ExportError(f"{model_dir}: a --static export has no routers; evaluate the SP-Net export")
    dataset = open_folder(data, config)
    # The trainer's resolver for this process's device: autocast dtype and skip strategy. Only the
    # run's precision carries over; the training-only fields (sync_bn, NCCL, ...) do not apply here.
    settings = Config()
    settings.engine.precision = precision = precision or config["preprocessing"].get("precision", "fp32")
    device_profile = resolve_device_profile(settings, device)
    model = load_model(model_dir, device=device, execution="skip", skip_strategy=device_profile.eval_skip_strategy)
    size = config["preprocessing"]["image_size"]
    profile = profile_macs(model, (size, size))
    autocast = device_profile.autocast()
    loader = build_eval_loader(dataset, batch_size, D.get_rank(), D.get_world_size())

    per_image: list[float] = []

    def collect(out) -> None:
        per_image.extend(profile.dynamic(out.gate_decisions).tolist())

    start = time.perf_counter()
    result = evaluate(model, loader, profile, device, autocast, on_batch=collect)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    macs = torch.tensor(_gather_floats(per_image, device), dtype=torch.float64)
    quantiles = torch.quantile(macs, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
    return {
        "model": str(model_dir),
        "data": str(data),
        "precision": precision,
        "world_size": D.get_world_size(),
        **result,
        "macs_per_image": {
            "unit": "GMACs (plain); the paper's GMACCs are 2 x these",
            "mean": result["gmacs"], "mean_paper": result["gmacs_paper"],
            "std": macs.std(unbiased=False).item() / 1e9,
            "min": quantiles[0] / 1e9, "p10": quantiles[1] / 1e9, "median": quantiles[2] / 1e9,
            "p90": quantiles[3] / 1e9, "max": quantiles[4] / 1e9,
            "median_paper": paper_units(quantiles[2]),
            "values": [v / 1e9 for v in macs.tolist()],
        },
        "images_per_sec": result["images"] / max(elapsed.item(), 1e-9),
        "measured_at_training": config.get("measured"),
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    """``report.json`` and the two PNGs (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rates = report["exec_rates"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rates)), 3.5))
    ax.bar(range(1, len(rates) + 1), rates, color="tab:blue")
    ax.set(xlabel="gated block", ylabel="execution rate", ylim=(0, 1),
           title=f"per-block execution rates (mean {report['exec_rate']:.3f})")
    fig.tight_layout()
    fig.savefig(out / RATES_PNG, dpi=100)
    plt.close(fig)

    values = report["macs_per_image"]["values"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=min(50, max(5, len(set(values)))), color="tab:orange")
    ax.axvline(report["gmacs"], color="k", linestyle="--", label=f"mean {report['gmacs']:.4g}")
    ax.axvline(report["static_gmacs"], color="tab:red", linestyle=":", label=f"static {report['static_gmacs']:.4g}")
    ax.set(xlabel="GMACs per image (paper unit: x2)", ylabel="images", title="dynamic MACs per image")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / MACS_PNG, dpi=100)
    plt.close(fig)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def cli(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="spnet-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="OUT", help="spnet-export directory")
    parser.add_argument("--data", required=True, metavar="DIR", help="image folder: DIR/val/<class>/* or DIR/<class>/*")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="autocast precision (default: the run's training precision)")
    parser.add_argument("--out", default=None, metavar="DIR", help="report directory (default: MODEL/eval)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size: must be >= 1, got {args.batch_size}")
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    if (out / REPORT_FILE).exists():
        parser.error(f"--out: {out / REPORT_FILE} already exists; choose another --out")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / deepspeed / SLURM job
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    is_main = True
    if launched:
        info = D.init_distributed("nccl" if device.type == "cuda" else "gloo")
        device, is_main = info.device, info.is_main
    try:
        report = run_eval(Path(args.model), Path(args.data), args.batch_size, device, args.precision)
    except ExportError as err:
        print(f"spnet-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if is_main:
        write_report(report, out)
        print(f"top-1 {report['top1']:.2f} %  |  {report['gmacs']:.4f} GMACs/image (paper unit {report['gmacs_paper']:.4f}), "
              f"static {report['static_gmacs']:.4f}, ratio {report['mac_ratio']:.3f}  |  mean execution rate "
              f"{report['exec_rate']:.3f}  |  {report['images']} images, {report['images_per_sec']:.0f} img/s  ->  {out}")
    if launched:
        D.destroy()


if __name__ == "__main__":
    cli()
