"""spnet-eval: evaluate an exported SP-Net on an image folder, on 1 or N ranks.

Reports top-1, dynamic MACs per image (mean and distribution, plain MACs and the paper's
2 x MACs), per-block execution rates and images/s; every image is counted exactly once across
ranks (the trainer's sharded evaluation loader and integer all-reduces, so the numbers equal
the trainer's final evaluation of the same weights). Writes ``report.json``,
``exec_rates.png`` (per-block execution rates) and ``macs_hist.png`` (per-image MACs).

Images are fed like training feeds them (DALI threads or DataLoader workers, never decoded in
the main process), per-image MACs stay on the device until the end, and the report gives the
model's time apart from the time spent waiting for data.

    spnet-eval --model OUT --data DIR [--batch-size B] [--device cpu|cuda] [--out REPORT_DIR]
               [--loader auto|dali|torchvision] [--workers N] [--precision P] [--as-trained]
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
from ..data.dali import DaliEvalLoader, DaliRecipe, dali_available
from ..data.datasets import JPEG_FOLDERS
from ..data.folder import ImageFolderDataset
from ..data.loaders import reader_options, resolve_data_backend
from ..data.protocol import Loader
from ..data.transforms import build_transform
from ..device_profile import resolve_device_profile
from ..evaluate import EvalTimer, evaluate
from ..flops import PerImageMacs, paper_units, profile_macs
from .inference import ExportError, load_model, read_export_config

REPORT_FILE = "report.json"
RATES_PNG = "exec_rates.png"
MACS_PNG = "macs_hist.png"
LOADERS = ("auto", "dali", "torchvision")


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


def run_loader_backend(config: dict[str, Any]) -> str:
    """The backend the run's own evaluation read with (``data.backend`` for its ``data.format``).

    A run that read in-memory arrays (cifar, fashion_mnist) evaluated through torchvision
    transforms, so an image folder of it is read with torchvision too; so is any run when DALI is
    not installed here.
    """
    data = (config.get("run_config") or {}).get("data") or {}
    data_format = data.get("format", "imagefolder")
    if data_format not in JPEG_FOLDERS:
        return "torchvision"
    try:
        return resolve_data_backend(data.get("backend", "auto"), data_format)
    except ValueError:  # 'dali' asked for by the run, not installed here
        return "torchvision"


def build_loader(dataset: ImageFolderDataset, config: dict[str, Any], batch_size: int, device: torch.device,
                 loader: str = "auto", workers: Optional[int] = None,
                 channels_last: bool = False, dali_device: str = "cpu") -> tuple[Loader, dict[str, Any]]:
    """This rank's evaluation loader, fed like training: DALI threads or DataLoader workers.

    Decoding JPEGs with PIL in the main process made spnet-eval's images/s the decoder's.

    Args:
        dataset: the image folder (:func:`open_folder`).
        config: the export's ``config.json``.
        batch_size: images per batch on this rank.
        device: where the model runs.
        loader: ``auto`` (the backend the run evaluated with, so its numbers are reproduced),
            ``dali`` or ``torchvision``.
        workers: DALI threads or DataLoader worker processes; None: the run's ``data.num_workers``
            (at least 1).
        channels_last: DALI batches in channels-last memory (the model's layout).
        dali_device: where DALI decodes (the device profile's ``dali_device_now``: ``gpu`` on CUDA).

    Returns:
        The loader and a description of it for the report.

    Raises:
        ExportError: ``--loader``/``--workers`` out of range, or ``dali`` without DALI installed.
    """
    if loader not in LOADERS:
        raise ExportError(f"--loader: must be one of {list(LOADERS)}, got {loader!r}")
    run_data = (config.get("run_config") or {}).get("data") or {}
    if workers is None:
        workers = max(1, int(run_data.get("num_workers", 2)))
    if workers < 0:
        raise ExportError(f"--workers: must be >= 0, got {workers}")
    backend = run_loader_backend(config) if loader == "auto" else loader
    rank, world = D.get_rank(), D.get_world_size()
    if backend == "torchvision":
        return (build_eval_loader(dataset, batch_size, rank, world, num_workers=workers),
                {"backend": "torchvision", "workers": workers})
    if not dali_available():
        raise ExportError("--loader dali: nvidia.dali is not installed (use --loader torchvision)")
    pre = config["preprocessing"]
    samples = [(os.path.abspath(path), label) for path, label in dataset.samples]
    reader = reader_options(argparse.Namespace(**run_data))  # the run's network-filesystem settings
    return (DaliEvalLoader(samples, batch_size, rank, world, DaliRecipe(pre["recipe"], pre["image_size"], False),
                           num_threads=max(1, workers), dali_device=dali_device, device=device,
                           channels_last=channels_last, reader=reader),
            {"backend": "dali", "dali_device": dali_device, "threads": max(1, workers)})


def load_for_eval(model_dir: Path, device: torch.device, as_trained: bool = False,
                  skip_strategy: str = "auto") -> torch.nn.Module:
    """The export as spnet-eval runs it.

    Args:
        model_dir: the export directory.
        device: where to run.
        as_trained: the network exactly as the trainer evaluated it: BatchNorm not folded and
            NCHW parameters. Under a bf16/fp16 autocast, folding BN into a convolution rounds
            the folded weight to 8 (or 11) mantissa bits, and another memory format picks other
            kernels, so the logits differ from the trainer's by about 1e-2 (measured on CPU:
            0.016 folded, 0.0036 unfolded channels-last, 0.0 as trained); in fp32 the default
            (folded, channels-last) is within 1e-6.
        skip_strategy: how closed blocks are skipped (the device profile's ``eval_skip_strategy``).
    """
    if as_trained:
        return load_model(model_dir, device=device, execution="skip", channels_last=False, optimize=False,
                          skip_strategy=skip_strategy)
    return load_model(model_dir, device=device, execution="skip", skip_strategy=skip_strategy)


def _gather_floats(values: list[float], device: torch.device) -> list[float]:
    # Every rank's per-image MACs (variable counts); evaluation only, not a training step.
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


def run_eval(model_dir: Path, data: Path, batch_size: int, device: torch.device,
             precision: Optional[str] = None, loader: str = "auto", workers: Optional[int] = None,
             as_trained: bool = False) -> dict[str, Any]:
    """Evaluate the export on this rank's shard and reduce across ranks; every rank returns the report.

    Args:
        model_dir: the export directory.
        data: image folder (``DIR/val/<class>/*`` or ``DIR/<class>/*``).
        batch_size: images per forward on each rank.
        device: where to run.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast; None: the precision the run
            trained and evaluated with. With ``as_trained`` that reproduces the trainer's
            logits bit for bit; without it, fp32 does to ~1e-6 and bf16 to ~1e-2.
        loader, workers: see :func:`build_loader`.
        as_trained: see :func:`load_for_eval`.
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
    model = load_for_eval(model_dir, device, as_trained, skip_strategy=device_profile.eval_skip_strategy)
    size = config["preprocessing"]["image_size"]
    profile = profile_macs(model, (size, size))
    autocast = device_profile.autocast()
    batches, loader_info = build_loader(dataset, config, batch_size, device, loader, workers,
                                        channels_last=not as_trained, dali_device=device_profile.dali_device_now)
    per_image = PerImageMacs(profile)
    timer = EvalTimer(device)

    start = time.perf_counter()
    result = evaluate(model, batches, profile, device, autocast,
                      on_batch=lambda out: per_image.add(out.gate_decisions), timer=timer)
    # total, data, model seconds; the slowest rank's (evaluation only: these syncs are not a step's)
    seconds = torch.tensor([time.perf_counter() - start, timer.data_seconds, timer.model_seconds],
                           dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    total_s, data_s, model_s = seconds.tolist()
    macs = torch.tensor(_gather_floats(per_image.values(), device), dtype=torch.float64)
    quantiles = torch.quantile(macs, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
    return {
        "model": str(model_dir),
        "data": str(data),
        "precision": precision,
        "as_trained": as_trained,
        "loader": loader_info,
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
        "images_per_sec": result["images"] / max(total_s, 1e-9),  # end to end, decoding included
        "seconds": {"total": total_s, "data": data_s, "model": model_s,
                    "note": "slowest rank; data = waiting for the loader, model = the forwards on the device"},
        "model_images_per_sec": result["images"] / max(model_s, 1e-9),  # the network alone
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
    parser.add_argument("--loader", choices=LOADERS, default="auto",
                        help="auto: the backend the run evaluated with (DALI for an ImageNet-style run when installed)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="DALI threads or DataLoader worker processes per rank (default: the run's data.num_workers)")
    parser.add_argument("--as-trained", action="store_true",
                        help="run the network as the trainer evaluated it (BatchNorm unfolded, NCHW): with the run's "
                             "precision this reproduces the trainer's logits bit for bit; slower")
    parser.add_argument("--out", default=None, metavar="DIR", help="report directory (default: MODEL/eval)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers: must be >= 0, got {args.workers}")
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
        report = run_eval(Path(args.model), Path(args.data), args.batch_size, device, args.precision,
                          args.loader, args.workers, args.as_trained)
    except ExportError as err:
        print(f"spnet-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if is_main:
        write_report(report, out)
        print(f"top-1 {report['top1']:.2f} %  |  {report['gmacs']:.4f} GMACs/image (paper unit {report['gmacs_paper']:.4f}), "
              f"static {report['static_gmacs']:.4f}, ratio {report['mac_ratio']:.3f}  |  mean execution rate "
              f"{report['exec_rate']:.3f}  |  {report['images']} images, {report['images_per_sec']:.0f} img/s "
              f"(model alone {report['model_images_per_sec']:.0f} img/s; {report['seconds']['data']:.1f} s waiting "
              f"for {report['loader']['backend']})  ->  {out}")
    if launched:
        D.destroy()


if __name__ == "__main__":
    cli()
