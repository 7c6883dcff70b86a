"""SVHN cropped digits (32x32x3) through torchvision: :class:`SVHNDataModule`."""
from __future__ import annotations

import os

import numpy as np
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity, download_url

from datamodules.base import ImageDataModule, normalize

__all__ = ["SVHNDataModule"]


class _SVHN(datasets.SVHN):
    """torchvision SVHN whose md5 check is optional (``checksum``), so copies and test files in SVHN's format load."""

    def __init__(self, *args, checksum: bool = False, **kwargs):
        self.checksum = checksum
        super().__init__(*args, **kwargs)

    def _check_integrity(self) -> bool:
        if self.checksum:
            return super()._check_integrity()
        return os.path.isfile(os.path.join(self.root, self.filename))

    def download(self) -> None:  # keep a present file unless its md5 is checked and wrong
        if not self._check_integrity():
            super().download()


class SVHNDataModule(ImageDataModule):
    """SVHN (Netzer et al. 2011), cropped digits 32x32x3, read by torchvision from ``data_dir``.

    Files: ``train_32x32.mat`` (73,257 images) and ``test_32x32.mat`` (26,032) as distributed (``X`` uint8
    ``(32, 32, 3, N)``, ``y`` ``(N, 1)`` with labels 1..10). torchvision maps the label 10 to the digit 0, so ``y`` is
    in 0..9. ``x`` is ``(B, 3, 32, 32)`` in [-1, 1].

    Args:
        data_dir: folder holding (or to download) the two ``.mat`` files.
        checksum: also verify the files' md5 against the official ones (off: any file in SVHN's format loads, like
            torchgeo's ``checksum``).
        download, batch_size, num_workers, val_size, seed: see :class:`ImageDataModule`.

    Attributes:
        img_size: 32. channels: 3.

    Raises:
        DatasetNotFoundError: files missing (or md5 mismatch with ``checksum``), download failed, or a ``.mat`` file
            that scipy cannot read or that lacks ``X``/``y`` (the message names the file).
    """

    img_size, channels = 32, 3
    dataset_name = "SVHN"
    expected = "train_32x32.mat, test_32x32.mat (SVHN's cropped-digits format)"
    downloadable = True
    FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}

    def __init__(self, data_dir: str = "data/svhn", download: bool = False, batch_size: int = 100,
                 num_workers: int = 2, val_size: int | float = 1000, seed: int = 1, checksum: bool = False):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed)
        self.checksum = checksum
        self.save_hyperparameters()

    def _ok(self, split: str) -> bool:
        path = self.data_dir / self.FILES[split]
        return path.is_file() and (not self.checksum or check_integrity(str(path), datasets.SVHN.split_list[split][2]))

    def _present(self) -> bool:
        return all(self._ok(s) for s in self.FILES)

    def _fetch(self) -> None:
        for split in self.FILES:
            if not self._ok(split):
                url, filename, md5 = datasets.SVHN.split_list[split]
                download_url(url, str(self.data_dir), filename, md5)

    def _missing_files(self) -> list[str]:
        bad = [f for s, f in self.FILES.items() if not self._ok(s)]
        return [f"{f} (or its md5 mismatches)" if self.checksum else f for f in bad]

    def _load(self):
        out = []
        tf = transforms.Compose(normalize(3))
        for split, filename in self.FILES.items():
            with self._reading(self.data_dir / filename):
                ds = _SVHN(str(self.data_dir), split=split, transform=tf, checksum=self.checksum)
                if ds.data.shape[1:] != (3, 32, 32) or np.size(ds.labels) != len(ds.data):
                    raise ValueError(f"X has shape {ds.data.shape[::-1]} (expected (32, 32, 3, N)) and y "
                                     f"{len(ds.labels)} labels")
            out.append(ds)
        return tuple(out)
