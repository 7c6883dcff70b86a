"""Compatibility module: the image datamodules now live one per file (torchgeo's layout).

- :mod:`datamodules.base`: :class:`DatasetNotFoundError`, the fix strings (``DOWNLOAD_FIX``, ``DATA_DIR_FIX``),
  :func:`~datamodules.base.summary`, :func:`~datamodules.base.normalize` and the base :class:`ImageDataModule`;
- :mod:`datamodules.files`: the zip cache (:func:`extract_zip`) and the reading of folders of images;
- :mod:`datamodules.svhn`, :mod:`datamodules.cifar10`, :mod:`datamodules.mnist` (MNIST and the quickstart digits),
  :mod:`datamodules.celeba`, :mod:`datamodules.image_folder`: one data set each.

``from datamodules.images import X`` keeps working for every name this module held, the private helpers included
(``_summary`` is :func:`datamodules.base.summary`, ``_FolderModule`` is
:class:`datamodules.image_folder.FolderDataModule`, ...); new code imports from ``datamodules`` or the modules above.
"""
from __future__ import annotations

from datamodules.base import DATA_DIR_FIX, DOWNLOAD_FIX, DatasetNotFoundError, ImageDataModule  # noqa: F401
from datamodules.base import normalize as _normalize  # noqa: F401
from datamodules.base import summary as _summary  # noqa: F401
from datamodules.celeba import CelebA64DataModule, _CelebA, _CelebACrop, _ZeroLabels  # noqa: F401
from datamodules.cifar10 import CIFAR10DataModule, _find_dir_with  # noqa: F401
from datamodules.files import IMG_EXTENSIONS, _cache_root, extract_zip  # noqa: F401
from datamodules.files import ImageFiles as _ImageFiles  # noqa: F401
from datamodules.files import iter_images as _iter_images  # noqa: F401
from datamodules.files import open_rgb as _open_rgb  # noqa: F401
from datamodules.image_folder import FolderDataModule as _FolderModule  # noqa: F401
from datamodules.image_folder import ImageFolderDataModule  # noqa: F401
from datamodules.mnist import MNISTDataModule, QuickstartMNISTDataModule, _read_idx  # noqa: F401
from datamodules.svhn import _SVHN, SVHNDataModule  # noqa: F401

__all__ = [
    "CIFAR10DataModule",
    "CelebA64DataModule",
    "DatasetNotFoundError",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "QuickstartMNISTDataModule",
    "SVHNDataModule",
    "extract_zip",
]
