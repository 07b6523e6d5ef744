"""spnet-export: a training checkpoint -> ``model.safetensors`` + ``config.json`` for inference.

Reads one checkpoint of a run directory through :mod:`spnet_dist.checkpoint`: the one resolver
and validator (every file checked against the checkpoint's SHA-256 marker, every rank's part
present: a swapped or half-synced file is refused by name, nothing is written), then the
student's weights consolidated from DeepSpeed's files or the teacher's safetensors file.
``RUN/config.yaml`` gives the architecture and preprocessing, the evaluation record of
``RUN/metrics.jsonl`` made at the checkpoint's step (else the last one) the measured execution
rates and MACs. The routers' calibrated evaluation threshold of that record (``gate_threshold``,
``model.gate_calibration``) is baked into their biases (``fc2.bias[0] += d``), so the exported
network decides by the plain rule logit1 > logit0 exactly as the evaluated one did. The export
itself is safetensors + JSON: loading it never unpickles.

Written atomically: everything goes to a temporary sibling directory that is renamed to OUT
at the end, so OUT holds a complete export or nothing new.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..checkpoint import TEACHER_FILE, CheckpointError, resolve_checkpoint, student_weights, teacher_weights
from ..config import IMAGENET_MODELS, Config, ConfigError, load_config, to_dict
from .inference import CONFIG_FILE, EXPORT_FORMAT, WEIGHTS_FILE, ExportError, load_state_strict
from ..models.from_config import build_model
from ..models.resnet import GatedResNet
from ..run_dir import MetricsError, RunDirectory

TAGS_HELP = "final | best | latest | <tag> (a directory under RUN/checkpoints)"
TORCHVISION_NAMES = {"spnet_resnet50": "resnet50", "spnet_resnet101": "resnet101"}
_VERSIONED = ("torch", "torchvision", "timm", "safetensors", "deepspeed", "spnet-dist")


# --------------------------------------------------------------------------------------------
# Reading the run
# --------------------------------------------------------------------------------------------


def _class_names(cfg: Config) -> Optional[list[str]]:
    # The class folders of an ImageNet-layout root give the label order the trainer used.
    from ..data import DEFAULT_DIGITS_ROOT
    from ..data.fashion_mnist import CLASSES as FASHION_CLASSES

    if cfg.data.format == "fashion_mnist":
        return list(FASHION_CLASSES)  # the label order of the idx files
    if cfg.data.format == "cifar":
        return None
    root = Path(cfg.data.root or (DEFAULT_DIGITS_ROOT if cfg.data.format == "digits" else "")).expanduser()
    train = root / "train"
    if not train.is_dir():
        return None
    return sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith("."))


def _versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------------------------
# Building the inference network
# --------------------------------------------------------------------------------------------


def training_model(cfg: Config) -> GatedResNet:
    """The student exactly as the trainer built it (stage heads, block aligners), random weights."""
    arch = copy.deepcopy(cfg)
    arch.model.torchvision_weights = None  # only an initialisation; the checkpoint overwrites it
    return build_model(arch)


def inference_state(cfg: Config, state: dict[str, torch.Tensor], source: Path,
                    gate_threshold: float = 0.0) -> tuple[GatedResNet, dict]:
    """Load ``state`` strictly into the training network, then drop the training-only parts and
    bake ``gate_threshold`` into the routers' biases.

    A checkpoint of another architecture fails here, naming ``source``.
    """
    model = training_model(cfg)
    load_state_strict(model, state, source)
    slim = model.inference_copy().eval()
    slim.set_gate_threshold(gate_threshold)
    slim.bake_gate_threshold()
    return slim, {k: v.detach().cpu().contiguous() for k, v in slim.state_dict().items()}


def static_state(name: str, slim: GatedResNet, num_classes: int) -> dict[str, torch.Tensor]:
    """torchvision's ResNet state dict: routers dropped, every block kept; checked strictly."""
    import torchvision

    if name not in TORCHVISION_NAMES:
        raise ExportError(f"--static: {name} has no torchvision equivalent (only {', '.join(IMAGENET_MODELS)})")
    state = {k: v.detach().cpu().contiguous() for k, v in slim.state_dict().items() if ".router." not in k}
    reference = getattr(torchvision.models, TORCHVISION_NAMES[name])(num_classes=num_classes)
    load_state_strict(reference, state, f"--static {TORCHVISION_NAMES[name]}")
    return state


def record_of(run_dir: Path, ckpt: Optional[Path]) -> Optional[dict[str, Any]]:
    """The evaluation record made at the checkpoint's step (an epoch-end checkpoint has one), else the
    last record (a mid-epoch checkpoint), else None."""
    from ..checkpoint.layout import step_of

    records = RunDirectory(run_dir).read_metrics()
    step = step_of(Path(ckpt).resolve().name) if ckpt is not None else None
    at_step = [r for r in records if step is not None and r.get("step") == step]
    return at_step[-1] if at_step else (records[-1] if records else None)


def export_config(cfg: Config, slim: GatedResNet, weights: str = "student", static: bool = False,
                  run_dir: Optional[Path] = None, ckpt: Optional[Path] = None,
                  gate_threshold: float = 0.0) -> dict:
    """The ``config.json`` of an export.

    Args:
        cfg: the run's config (architecture, data, precision).
        slim: the inference network (for its MAC profile).
        weights: "student" or "teacher".
        static: whether the weights are a torchvision state dict.
        run_dir: the run directory (its record at the checkpoint's step, else its last, is copied);
            None: not from a run.
        ckpt: the checkpoint directory exported.
        gate_threshold: the evaluation threshold baked into the routers' biases (recorded).
    """
    from ..data.transforms import NORMALISATION, resolve_augment
    from ..flops import profile_macs

    recipe = resolve_augment(cfg.data.augment, cfg.data.format)
    mean, std = NORMALISATION[recipe]  # the one table the recipes normalise with
    size = cfg.data.image_size
    profile = profile_macs(slim, (size, size))
    record = record_of(run_dir, ckpt) if run_dir is not None else None
    measured = None
    if record is not None:
        measured = {k: record.get(k) for k in ("epoch", "step", "top1", "gmacs", "gmacs_paper", "static_gmacs",
                                               "mac_ratio", "exec_rate", "exec_rates", "images", "test_top1",
                                               "test_mac_ratio", "test_exec_rate")}
        measured["source"] = (f"record of {RunDirectory.METRICS} at the checkpoint's step, else the last "
                              "(evaluation of the student, closed blocks skipped; unprefixed keys: validation split)")
    return {
        "format": EXPORT_FORMAT,
        "static": static,
        "weights": weights,
        "architecture": {
            "name": cfg.model.name,
            "num_classes": cfg.model.num_classes,
            "in_chans": slim.in_chans,
            "router_hidden": cfg.model.router_hidden,
            "num_blocks": slim.num_blocks,
            "block_stage": list(slim.block_stage),
            "torchvision_name": TORCHVISION_NAMES.get(cfg.model.name) if static else None,
        },
        "classes": _class_names(cfg),
        "preprocessing": {
            "recipe": recipe,  # spnet_dist.data.transforms.build_transform(recipe, image_size, train=False)
            "image_size": size,
            "mean": list(mean),
            "std": list(std),
            "crop_pct": 0.875 if recipe == "imagenet" else 1.0,
            "precision": cfg.engine.precision,  # the trainer evaluated under this autocast
        },
        "macs": {
            "unit": "MACs per image (the paper's GMACCs are 2 x MACs)",
            "input_size": [size, size],
            "static": profile.static(),
            "static_without_routers": profile.static(include_routers=False),
            "fixed": profile.fixed,
            "stem": profile.stem,
            "head": profile.head,
            "residual": list(profile.residual),
            "shortcut": list(profile.shortcut),
            "router": list(profile.router),
        },
        "measured": measured,
        "gate_threshold_baked": gate_threshold,
        "source": {"run": str(run_dir.resolve()) if run_dir else None,
                   "checkpoint": ckpt.name if ckpt else None,
                   "checkpoint_path": str(ckpt.resolve()) if ckpt else None},
        "run_config": to_dict(cfg),
        "versions": _versions(),
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """OUT must not exist, or be an empty directory; checked before any work starts."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        held = out / WEIGHTS_FILE if (out / WEIGHTS_FILE).exists() else out
        raise ExportError(f"{held}: --out already exists and is not empty; choose a new directory")


def write_atomically(out: Path, files: dict[str, Any]) -> None:
    """Write ``files`` to a temporary sibling, then rename it to ``out``.

    Args:
        out: the directory to create.
        files: name -> a state dict (``.safetensors``), a JSON-able dict, or a callable
            writing the file at the path it is given.
    """
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, content in files.items():
            path = tmp / name
            if callable(content):
                content(path)
            elif name.endswith(".safetensors"):
                save_file(content, str(path), metadata={"format": "pt"})
            else:
                path.write_text(json.dumps(content, indent=2) + "\n")
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        check_out(out)  # again: another process may have written OUT meanwhile
        os.replace(tmp, out)  # rename(2): atomic, and allowed onto an empty directory only
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(run_dir: str | Path, out: str | Path, tag: str = "final", weights: str = "student",
           static: bool = False, onnx: bool = False) -> Path:
    """Export one checkpoint of a run for inference.

    Args:
        run_dir: the run directory (config.yaml, metrics.jsonl, checkpoints/).
        out: the export directory to create (must not exist, or be empty).
        tag: ``final``, ``best``, ``latest`` or a tag directory name.
        weights: ``student`` (the trained network) or ``teacher`` (its EMA).
        static: write a torchvision ResNet state dict (routers dropped, every block kept).
        onnx: also write ``model.masked.onnx``, the dense form (computes every block: no saving).

    Returns:
        ``out``.

    Raises:
        ExportError: one line naming the file: missing/partial checkpoint, another
            architecture, corrupted teacher file, an existing OUT.
    """
    run_dir, out = Path(run_dir), Path(out)
    if weights not in ("student", "teacher"):
        raise ExportError(f"--weights: must be 'student' or 'teacher', got {weights!r}")
    check_out(out)
    config_path = RunDirectory(run_dir).config
    if not config_path.is_file():
        raise ExportError(f"{config_path}: not found (is {run_dir} a run directory?)")
    try:
        cfg = load_config(config_path, check_paths=False, world_size=1)
    except ConfigError as err:
        raise ExportError(str(err)) from None
    try:
        ckpt = resolve_checkpoint(run_dir, tag)  # every file checked against the checkpoint's marker
        if weights == "teacher":
            source = ckpt / TEACHER_FILE
            state = teacher_weights(ckpt)
        else:
            source = ckpt
            state = student_weights(ckpt)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    try:
        record = record_of(run_dir, ckpt)
    except MetricsError as err:
        raise ExportError(str(err)) from None
    # The threshold the student was evaluated with at this checkpoint (model selection and the
    # reported rates); it was calibrated for the student, so the teacher keeps the paper's rule.
    threshold = float((record or {}).get("gate_threshold") or 0.0) if weights == "student" else 0.0
    slim, slim_state = inference_state(cfg, state, source, threshold)
    if static:
        slim_state = static_state(cfg.model.name, slim, cfg.model.num_classes)
    try:
        config = export_config(cfg, slim, weights, static, run_dir, ckpt, threshold)
    except MetricsError as err:
        raise ExportError(str(err)) from None
    files: dict[str, Any] = {WEIGHTS_FILE: slim_state, CONFIG_FILE: config}
    if onnx:
        if static:
            raise ExportError("--onnx: exports the gated network; drop --static")
        from .onnx import ONNX_FILE, export_onnx

        files[ONNX_FILE] = lambda path: export_onnx(slim, path, cfg.data.image_size)
    write_atomically(out, files)
    return out


def export_module(model: GatedResNet, cfg: Config, out: str | Path) -> Path:
    """Export an in-memory network (benchmarks, tests, notebooks) in the same format, atomically.

    Args:
        model: a gated ResNet (training heads are dropped).
        cfg: the config describing it (architecture, preprocessing).
        out: the export directory to create.
    """
    out = Path(out)
    check_out(out)
    slim = model.inference_copy().eval()
    threshold = slim.gate_threshold
    slim.bake_gate_threshold()  # the calibrated rule the model evaluates with, as plain biases
    state = {k: v.detach().cpu().contiguous() for k, v in slim.state_dict().items()}
    write_atomically(out, {WEIGHTS_FILE: state, CONFIG_FILE: export_config(cfg, slim, gate_threshold=threshold)})
    return out


def cli(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="spnet-export",
        description="Export a training checkpoint to OUT/model.safetensors + OUT/config.json "
                    "(no teacher, no stage heads, no optimizer state; no process group needed).")
    parser.add_argument("--run", required=True, metavar="DIR", help="run directory (config.yaml, checkpoints/)")
    parser.add_argument("--tag", default="final", help=TAGS_HELP + " (default: final)")
    parser.add_argument("--weights", default="student", choices=("student", "teacher"),
                        help="which network to export (default: student)")
    parser.add_argument("--static", action="store_true",
                        help="torchvision ResNet state dict: routers dropped, every block kept (ImageNet models)")
    parser.add_argument("--onnx", action="store_true",
                        help="also write OUT/model.masked.onnx: the dense masked form (computes every block, "
                             "no saving) for runtimes that cannot branch; needs spnet-dist[onnx]")
    parser.add_argument("--out", required=True, metavar="OUT", help="export directory to create")
    args = parser.parse_args(argv)
    try:
        out = export(args.run, args.out, args.tag, args.weights, args.static, args.onnx)
    except ExportError as err:
        print(f"spnet-export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    size = (out / WEIGHTS_FILE).stat().st_size
    print(f"exported {args.weights} of {args.run} ({args.tag}) to {out}: {WEIGHTS_FILE} {size / 1e6:.1f} MB")


if __name__ == "__main__":
    cli()
