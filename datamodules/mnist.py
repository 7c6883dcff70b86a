"""MNIST digits: :class:`MNISTDataModule` (torchvision's files) and :class:`QuickstartMNISTDataModule` (the 10,000
test digits embedded in the package, offline)."""
from __future__ import annotations

import gzip
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset
from torchvision import datasets, transforms

from datamodules.base import ImageDataModule, normalize

__all__ = ["MNISTDataModule", "QuickstartMNISTDataModule"]


class MNISTDataModule(ImageDataModule):
    """MNIST 28x28x1 through torchvision (60,000 train, 10,000 test), from ``data_dir/MNIST/raw/*-ubyte``.

    ``x`` is ``(B, 1, img_size, img_size)`` in [-1, 1] (background -1), ``y`` the digit 0..9.

    Args:
        data_dir: torchvision's MNIST root (the folder holding ``MNIST/raw/``); ``.../MNIST`` or ``.../MNIST/raw``
            itself are accepted too.
        img_size: 28 (native) or 32 (``transforms.Pad(2)``: two background pixels, -1.0, on every side; no resizing).
        download, batch_size, num_workers, val_size, seed: see :class:`ImageDataModule`.

    Attributes:
        img_size: 28 or 32. channels: 1.

    Raises:
        ValueError: for an ``img_size`` other than 28 or 32.
        DatasetNotFoundError: idx files missing, download failed, or an unreadable idx file.
    """

    channels = 1
    dataset_name = "MNIST"
    downloadable = True
    FILES = [os.path.splitext(os.path.basename(url))[0] for url, _ in datasets.MNIST.resources]
    expected = "MNIST/raw/{" + ", ".join(FILES) + "} (torchvision's layout)"

    def __init__(self, data_dir: str = "data/mnist", download: bool = False, batch_size: int = 100,
                 num_workers: int = 2, val_size: int | float = 1000, seed: int = 1, img_size: int = 28):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed)
        if img_size not in (28, 32):
            raise ValueError(f"img_size must be 28 or 32, got {img_size}")
        self.img_size = img_size
        self.save_hyperparameters()

    def _root(self) -> Path:
        d = self.data_dir
        if d.name == "raw" and d.parent.name == "MNIST":
            return d.parent.parent
        if d.name == "MNIST" and (d / "raw").is_dir() and not (d / "MNIST").exists():
            return d.parent
        return d

    def _present(self) -> bool:
        return all((self._root() / "MNIST" / "raw" / f).is_file() for f in self.FILES)

    def _missing_files(self) -> list[str]:
        return [f"MNIST/raw/{f}" for f in self.FILES if not (self._root() / "MNIST" / "raw" / f).is_file()]

    def _fetch(self) -> None:
        datasets.MNIST(str(self._root()), train=True, download=True)

    def _load(self):
        pad = [transforms.Pad(2, fill=0)] if self.img_size == 32 else []
        tf = transforms.Compose([*pad, *normalize(1)])
        out = []
        for train in (True, False):
            with self._reading(self._root() / "MNIST" / "raw" / ("train-*-ubyte" if train else "t10k-*-ubyte")):
                out.append(datasets.MNIST(str(self._root()), train=train, transform=tf))
        return tuple(out)


def _read_idx(name: str) -> np.ndarray:
    """A gzipped idx file (uint8 data) from ``lebm_zoo/assets``, as an array of the header's shape."""
    data = gzip.decompress((resources.files("lebm_zoo") / "assets" / name).read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class QuickstartMNISTDataModule(ImageDataModule):
    """The 10,000 MNIST test digits embedded in the package (``lebm_zoo/assets/mnist-t10k-*.gz``): offline by
    construction, no ``data_dir`` or ``download``.

    ``10,000 - val_size`` digits train and ``val_size`` validate (seeded ``random_split``); the test split is the
    validation split. ``x`` is ``(B, 1, img_size, img_size)`` in [-1, 1] (exactly ToTensor + Normalize(0.5, 0.5) of
    the uint8 digits), ``y`` the digit 0..9.

    Args:
        img_size: 28 (native) or 32 (padded by 2 background pixels, -1.0, on every side).
        batch_size, num_workers, val_size, seed: see :class:`ImageDataModule` (``val_size`` must be > 0).

    Attributes:
        img_size: 28 or 32. channels: 1.

    Raises:
        ValueError: for ``img_size`` not 28 or 32, or ``val_size`` 0 (the test split is the validation split).
    """

    channels = 1
    dataset_name = "quickstart digits"

    def __init__(self, batch_size: int = 100, num_workers: int = 0, val_size: int | float = 1000, seed: int = 1,
                 img_size: int = 28):
        if img_size not in (28, 32):
            raise ValueError(f"img_size must be 28 or 32, got {img_size}")
        if not val_size:
            raise ValueError("QuickstartMNISTDataModule needs val_size > 0: its test split is the validation split")
        super().__init__(str(resources.files("lebm_zoo") / "assets"), False, batch_size, num_workers, val_size, seed)
        self.img_size = img_size
        self.save_hyperparameters()

    def _present(self) -> bool:
        return True

    def _load(self):
        x = torch.from_numpy(_read_idx("mnist-t10k-images-idx3-ubyte.gz").copy()).unsqueeze(1)  # (10000, 1, 28, 28)
        x = x.float().div(255).sub(0.5).div(0.5)  # as ToTensor + Normalize(0.5, 0.5)
        if self.img_size == 32:
            x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
        y = torch.from_numpy(_read_idx("mnist-t10k-labels-idx1-ubyte.gz").astype(np.int64))
        return TensorDataset(x, y), None

    def setup(self, stage: str | None = None) -> None:
        """Build ``train_set`` and ``val_set``; ``test_set`` is ``val_set``."""
        super().setup(stage)
        self.test_set = self.val_set
