"""Open an exported SP-Net (``spnet-export``'s ``model.safetensors`` + ``config.json``); timm registration.

This module needs only torch, safetensors and the model code: it never imports DeepSpeed, and
loading never unpickles anything (safetensors holds raw tensors, config.json is JSON), so an
export from an untrusted source cannot run code on the loading machine.

Export layout (``EXPORT_FORMAT``)::

    OUT/model.safetensors   fp32 parameters + buffers of the inference network (routers
                            included, no teacher, no stage heads, no optimizer state); with
                            --static a torchvision ResNet state dict instead
    OUT/config.json         architecture, classes, preprocessing, measured execution rates
                            and MACs, the run's config, package versions

Importing this module (``import spnet_dist`` does) registers every model with timm, so
``timm.create_model("spnet_resnet50")`` works as it does for timm's own models. There are no hub
weights: ``pretrained=True`` loads an ``spnet-export`` file named by
``pretrained_cfg_overlay=dict(file=".../model.safetensors")`` (its ``config.json`` beside it gives
the architecture) and is an error without one; torchvision backbone weights go through
``model.torchvision_weights`` instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from timm.models import register_model
from torch import nn

from ..execution import (check_execution, check_per_image_stages, check_skip_strategy, optimize_for_inference,
                        set_execution)
from ..models.factory import MODEL_NAMES, create_model
from ..models.resnet import GatedResNet

EXPORT_FORMAT = "spnet-dist-export/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ExportError(ValueError):
    """A missing, partial or corrupted export (one line naming the file)."""


def read_export_config(path: Union[str, Path]) -> dict[str, Any]:
    """The ``config.json`` of an export directory (or of the directory holding ``path``).

    Args:
        path: the export directory, or its ``model.safetensors`` / ``config.json``.

    Raises:
        ExportError: the file is missing, not JSON, or not an spnet-dist export.
    """
    path = Path(path)
    config_path = path.parent / CONFIG_FILE if path.is_file() else path / CONFIG_FILE
    if not config_path.is_file():
        raise ExportError(f"{config_path}: not found (an spnet-export directory holds {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ExportError(f"{config_path}: not an spnet-dist export (format {found!r}, expected {EXPORT_FORMAT!r})")
    return config


def read_weights(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file with a one-line error naming it if it is missing or corrupted.

    Args:
        path: the ``.safetensors`` file.
        device: where the tensors are placed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{path}: corrupted or truncated safetensors file ({' '.join(str(err).split())})") from None


def architecture_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``create_model`` arguments of the inference network described by an export config."""
    arch = config["architecture"]
    return dict(num_classes=arch["num_classes"], in_chans=arch["in_chans"], router_hidden=arch["router_hidden"],
                aux_heads=False)


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Union[str, Path]) -> None:
    """``load_state_dict(strict=True)`` with one line naming ``source`` on any mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        def head(keys: list[str]) -> str:
            return f"{keys[:3]}{'...' if len(keys) > 3 else ''}"

        raise ExportError(
            f"{source}: weights do not fit {type(model).__name__} "
            f"(missing {len(missing)} {head(missing)}, unexpected {len(unexpected)} {head(unexpected)}, "
            f"shape mismatch {len(shapes)} {head(shapes)})")
    model.load_state_dict(state, strict=True)


def pretrained_cfg(config: dict[str, Any], file: Union[str, Path]) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` (input size, normalisation) so ``timm.data.resolve_data_config`` works."""
    pre = config["preprocessing"]
    return dict(file=str(file), num_classes=config["architecture"]["num_classes"],
                input_size=(config["architecture"]["in_chans"], pre["image_size"], pre["image_size"]),
                mean=tuple(pre["mean"]), std=tuple(pre["std"]), interpolation="bilinear",
                crop_pct=pre.get("crop_pct", 1.0))


def measured_rates(config: dict[str, Any], num_blocks: int, source: Union[str, Path]) -> Optional[list[float]]:
    """The per-block execution rates measured at the end of training (``measured.exec_rates``).

    Args:
        config: the export's ``config.json``.
        num_blocks: gated blocks of the network.
        source: file named in errors.

    Returns:
        One rate per block, or None if the export holds no measurement (not exported from a run).

    Raises:
        ExportError: the rates are not ``num_blocks`` numbers in [0, 1].
    """
    rates = (config.get("measured") or {}).get("exec_rates")
    if rates is None:
        return None
    if (not isinstance(rates, list) or len(rates) != num_blocks
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 <= r <= 1.0 for r in rates)):
        raise ExportError(f"{source}: measured.exec_rates must be {num_blocks} execution rates in [0, 1], "
                          f"got {str(rates)[:80]}")
    return [float(r) for r in rates]


def build_exported(config: dict[str, Any], weights: dict[str, torch.Tensor], source: Union[str, Path], *,
                   execution: str = "skip", skip_strategy: str = "auto", per_image_stages: str = "auto",
                   **overrides: Any) -> GatedResNet:
    """The gated inference network of an export config with ``weights`` loaded strictly.

    Each block's expected execution rate (the capacity skip strategy's capacity rule) is set
    from the rates measured at the end of training; without them it stays 1.0 (capacity =
    batch: never overflows, saves nothing). The defaults of the execution plan
    (:func:`spnet_dist.execution.set_execution`) are those of every exported model,
    ``load_model``'s and timm's ``pretrained=True`` alike.

    Args:
        config: the export's ``config.json``.
        weights: its state dict.
        source: file named in errors.
        execution, skip_strategy, per_image_stages: as in :func:`load_model`.
        **overrides: ``create_model`` arguments that win over the config (timm passes some).
    """
    name = config["architecture"]["name"]
    if name not in MODEL_NAMES:
        raise ExportError(f"{source}: unknown model {name!r} in config.json; known: {', '.join(MODEL_NAMES)}")
    kwargs = architecture_kwargs(config)
    kwargs.update(overrides)
    model = create_model(name, **kwargs)
    load_state_strict(model, weights, source)
    rates = measured_rates(config, model.num_blocks, Path(source).parent / CONFIG_FILE)
    model.pretrained_cfg = pretrained_cfg(config, source)
    return set_execution(model, execution, skip_strategy=skip_strategy, per_image_stages=per_image_stages,
                         capacity_rates=rates)


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
               execution: str = "skip", channels_last: bool = True, optimize: bool = True,
               skip_strategy: str = "auto", per_image_stages: str = "auto") -> nn.Module:
    """Load an ``spnet-export`` directory as an eval-mode model (torch + safetensors only).

    Args:
        path: the export directory (``model.safetensors`` + ``config.json``).
        device: where to put the model.
        execution: ``"skip"`` (default: closed blocks cost nothing for that sample) or
            ``"masked"`` (every block computed and multiplied by its 0/1 gate: the dense form,
            same outputs, no saving).
        channels_last: store convolution weights as NHWC, so activations follow. On CPU the
            stem's max-pool alone runs ~20x faster than in NCHW at batch 1 (measured; see
            tools/bench_inference.py), which is time every sample pays whatever its gates say;
            GPUs prefer NHWC for mixed precision too. Same outputs up to float rounding.
        optimize: fold every BatchNorm into the layer before it, compute strided 1x1
            projections as subsample + convolution and small-batch 1x1 convolutions on oneDNN
            on the CPU (:mod:`spnet_dist.execution.fuse`): same
            function up to float rounding, faster (most at batch 1); such a model cannot be put
            back into training mode. ``False`` gives the network exactly as trained.
        skip_strategy: how ``"skip"`` runs (:mod:`spnet_dist.execution.blocks`): ``"gather"``
            (exactly the open samples; one host sync per block on CUDA), ``"capacity"`` (a
            fixed number of samples per block from the export's measured execution rates; one
            host sync per forward, recomputed with gather if a block had more open samples) or
            ``"auto"`` (capacity for CUDA inputs, gather elsewhere). Outputs are the same.
            Capacities can be changed with ``model.set_skip_capacity(rates=, margin=, multiple=)``.
        per_image_stages: ``"auto"`` (on the CPU, the stem and the stages with large activations
            run one image at a time: the same outputs, faster at batch > 1; see
            ``InferenceResNet.count_per_image_stages``) or ``"off"``.

    Returns:
        The :class:`~spnet_dist.models.GatedResNet` in eval mode, run by its execution plan (an
        :class:`~spnet_dist.execution.InferenceResNet`: ``model.set_execution``,
        ``set_skip_strategy``, ``set_skip_capacity``, ``set_per_image_stages``); for a
        ``--static`` export the torchvision ResNet it was written for.

    Raises:
        ExportError: a missing or corrupted file, or weights that do not fit the architecture.
    """
    check_execution(execution)  # before any file is read
    check_skip_strategy(skip_strategy)
    check_per_image_stages(per_image_stages)
    path = Path(path)
    config = read_export_config(path)
    weights_path = path / WEIGHTS_FILE
    weights = read_weights(weights_path, device)
    if config.get("static"):
        import torchvision

        arch = config["architecture"]
        model = getattr(torchvision.models, arch["torchvision_name"])(num_classes=arch["num_classes"])
        load_state_strict(model, weights, weights_path)
        return _place(model, device, channels_last)
    model = build_exported(config, weights, weights_path, execution=execution, skip_strategy=skip_strategy,
                           per_image_stages=per_image_stages)
    model = _place(model, device, channels_last)
    return optimize_for_inference(model) if optimize else model


def _place(model: nn.Module, device: Union[str, torch.device], channels_last: bool) -> nn.Module:
    model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    return model.eval()


# ---------------------------------------------------------------- timm registration

# timm passes these to every entrypoint; they mean nothing without hub weights.
_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _timm_build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> GatedResNet:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    for key in _TIMM_FACTORY_KWARGS:
        kwargs.pop(key, None)
    if not pretrained:
        return create_model(name, **kwargs)
    if not overlay.get("file"):
        raise ValueError(
            f"{name}: no hub weights exist for SP-Net models; pass an spnet-export file with "
            "pretrained_cfg_overlay=dict(file='OUT/model.safetensors'), or build with pretrained=False and "
            "load torchvision weights with spnet_dist.models.load_torchvision_weights (config: model.torchvision_weights)"
        )
    return _from_export(name, overlay["file"], kwargs)


def _from_export(name: str, file: str, kwargs: dict[str, Any]) -> GatedResNet:
    """timm's ``pretrained=True`` path: the export's architecture, its weights and the schedule of
    every exported model (``build_exported``: skipping execution, ``skip_strategy="auto"``,
    capacities from the export's measured rates, ``per_image_stages="auto"``)."""
    config = read_export_config(file)
    if config.get("static"):
        raise ExportError(f"{file}: a --static export is a torchvision state dict; load it into torchvision.models")
    if config["architecture"]["name"] != name:
        raise ExportError(f"{file}: holds {config['architecture']['name']!r}, not {name!r}")
    return build_exported(config, read_weights(file), file, **kwargs)


def _timm_entrypoint(name: str) -> Callable[..., GatedResNet]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> GatedResNet:
        return _timm_build(name, pretrained, kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name  # timm registers a model under its function's name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"SP-Net {name} for timm.create_model; see spnet_dist.models.create_model."
    return entrypoint


for _name in MODEL_NAMES:
    globals()[_name] = register_model(_timm_entrypoint(_name))
