"""spnet-dist: train SP-Net dynamic-inference ResNets at scale (ECCV 2022).

Importing the package registers the SP-Net models with timm.
"""
from .models import MODEL_NAMES, SPNetOutput, create_model

__version__ = "0.1.0"
__all__ = ["MODEL_NAMES", "SPNetOutput", "create_model", "__version__"]
