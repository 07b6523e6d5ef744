"""Model names and ``create_model``.

``create_model`` builds by name from this module's own table; timm's registry is not involved
(the timm entrypoints, whose ``pretrained=True`` opens an ``spnet-export`` file, are registered
by ``spnet_dist.export.inference`` on ``import spnet_dist`` and call ``create_model``).
"""
from __future__ import annotations

from typing import Any, Callable

from .resnet import GatedCifarResNet, GatedImageNetResNet, GatedResNet

_IMAGENET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_CIFAR_DEPTHS = (20, 32, 56, 110)


def _imagenet(depth: int) -> Callable[..., GatedResNet]:
    def build(**kwargs: Any) -> GatedResNet:
        return GatedImageNetResNet(_IMAGENET_LAYERS[depth], **kwargs)

    build.__doc__ = f"Gated ResNet-{depth} v1.5 (ImageNet), torchvision parameter names."
    return build


def _cifar(depth: int) -> Callable[..., GatedResNet]:
    def build(**kwargs: Any) -> GatedResNet:
        kwargs.setdefault("num_classes", 10)
        return GatedCifarResNet(depth, **kwargs)

    build.__doc__ = f"Gated CIFAR ResNet-{depth} (option-A shortcuts, 16/32/64 channels)."
    return build


BUILDERS: dict[str, Callable[..., GatedResNet]] = {
    **{f"spnet_resnet{depth}": _imagenet(depth) for depth in _IMAGENET_LAYERS},
    **{f"spnet_cifar_resnet{depth}": _cifar(depth) for depth in _CIFAR_DEPTHS},
}
MODEL_NAMES: tuple[str, ...] = tuple(BUILDERS)


def create_model(name: str, **kwargs: Any) -> GatedResNet:
    """Build an SP-Net model by name.

    Args:
        name: one of :data:`MODEL_NAMES`.
        **kwargs: GatedResNet arguments (num_classes, router_dropout, aux_heads, ...); the CIFAR
            models default to 10 classes, the ImageNet models to 1000.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name: unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return BUILDERS[name](**kwargs)
