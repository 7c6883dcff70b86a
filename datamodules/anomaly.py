"""MNIST anomaly detection with one held-out digit, the protocol of Pang et al. (2020), anomaly detection experiment.

Protocol: the 70,000 MNIST images (train 60k then test 10k) are pooled; the images of the held-out digit are the
anomalies, all others are normal. The normal images are shuffled with ``torch.Generator().manual_seed(seed)``; the
first ``floor(train_fraction * N_normal)`` train and the rest, together with every image of the held-out digit, form
the test split. An optional validation split is carved out of the training normals only.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from datamodules.mnist import MNISTDataModule

__all__ = ["MNISTAnomalyDataModule"]


class _PooledDigits(Dataset):
    """Items ``images[index[i]]`` of a shared uint8 image pool, as ``(x (1, 28, 28) in [-1, 1], label[i])``."""

    def __init__(self, images: Tensor, index: Tensor, labels: Tensor):
        self.images, self.index, self.labels = images, index, labels

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        x = self.images[self.index[i]].unsqueeze(0).float().div(255).sub(0.5).div(0.5)  # as ToTensor + Normalize(0.5)
        return x, self.labels[i]


class MNISTAnomalyDataModule(MNISTDataModule):
    """MNIST with one digit held out as the anomaly class: train on normal digits, test on normals plus anomalies.

    Follows the protocol of Pang et al. (2020, "Learning Latent Space Energy-Based Prior Model", anomaly detection) as
    implemented in yuPeiyu98/Diffusion-Amortized-MCMC, except that no checkpoint is selected by test AUPRC (model
    selection, if any, uses the validation split, which holds training normals only):

    1. pool all 70,000 MNIST images (train 60k, then test 10k, in file order);
    2. drop the ``heldout_digit`` images (the anomalies; 7,877 for digit 1);
    3. shuffle the ``N`` remaining normal images with ``torch.Generator().manual_seed(seed)`` (``torch.randperm``);
    4. train on the first ``floor(train_fraction * N)`` of them (the training normals), minus the validation split;
    5. test on the other ``N - floor(train_fraction * N)`` normals followed by every image of the held-out digit;
    6. if ``val_fraction > 0``, the last ``max(1, floor(val_fraction * floor(train_fraction * N)))`` training normals
       (in shuffled order) are the validation split instead.

    Batches are ``(x, y)``: ``x`` float32 ``(B, 1, 28, 28)`` in [-1, 1] (exactly ToTensor then Normalize(0.5, 0.5) of
    the uint8 digits, as :class:`~datamodules.MNISTDataModule`), ``y`` int64 ``(B,)``: 1 for an anomaly (the held-out
    digit), 0 for a normal image. Train and validation labels are all 0. Training batches are shuffled; validation and
    test batches are in split order (test: normals, then anomalies).

    The files are read as :class:`~datamodules.MNISTDataModule` reads them (torchvision ``MNIST``, layout
    ``data_dir/MNIST/raw/*-idx?-ubyte``; ``data_dir`` may also be that ``MNIST`` or ``raw`` folder).

    Args:
        data_dir: folder holding ``MNIST/raw/``; ``~`` is expanded.
        heldout_digit: the anomaly class, 0..9 (the paper reports 1, 4, 5, 7 and 9).
        download: let ``prepare_data`` download MNIST with torchvision into ``data_dir`` (needs the network).
        batch_size: images per batch (>= 1).
        num_workers: DataLoader worker processes.
        seed: seed of the shuffle of the normal images (42 in the reference).
        train_fraction: fraction of the normal images in the training pool, in (0, 1) (0.8 in the reference).
        val_fraction: fraction of the training pool held out for validation, in [0, 1); 0 means no validation split.

    Attributes:
        channels: 1. img_size: 28.
        train_set, val_set, test_set: the datasets after ``setup`` (``val_set`` is ``None`` when ``val_fraction=0``).
        num_train, num_val: training and validation images (all normal); ``None`` before ``setup``.
        num_test: test images, normal and anomalous; ``None`` before ``setup``.
        num_test_anomalies: test images of the held-out digit; ``None`` before ``setup``.

    Raises:
        ValueError: for ``heldout_digit`` not an integer in 0..9, ``train_fraction`` not in (0, 1), ``val_fraction``
            not in [0, 1), ``batch_size < 1``, or (in ``setup``) fractions that leave a split empty.
        DatasetNotFoundError: in ``prepare_data`` and ``setup`` when the idx files are missing, the download fails or
            a file is unreadable.
    """

    channels = 1
    img_size = 28

    def __init__(self, data_dir: str, heldout_digit: int = 1, download: bool = False, batch_size: int = 100,
                 num_workers: int = 0, seed: int = 42, train_fraction: float = 0.8, val_fraction: float = 0.0):
        if isinstance(heldout_digit, bool) or not isinstance(heldout_digit, int) or not 0 <= heldout_digit <= 9:
            raise ValueError(f"heldout_digit must be an integer digit in 0..9, got {heldout_digit!r}")
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        super().__init__(data_dir, download, batch_size, num_workers, val_size=0, seed=seed, img_size=28)
        self.heldout_digit = heldout_digit
        self.train_fraction = train_fraction
        self.val_fraction = val_fraction
        self.num_train: int | None = None
        self.num_val: int | None = None
        self.num_test: int | None = None
        self.num_test_anomalies: int | None = None
        self.save_hyperparameters(ignore=["val_size", "img_size"])  # fixed above, not arguments of this class

    def _pool(self) -> tuple[Tensor, Tensor]:
        """All 70,000 digits: uint8 images ``(N, 28, 28)`` in [0, 255] and int64 digits ``(N,)``, train then test."""
        images, digits = [], []
        for train in (True, False):
            with self._reading(self._root() / "MNIST" / "raw" / ("train-*-ubyte" if train else "t10k-*-ubyte")):
                ds = datasets.MNIST(str(self._root()), train=train)
            images.append(ds.data)
            digits.append(ds.targets.long())
        return torch.cat(images), torch.cat(digits)

    def setup(self, stage: str | None = None) -> None:
        """Build ``train_set``, ``val_set`` and ``test_set`` and the split sizes (once; later calls keep them).

        Never downloads.

        Raises:
            DatasetNotFoundError: if MNIST is missing or unreadable.
            ValueError: if the fractions leave the training, validation or test split without images.
        """
        if self.train_set is not None:
            return
        if not self._present():
            raise self._not_found("missing")
        images, digits = self._pool()
        anomalous = digits == self.heldout_digit
        normal_idx = torch.nonzero(~anomalous).squeeze(1)
        anomaly_idx = torch.nonzero(anomalous).squeeze(1)
        shuffled = normal_idx[torch.randperm(len(normal_idx), generator=torch.Generator().manual_seed(self.seed))]
        n_pool = math.floor(self.train_fraction * len(shuffled))
        n_val = max(1, math.floor(self.val_fraction * n_pool)) if self.val_fraction > 0 else 0
        if n_pool - n_val < 1 or n_pool == len(shuffled):
            raise ValueError(f"train_fraction={self.train_fraction} and val_fraction={self.val_fraction} leave an "
                             f"empty split out of {len(shuffled)} normal images")
        train_idx, val_idx = shuffled[: n_pool - n_val], shuffled[n_pool - n_val: n_pool]
        test_idx = torch.cat([shuffled[n_pool:], anomaly_idx])

        def split(index: Tensor) -> _PooledDigits:
            return _PooledDigits(images, index, anomalous[index].long())

        self.train_set, self.test_set = split(train_idx), split(test_idx)
        self.val_set = split(val_idx) if n_val else None
        self.num_train, self.num_val = len(train_idx), n_val
        self.num_test, self.num_test_anomalies = len(test_idx), len(anomaly_idx)

    def val_dataloader(self) -> DataLoader | list:
        """Batches of the validation split in order (normal images only), or ``[]`` (no validation) when
        ``val_fraction=0``."""
        if self.val_set is None and self.train_set is not None:
            return []
        return super().val_dataloader()
