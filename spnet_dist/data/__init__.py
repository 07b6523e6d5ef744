"""Data: datasets, augmentation recipes and the ``Loader`` protocol the trainer consumes.

The torchvision loaders (``build``) and the DALI loaders (``dali``) implement the same
:class:`Loader` protocol (``__iter__``, ``__len__``, ``set_epoch``, ``state_dict``,
``load_state_dict``), so the trainer and the checkpoint format do not depend on the backend.
"""
from .build import (
    BACKENDS,
    DATA_FORMATS,
    DEFAULT_DIGITS_ROOT,
    EvalLoader,
    TrainLoader,
    build_datasets,
    build_eval_loader,
    build_loaders,
    build_train_loader,
    num_classes_of,
    resolve_data_backend,
)
from .cifar import CifarDataset, find_cifar
from .digits import prepare_digits
from .folder import ImageFolderDataset, build_imagefolder
from .protocol import ON_CORRUPT, CorruptImageError, Loader
from .transforms import AUGMENTS, build_transform, resolve_augment

__all__ = [
    "AUGMENTS",
    "BACKENDS",
    "ON_CORRUPT",
    "CorruptImageError",
    "build_loaders",
    "resolve_data_backend",
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
