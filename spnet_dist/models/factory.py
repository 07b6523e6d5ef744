"""Model names, ``create_model`` and timm registration.

``import spnet_dist`` registers every model with timm, so ``timm.create_model("spnet_resnet50")``
works as it does for timm's own models. There are no hub weights: ``pretrained=True`` loads an
``spnet-export`` file named by ``pretrained_cfg_overlay=dict(file=".../model.safetensors")`` (its
``config.json`` beside it gives the architecture) and is an error without one; torchvision
backbone weights go through ``model.torchvision_weights`` instead.
"""
from __future__ import annotations

from typing import Any, Callable

from timm.models import register_model

from .resnet import GatedCifarResNet, GatedImageNetResNet, GatedResNet

_IMAGENET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_CIFAR_DEPTHS = (20, 32, 56, 110)

# timm passes these to every entrypoint; they mean nothing without hub weights.
_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _build(builder: Callable[..., GatedResNet], name: str, pretrained: bool, kwargs: dict[str, Any]) -> GatedResNet:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    for key in _TIMM_FACTORY_KWARGS:
        kwargs.pop(key, None)
    if not pretrained:
        return builder(**kwargs)
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
    from ..inference import ExportError, build_exported, read_export_config, read_weights

    config = read_export_config(file)
    if config.get("static"):
        raise ExportError(f"{file}: a --static export is a torchvision state dict; load it into torchvision.models")
    if config["architecture"]["name"] != name:
        raise ExportError(f"{file}: holds {config['architecture']['name']!r}, not {name!r}")
    return build_exported(config, read_weights(file), file, **kwargs)


@register_model
def spnet_resnet50(pretrained: bool = False, **kwargs: Any) -> GatedResNet:
    """Gated ResNet-50 v1.5 (ImageNet), torchvision parameter names."""
    return _build(lambda **kw: GatedImageNetResNet(_IMAGENET_LAYERS[50], **kw), "spnet_resnet50", pretrained, kwargs)


@register_model
def spnet_resnet101(pretrained: bool = False, **kwargs: Any) -> GatedResNet:
    """Gated ResNet-101 v1.5 (ImageNet), torchvision parameter names."""
    return _build(lambda **kw: GatedImageNetResNet(_IMAGENET_LAYERS[101], **kw), "spnet_resnet101", pretrained, kwargs)


def _cifar_entrypoint(depth: int) -> Callable[..., GatedResNet]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> GatedResNet:
        kwargs.setdefault("num_classes", 10)
        return _build(lambda **kw: GatedCifarResNet(depth, **kw), f"spnet_cifar_resnet{depth}", pretrained, kwargs)

    entrypoint.__name__ = f"spnet_cifar_resnet{depth}"
    entrypoint.__qualname__ = entrypoint.__name__
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"Gated CIFAR ResNet-{depth} (option-A shortcuts, 16/32/64 channels)."
    return entrypoint


for _depth in _CIFAR_DEPTHS:
    globals()[f"spnet_cifar_resnet{_depth}"] = register_model(_cifar_entrypoint(_depth))

MODEL_NAMES: tuple[str, ...] = ("spnet_resnet50", "spnet_resnet101") + tuple(
    f"spnet_cifar_resnet{d}" for d in _CIFAR_DEPTHS
)


def create_model(name: str, **kwargs: Any) -> GatedResNet:
    """Build an SP-Net model by name.

    Args:
        name: one of :data:`MODEL_NAMES`.
        **kwargs: GatedResNet arguments (num_classes, router_dropout, aux_heads, ...).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name: unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return globals()[name](**kwargs)
