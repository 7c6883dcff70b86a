"""2-D toy data: the eight-Gaussian mixture of the flow-contrastive-estimation toy (``lifeitech/fce-2d``)."""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch.utils.data import TensorDataset

from datamodules.loaders import SplitLoadersMixin, make_loader

__all__ = ["EightGaussiansDataModule", "eight_gaussians", "eight_gaussian_centers"]


def eight_gaussian_centers(radius: float = 2.0) -> torch.Tensor:
    """The 8 mode centres ``(8, 2)``, evenly spaced on a circle of ``radius``."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return (radius * torch.stack([angles.cos(), angles.sin()], 1)).float()


def eight_gaussians(n: int, radius: float = 2.0, std: float = 0.1, seed: int = 0, return_labels: bool = False):
    """``n`` points ``(n, 2)`` from an equal mixture of N(centre, std^2 I) over :func:`eight_gaussian_centers`;
    with ``return_labels``, ``(points, modes)``: also each point's mode index ``(n,)`` int64 in 0..7 (the same
    points)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 8, (n,), generator=g)
    x = eight_gaussian_centers(radius)[idx] + std * torch.randn(n, 2, generator=g)
    return (x, idx) if return_labels else x


class EightGaussiansDataModule(SplitLoadersMixin, pl.LightningDataModule):
    """Eight-Gaussian mixture in 2-D: train, val and test sets drawn once with fixed seeds. Batches are ``(x,)``,
    ``x`` of shape ``(B, 2)``; with ``labels``, ``(x, y)``, ``y`` ``(B,)`` int64 the mode index 0..7 (mode k at angle
    k * 45 degrees; the points are the same), for classification and :class:`~datamodules.SemiSupervisedDataModule`.

    Args:
        n_train: training points (fce-2d: 500,000).
        n_val, n_test: held-out points.
        radius: radius of the circle of modes.
        std: standard deviation of each mode.
        batch_size: points per batch (fce-2d: 1000).
        seed: seed of the training set (val and test use ``seed + 1`` and ``seed + 2``).
        num_workers: DataLoader workers (0 is best for in-memory tensors).
        labels: also yield each point's mode index.

    Raises:
        ValueError: for non-positive sizes.
    """

    def __init__(self, n_train: int = 500_000, n_val: int = 5_000, n_test: int = 5_000, radius: float = 2.0,
                 std: float = 0.1, batch_size: int = 1000, seed: int = 0, num_workers: int = 0,
                 labels: bool = False):
        super().__init__()
        if min(n_train, n_val, n_test, batch_size) < 1 or std <= 0:
            raise ValueError("n_train, n_val, n_test, batch_size and std must be positive")
        self.save_hyperparameters()
        # the arguments are read from attributes, not from hparams: LightningCLI gives a datamodule built inside
        # another one's arguments (SemiSupervisedDataModule's datamodule) the outer one's hparams
        self.n_train, self.n_val, self.n_test, self.radius, self.std = n_train, n_val, n_test, radius, std
        self.batch_size, self.seed, self.num_workers, self.labels = batch_size, seed, num_workers, labels
        self.dim = 2

    def setup(self, stage: str | None = None) -> None:
        def split(n, seed):
            if not self.labels:
                return TensorDataset(eight_gaussians(n, self.radius, self.std, seed))
            return TensorDataset(*eight_gaussians(n, self.radius, self.std, seed, return_labels=True))

        self.train_set = split(self.n_train, self.seed)
        self.val_set = split(self.n_val, self.seed + 1)
        self.test_set = split(self.n_test, self.seed + 2)

    def _loader(self, ds, shuffle):
        return make_loader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)
