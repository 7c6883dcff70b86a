"""MNIST anomaly detection with one held-out digit, the protocol of Pang et al. (2020) and Cui et al. (2023).

Both papers cite the protocol of Zenati et al. (2018) and Kumar et al. (2019) and publish no anomaly-detection code
of their own; the split is the one those two codes build (see :class:`MNISTAnomalyDataModule`, ``split``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from datamodules.mnist import MNISTDataModule

__all__ = ["MNIST_DIGIT_COUNTS", "MNISTAnomalyDataModule", "training_pool_sizes"]


#: images of each digit in MNIST's 70,000 (training and test sets together): the reference split's pool
MNIST_DIGIT_COUNTS = {0: 6903, 1: 7877, 2: 6990, 3: 7141, 4: 6824, 5: 6313, 6: 6876, 7: 7293, 8: 6825, 9: 6958}


def training_pool_sizes(num_normal: int, train_fraction: float = 0.8, val_fraction: float = 0.0) -> tuple[int, int]:
    """``(pool, val)``: how many of ``num_normal`` normal images :class:`MNISTAnomalyDataModule` draws for training
    (``floor(train_fraction * num_normal)``, of which ``val`` are held out for validation: ``max(1,
    floor(val_fraction * pool))`` when ``val_fraction > 0``, else 0). The test split holds the other
    ``num_normal - pool`` normal images and every anomaly.

    Raises:
        ValueError: if the fractions leave the training, validation or test split without images.
    """
    n_pool = math.floor(train_fraction * num_normal)
    n_val = max(1, math.floor(val_fraction * n_pool)) if val_fraction > 0 else 0
    if n_pool - n_val < 1 or n_pool == num_normal:
        raise ValueError(f"train_fraction={train_fraction} and val_fraction={val_fraction} leave an empty split out "
                         f"of {num_normal} normal images")
    return n_pool, n_val


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

    The LEBM paper (Pang et al. 2020) and the hierarchical-prior paper (Cui et al. 2023) follow the protocol of
    Zenati et al. (2018) and Kumar et al. (2019) and publish no anomaly code of their own (neither
    bpucla/latent-space-EBM-prior at a530d0f nor jcui1224/hierarchical-joint-ebm at 26aeb1f has any). The split is
    therefore the one the cited code builds: houssamzenati/Efficient-GAN-Anomaly-Detection ``data/mnist.py`` (lines
    5-6 and 35-69; copied unchanged into ritheshkumar95/energy_based_generative_models ``data/mnist_anomaly.py``):

    1. pool the ``mnist.npz`` arrays in the order ``x_train``, ``x_test``, ``x_valid`` (line 49). That file holds the
       50,000 / 10,000 / 10,000 split of the classic MNIST pickle, whose validation images are the last 10,000 of
       MNIST's training file, so the pool is train[:50,000], test, train[50,000:] (an inference: the npz itself is
       not published; for a training file of another size the last sixth plays the validation part);
    2. the ``heldout_digit`` images are the anomalies (label 1, the positive class, ``utils/adapt_data.py``);
    3. a module-level ``numpy.random.RandomState(42)`` (line 6) shuffles the ``N`` normal images; the first
       ``int(0.8 * N)`` are the training set (lines 55-62);
    4. the test set is the other 20% of the normals plus every anomaly, shuffled with the same generator (lines
       64-69). The generator is module-level and the function runs once for ``get_train`` and again for
       ``get_test``, so the test normals come from the generator's *third* permutation, not the first: about 80%
       of them are training images (``bigan/run_mnist.py`` calls ``get_train`` then ``get_test``). ``split=
       "reference"`` (the default) reproduces this, ``num_test_normals_in_train`` counts them;
       ``split="disjoint"`` is the split a reader expects (test normals from the same permutation, never trained
       on), which is what this module did before (``torch.randperm`` with ``seed``, pool train 60k then test 10k);
    5. scores: higher = more anomalous; AUPRC is ``auc(recall, precision)`` of ``precision_recall_curve``
       (``utils/evaluations.py`` lines 19-20; :class:`~lebm_zoo.callbacks.AnomalyDetectionCallback`);
    6. the checkpoint evaluated in that code is the last one (Zenati: once after the final epoch; Kumar et al.
       evaluate at every epoch start). We evaluate the last checkpoint and never select on the test split; if
       ``val_fraction > 0``, the last ``max(1, floor(val_fraction * int(0.8 * N)))`` training normals are a
       validation split instead (normal images only).

    Why the papers' VAE column is below the worst possible AUPRC of this split (digits 1, 7, 9): with 33-39%
    anomalies in the test set, ranking every anomaly last still scores 0.18-0.19 (the trapezoid; 0.20-0.23 as
    average precision; ``benchmarks/anomaly_table.py`` computes them), above the VAE's 0.063/0.148/0.104, and with
    the normals as the positive class the floor is higher still. Those numbers fit a test set of about 10% anomalies
    (e.g. MNIST's 10k test split), so that column most likely comes from another protocol; no code that produced it
    is public.

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
        split: ``"reference"`` (the cited code's split, test normals drawn again and mostly trained on; steps 1-4)
            or ``"disjoint"`` (test normals never trained on).

    Attributes:
        channels: 1. img_size: 28.
        train_set, val_set, test_set: the datasets after ``setup`` (``val_set`` is ``None`` when ``val_fraction=0``).
        num_train, num_val: training and validation images (all normal); ``None`` before ``setup``.
        num_test: test images, normal and anomalous; ``None`` before ``setup``.
        num_test_anomalies: test images of the held-out digit; ``None`` before ``setup``.
        num_test_normals_in_train: test normals that are also training (or validation) images: about 80% of them
            with ``split="reference"``, 0 with ``"disjoint"``; ``None`` before ``setup``.

    Raises:
        ValueError: for ``heldout_digit`` not an integer in 0..9, ``train_fraction`` not in (0, 1), ``val_fraction``
            not in [0, 1), ``split`` not one of the two, ``batch_size < 1``, or (in ``setup``) fractions that leave a
            split empty.
        DatasetNotFoundError: in ``prepare_data`` and ``setup`` when the idx files are missing, the download fails or
            a file is unreadable.
    """

    channels = 1
    img_size = 28

    def __init__(self, data_dir: str, heldout_digit: int = 1, download: bool = False, batch_size: int = 100,
                 num_workers: int = 0, seed: int = 42, train_fraction: float = 0.8, val_fraction: float = 0.0,
                 split: str = "reference"):
        if isinstance(heldout_digit, bool) or not isinstance(heldout_digit, int) or not 0 <= heldout_digit <= 9:
            raise ValueError(f"heldout_digit must be an integer digit in 0..9, got {heldout_digit!r}")
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if split not in ("reference", "disjoint"):
            raise ValueError(f"split must be 'reference' or 'disjoint', got {split!r}")
        self.split = split
        super().__init__(data_dir, download, batch_size, num_workers, val_size=0, seed=seed, img_size=28)
        self.heldout_digit = heldout_digit
        self.train_fraction = train_fraction
        self.val_fraction = val_fraction
        self.num_train: int | None = None
        self.num_val: int | None = None
        self.num_test: int | None = None
        self.num_test_anomalies: int | None = None
        self.num_test_normals_in_train: int | None = None
        self.save_hyperparameters(ignore=["val_size", "img_size"])  # fixed above, not arguments of this class

    def _pool(self) -> tuple[Tensor, Tensor]:
        """All 70,000 digits: uint8 images ``(N, 28, 28)`` in [0, 255] and int64 digits ``(N,)``: train then test
        (``split="disjoint"``), or the reference's train[:50k], test, train[50k:] (``"reference"``, step 1)."""
        images, digits = [], []
        for train in (True, False):
            with self._reading(self._root() / "MNIST" / "raw" / ("train-*-ubyte" if train else "t10k-*-ubyte")):
                ds = datasets.MNIST(str(self._root()), train=train)
            images.append(ds.data)
            digits.append(ds.targets.long())
        if self.split == "reference":
            cut = len(images[0]) - len(images[0]) // 6  # 50,000 of 60,000: the pickle's train / validation parts
            images = [images[0][:cut], images[1], images[0][cut:]]
            digits = [digits[0][:cut], digits[1], digits[0][cut:]]
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
        n = len(normal_idx)
        n_pool, n_val = training_pool_sizes(n, self.train_fraction, self.val_fraction)
        if self.split == "reference":
            rng = np.random.RandomState(self.seed)
            train_order = normal_idx[torch.from_numpy(rng.permutation(n))]  # get_train: the first permutation...
            rng.permutation(n - n_pool + len(anomaly_idx))  # ... then its (unused) test shuffle
            test_normals = normal_idx[torch.from_numpy(rng.permutation(n))][n_pool:]  # get_test: the third one
        else:
            train_order = normal_idx[torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))]
            test_normals = train_order[n_pool:]
        train_idx, val_idx = train_order[: n_pool - n_val], train_order[n_pool - n_val: n_pool]
        test_idx = torch.cat([test_normals, anomaly_idx])
        seen = torch.zeros(len(images), dtype=torch.bool)
        seen[train_order[:n_pool]] = True

        def split(index: Tensor) -> _PooledDigits:
            return _PooledDigits(images, index, anomalous[index].long())

        self.train_set, self.test_set = split(train_idx), split(test_idx)
        self.val_set = split(val_idx) if n_val else None
        self.num_train, self.num_val = len(train_idx), n_val
        self.num_test, self.num_test_anomalies = len(test_idx), len(anomaly_idx)
        self.num_test_normals_in_train = int(seen[test_normals].sum())

    def val_dataloader(self) -> DataLoader | list:
        """Batches of the validation split in order (normal images only), or ``[]`` (no validation) when
        ``val_fraction=0``."""
        if self.val_set is None and self.train_set is not None:
            return []
        return super().val_dataloader()
