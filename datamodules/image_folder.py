"""Folders (or ``.zip`` files) of images without splits: :class:`FolderDataModule`, the base that splits them into
train/test by ``seed``, and :class:`ImageFolderDataModule`, any such folder as ``img_size`` squares."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision import transforms

from datamodules.base import ImageDataModule, normalize
from datamodules.files import ImageFiles, extract_zip, iter_images, lone_zip

__all__ = ["FolderDataModule", "ImageFolderDataModule"]


class FolderDataModule(ImageDataModule):
    """A folder (flat or nested) or ``.zip`` of images without splits, split into train/test by ``seed``."""

    expected = ("image files (*.jpg, *.png, ...) in the folder or any folder below it, or a .zip of such a folder "
                "(or a folder holding one such .zip)")

    def __init__(self, data_dir, download, batch_size, num_workers, val_size, seed, test_size):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed)
        if test_size < 0 or (isinstance(test_size, float) and 1 <= test_size and not test_size.is_integer()):
            raise ValueError(f"test_size must be an integer >= 0 or a fraction in (0, 1), got {test_size}")
        if not test_size and not val_size:
            raise ValueError("test_size=0 and val_size=0 leave nothing to validate on")
        self.test_size = test_size

    def _folder(self) -> Path | None:
        if self.data_dir.is_file() and self.data_dir.suffix.lower() == ".zip":
            return extract_zip(self.data_dir)
        if not self.data_dir.is_dir():
            return None
        if next(iter_images(self.data_dir), None) is None and (zipped := lone_zip(self.data_dir)) is not None:
            return extract_zip(zipped)  # a folder holding the downloaded zip of the images
        return self.data_dir

    def _transform(self):
        raise NotImplementedError

    def _present(self) -> bool:
        root = self._folder()
        return root is not None and next(iter_images(root), None) is not None

    def _load(self):
        ds = ImageFiles(self._folder(), self._transform())
        t = self.test_size
        n_test = max(1, round(t * len(ds))) if isinstance(t, float) and 0 < t < 1 else int(t)
        if n_test >= len(ds):
            raise ValueError(f"test_size={t} leaves no training images out of {len(ds)}")
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.seed)).tolist()
        return Subset(ds, perm[n_test:]), Subset(ds, perm[:n_test])


class ImageFolderDataModule(FolderDataModule):
    """Any folder of images (flat or nested, any sizes) or a ``.zip`` of one, as ``img_size`` squares.

    Each image is resized (shorter side to ``img_size``) and centre-cropped to ``img_size``; ``channels=1`` converts to
    grayscale. The images are split into train/test by ``seed`` (``test_size``), then validation is held out of train.
    ``x`` is ``(B, channels, img_size, img_size)`` in [-1, 1]; ``y`` is 0 (no labels).

    Args:
        data_dir: the folder or ``.zip`` (extracted once by :func:`extract_zip`).
        img_size: output side in pixels.
        channels: 3 (RGB) or 1 (grayscale).
        test_size: images (int) or fraction (float in (0, 1)) held out as the test split.
        download: accepted for a uniform interface; there is nothing to download.
        batch_size, num_workers, val_size, seed: see :class:`ImageDataModule`.

    Attributes:
        img_size: as given. channels: as given.

    Raises:
        ValueError: for ``channels`` not 1 or 3, ``img_size < 1``, or sizes that leave no training images.
        DatasetNotFoundError: no images found, a zip that is not a zip, or an unreadable image (names the file).
    """

    dataset_name = "image folder"

    def __init__(self, data_dir: str, img_size: int = 32, channels: int = 3, test_size: int | float = 0.1,
                 download: bool = False, batch_size: int = 100, num_workers: int = 2, val_size: int | float = 1000,
                 seed: int = 1):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed, test_size)
        self.img_size, self.channels = img_size, channels
        self.save_hyperparameters()

    def _transform(self):
        gray = [transforms.Grayscale(1)] if self.channels == 1 else []
        return transforms.Compose([transforms.Resize(self.img_size), transforms.CenterCrop(self.img_size), *gray,
                                   *normalize(self.channels)])
