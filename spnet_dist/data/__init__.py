"""Data: datasets, augmentation recipes and the ``Loader`` protocol the trainer consumes.

The torchvision loaders here and the DALI pipelines that follow implement the same
:class:`Loader` protocol (``__iter__``, ``__len__``, ``set_epoch``, ``state_dict``,
``load_state_dict``), so the trainer and the checkpoint format do not depend on the backend.
"""
from .build import (
    DATA_FORMATS,
    DEFAULT_DIGITS_ROOT,
    EvalLoader,
    TrainLoader,
    build_datasets,
    build_eval_loader,
    build_train_loader,
    num_classes_of,
)
from .cifar import CifarDataset, find_cifar
from .digits import prepare_digits
from .folder import ImageFolderDataset, build_imagefolder
from .protocol import Loader
from .transforms import AUGMENTS, build_transform, resolve_augment

__all__ = [
    "AUGMENTS",
    "DATA_FORMATS",
    "DEFAULT_DIGITS_ROOT",
    "CifarDataset",
    "EvalLoader",
    "ImageFolderDataset",
    "Loader",
    "TrainLoader",
    "build_datasets",
    "build_eval_loader",
    "build_imagefolder",
    "build_train_loader",
    "build_transform",
    "find_cifar",
    "num_classes_of",
    "prepare_digits",
    "resolve_augment",
]
