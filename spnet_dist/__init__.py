"""spnet-dist: train SP-Net dynamic-inference ResNets at scale (ECCV 2022).

Importing the package registers the SP-Net models with timm. ``load_model`` opens an
``spnet-export`` directory with torch + safetensors only (DeepSpeed is never imported).
"""
from .export.inference import load_model
from .models import MODEL_NAMES, SPNetOutput, create_model

__version__ = "0.1.0"
__all__ = ["MODEL_NAMES", "SPNetOutput", "create_model", "load_model", "__version__"]
