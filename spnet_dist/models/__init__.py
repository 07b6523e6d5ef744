"""SP-Net models: routers, gated blocks, gated ResNets and their factory: the masked forward only.

``spnet_dist.execution`` applies the inference-only forms to these models from outside.
"""
from .factory import MODEL_NAMES, create_model
from .gates import GateOutput, Router
from .output import SPNetOutput
from .resnet import GatedCifarResNet, GatedImageNetResNet, GatedResNet, load_torchvision_weights

__all__ = [
    "MODEL_NAMES",
    "GateOutput",
    "GatedCifarResNet",
    "GatedImageNetResNet",
    "GatedResNet",
    "Router",
    "SPNetOutput",
    "create_model",
    "load_torchvision_weights",
]
