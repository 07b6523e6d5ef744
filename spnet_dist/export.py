"""spnet-export: a training checkpoint -> ``model.safetensors`` + ``config.json`` for inference.

Reads one checkpoint of a run directory::

    RUN/config.yaml                 the resolved config (architecture, preprocessing)
    RUN/metrics.jsonl               last record: measured execution rates and MACs
    RUN/checkpoints/latest          DeepSpeed's text file naming a tag
    RUN/checkpoints/<tag>/          engine.save_checkpoint(RUN/checkpoints, tag) on every rank
        mp_rank_00_model_states.pt              module state (buffers; all weights with ZeRO 0)
        *_optim_states.pt                       ZeRO 1/2: one fp32 master-weight shard per rank
        teacher.safetensors                     the EMA teacher (same keys as the student)

Student weights are consolidated with DeepSpeed's own utility
(``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``: fp32 master shards
of every rank + buffers of rank 0; BN buffers are identical across ranks because the trainer
averages them after every step). It needs no process group and no GPU. ZeRO 0 writes no
shards: the full fp32 state is the ``module`` entry of ``mp_rank_00_model_states.pt``, which
is what DeepSpeed's engine itself loads for stage 0.

DeepSpeed's ``.pt`` files are pickles; they are read only from the run's own checkpoint
directory (written by this project's trainer), never from the export. The export itself is
safetensors + JSON: loading it never unpickles.

Written atomically: everything goes to a temporary sibling directory that is renamed to OUT
at the end, so OUT holds a complete export or nothing new.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import shutil
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .config import IMAGENET_MODELS, Config, ConfigError, load_config, to_dict
from .inference import (CONFIG_FILE, EXPORT_FORMAT, WEIGHTS_FILE, ExportError, load_state_strict,
                        read_weights)
from .models.resnet import GatedResNet

TAGS_HELP = "final | best | latest | <tag> (a directory under RUN/checkpoints)"
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES_GLOB = "*_optim_states.pt"
TEACHER_FILE = "teacher.safetensors"
TORCHVISION_NAMES = {"spnet_resnet50": "resnet50", "spnet_resnet101": "resnet101"}
_VERSIONED = ("torch", "torchvision", "timm", "safetensors", "deepspeed", "spnet-dist")


# --------------------------------------------------------------------------------------------
# Reading the run
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(run_dir: Path, tag: str) -> Path:
    """The checkpoint directory of ``tag`` (``latest`` follows DeepSpeed's ``latest`` file).

    Raises:
        ExportError: the run, its checkpoints or the tag do not exist.
    """
    save_dir = run_dir / "checkpoints"
    if not save_dir.is_dir():
        raise ExportError(f"{save_dir}: no checkpoints directory (is {run_dir} a run directory?)")
    if tag == "latest":
        latest = save_dir / "latest"
        if not latest.is_file():
            raise ExportError(f"{latest}: not found (DeepSpeed writes it with every checkpoint)")
        tag = latest.read_text().strip()
    if not tag or "/" in tag or tag in (".", ".."):
        raise ExportError(f"--tag: {tag!r} is not a checkpoint tag ({TAGS_HELP})")
    ckpt = save_dir / tag
    if not ckpt.is_dir():
        found = sorted(p.name for p in save_dir.iterdir() if p.is_dir())
        raise ExportError(f"{ckpt}: no such checkpoint (found: {', '.join(found) or 'none'})")
    # best / final may be symlinks to a step directory: name the real one in messages and config
    return ckpt.resolve() if ckpt.is_symlink() else ckpt


def _check_archive(path: Path) -> None:
    # torch.save files are zip archives: a truncated or half-copied file fails the CRC check
    # here, before anything is unpickled, and the error can name the file.
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ExportError(f"{path}: partial or corrupted DeepSpeed checkpoint file ({err})") from None
    if bad is not None:
        raise ExportError(f"{path}: partial or corrupted DeepSpeed checkpoint file (bad member {bad})")


def check_checkpoint_files(ckpt: Path, zero_stage: int) -> list[Path]:
    """DeepSpeed's files of a checkpoint directory, checked complete; returns the optimizer shards.

    Raises:
        ExportError: the model-state file is missing, ZeRO 1/2 shards are missing, or a file
            is truncated.
    """
    model_states = ckpt / MODEL_STATES
    if not model_states.is_file():
        raise ExportError(f"{model_states}: missing; {ckpt} is not a complete DeepSpeed checkpoint")
    shards = sorted(ckpt.glob(OPTIM_STATES_GLOB))
    if zero_stage > 0 and not shards:
        raise ExportError(f"{ckpt}: no {OPTIM_STATES_GLOB} files; a ZeRO {zero_stage} checkpoint holds one per rank")
    for path in [model_states, *shards]:
        _check_archive(path)
    return shards


def consolidate_student(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 student state dict of a DeepSpeed checkpoint, without a process group.

    Args:
        ckpt: the tag directory.
        zero_stage: the run's ``engine.zero_stage``.
    """
    check_checkpoint_files(ckpt, zero_stage)
    if zero_stage == 0:
        # No ZeRO shards: DeepSpeed's engine loads checkpoint["module"] for stage 0, and so do
        # we. A pickle, read only from the run's own checkpoint directory.
        path = ckpt / MODEL_STATES
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            raise ExportError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
            raise ExportError(f"{path}: no 'module' state dict; not a DeepSpeed model-state file")
        return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # DeepSpeed prints progress bars and notes: keep errors one line
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        # e.g. "Expected 2 of '*_optim_states.pt' ... but found 1 files" (a rank never saved)
        raise ExportError(f"{ckpt}: incomplete ZeRO checkpoint ({' '.join(str(err).split())})") from None
    return dict(state)


def last_metrics(run_dir: Path) -> Optional[dict[str, Any]]:
    """The last record of ``RUN/metrics.jsonl`` (None if the run never evaluated)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: last line is not JSON ({err})") from None


def _class_names(cfg: Config) -> Optional[list[str]]:
    # The class folders of an ImageNet-layout root give the label order the trainer used.
    from .data import DEFAULT_DIGITS_ROOT

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
    from .train import build_model

    arch = copy.deepcopy(cfg)
    arch.model.torchvision_weights = None  # only an initialisation; the checkpoint overwrites it
    return build_model(arch)


def inference_state(cfg: Config, state: dict[str, torch.Tensor], source: Path) -> tuple[GatedResNet, dict]:
    """Load ``state`` strictly into the training network, then drop the training-only parts.

    A checkpoint of another architecture fails here, naming ``source``.
    """
    model = training_model(cfg)
    load_state_strict(model, state, source)
    slim = model.inference_copy().eval()
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


def export_config(cfg: Config, slim: GatedResNet, weights: str = "student", static: bool = False,
                  run_dir: Optional[Path] = None, ckpt: Optional[Path] = None) -> dict:
    """The ``config.json`` of an export.

    Args:
        cfg: the run's config (architecture, data, precision).
        slim: the inference network (for its MAC profile).
        weights: "student" or "teacher".
        static: whether the weights are a torchvision state dict.
        run_dir: the run directory (its last metrics record is copied); None: not from a run.
        ckpt: the checkpoint directory exported.
    """
    from .data.transforms import CIFAR_MEAN, CIFAR_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, resolve_augment
    from .flops import profile_macs

    recipe = resolve_augment(cfg.data.augment, cfg.data.format)
    mean, std = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar": (CIFAR_MEAN, CIFAR_STD)}.get(recipe, (HALF, HALF))
    size = cfg.data.image_size
    profile = profile_macs(slim, (size, size))
    record = last_metrics(run_dir) if run_dir is not None else None
    measured = None
    if record is not None:
        measured = {k: record.get(k) for k in ("epoch", "step", "top1", "gmacs", "gmacs_paper", "static_gmacs",
                                               "mac_ratio", "exec_rate", "exec_rates", "images")}
        measured["source"] = "last record of metrics.jsonl (evaluation of the student, closed blocks skipped)"
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
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: not found (is {run_dir} a run directory?)")
    try:
        cfg = load_config(config_path, check_paths=False, world_size=1)
    except ConfigError as err:
        raise ExportError(str(err)) from None
    ckpt = resolve_checkpoint(run_dir, tag)
    if weights == "teacher":
        check_checkpoint_files(ckpt, cfg.engine.zero_stage)
        source = ckpt / TEACHER_FILE
        state = read_weights(source)
    else:
        source = ckpt
        state = consolidate_student(ckpt, cfg.engine.zero_stage)
    slim, slim_state = inference_state(cfg, state, source)
    if static:
        slim_state = static_state(cfg.model.name, slim, cfg.model.num_classes)
    config = export_config(cfg, slim, weights, static, run_dir, ckpt)
    files: dict[str, Any] = {WEIGHTS_FILE: slim_state, CONFIG_FILE: config}
    if onnx:
        if static:
            raise ExportError("--onnx: exports the gated network; drop --static")
        from .export_onnx import ONNX_FILE, export_onnx

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
    state = {k: v.detach().cpu().contiguous() for k, v in slim.state_dict().items()}
    write_atomically(out, {WEIGHTS_FILE: state, CONFIG_FILE: export_config(cfg, slim)})
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
