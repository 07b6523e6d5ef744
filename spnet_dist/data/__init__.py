"""Data: datasets, augmentation recipes and the ``Loader`` protocol the trainer consumes.

Modules, from the trainer's one call down:

- ``loaders``: :func:`build_loaders` (backend choice, rank 0's shared file list) and
  :func:`build_test_loader` (the held-out test set of formats that have one, else None);
- ``torchvision_loader`` and ``dali``: the two implementations of the :class:`Loader` protocol
  (``__iter__``, ``__len__``, ``set_epoch``, ``state_dict``, ``load_state_dict``), so the trainer
  and the checkpoint format do not depend on the backend;
- ``sampling``: what both backends share: seeds, the per-epoch order and shards, the resumable
  position and its conversion when the job's geometry changes, rank and ``on_corrupt`` checks;
- ``datasets``: :func:`build_datasets`, :func:`build_test_dataset`, :func:`num_classes_of`,
  :func:`check_data_root`, over the readers ``folder``, ``cifar``, ``digits``, ``fashion_mnist``
  and the recipes of ``transforms``;
- ``protocol``: the :class:`Loader` contract and :class:`CorruptImageError`.
"""
from .cifar import CifarDataset, find_cifar
from .dali import DALI_DEVICES
from .datasets import (DATA_FORMATS, DEFAULT_DIGITS_ROOT, build_datasets, build_test_dataset, check_data_root,
                       num_classes_of)
from .digits import prepare_digits
from .fashion_mnist import FashionMnistDataset, IdxFormatError
from .folder import ImageFolderDataset, build_imagefolder
from .loaders import BACKENDS, build_loaders, build_test_loader, resolve_data_backend
from .protocol import ON_CORRUPT, CorruptImageError, Loader
from .torchvision_loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from .transforms import AUGMENTS, build_transform, resolve_augment

__all__ = [
    "AUGMENTS",
    "BACKENDS",
    "DALI_DEVICES",
    "ON_CORRUPT",
    "CorruptImageError",
    "build_loaders",
    "resolve_data_backend",
    "DATA_FORMATS",
    "DEFAULT_DIGITS_ROOT",
    "CifarDataset",
    "EvalLoader",
    "FashionMnistDataset",
    "IdxFormatError",
    "ImageFolderDataset",
    "Loader",
    "TrainLoader",
    "build_datasets",
    "build_eval_loader",
    "build_test_dataset",
    "build_test_loader",
    "build_imagefolder",
    "build_train_loader",
    "build_transform",
    "check_data_root",
    "find_cifar",
    "num_classes_of",
    "prepare_digits",
    "resolve_augment",
]
