"""The base of the image datamodules: :class:`DatasetNotFoundError`, the fix strings of its messages, :func:`summary`,
:func:`normalize` and :class:`ImageDataModule`.

Every image module yields batches ``(x, y)``: ``x`` float32 ``(B, C, H, W)`` scaled to [-1, 1] (ToTensor then
Normalize(0.5, 0.5)), ``y`` int64 labels (0 where a data set has none). torchvision's datasets and transforms do the
reading. A missing, undownloadable or unreadable data set raises :class:`DatasetNotFoundError`, whose message names the
files expected, the folder searched (absolute) and the option that fixes it (``--data.download true`` /
``--data.data_dir PATH``).

Only ``prepare_data`` (rank 0) downloads; ``setup`` checks again and never downloads.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision import transforms

from datamodules.loaders import ShuffleStateMixin, make_loader

__all__ = ["DATA_DIR_FIX", "DOWNLOAD_FIX", "DatasetNotFoundError", "ImageDataModule", "normalize", "summary"]


DOWNLOAD_FIX = "pass --data.download true to fetch it with torchvision"
DATA_DIR_FIX = "pass --data.data_dir PATH pointing at a copy"


class DatasetNotFoundError(FileNotFoundError):
    """A data set is missing, could not be downloaded, or is unreadable (corrupt file, zip that is not a zip).

    The message names the files expected, the folder searched (absolute path) and the fix (``--data.download true``
    where torchvision can download the data set, ``--data.data_dir PATH`` pointing at a copy); for an unreadable file
    it names that file. The CLI prints it without a traceback.
    """


def summary(e: BaseException) -> str:
    """``Type: message`` of an exception on one line, at most about 300 characters."""
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    msg = msg if len(msg) <= 300 else msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def normalize(channels: int) -> list:
    """ToTensor then Normalize(0.5, 0.5): uint8 0 -> -1.0, 255 -> 1.0."""
    return [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]


class ImageDataModule(ShuffleStateMixin, pl.LightningDataModule):
    """Base class: common arguments, the train/validation hold-out, loaders and clear missing-data errors.

    Batches are ``(x, y)``: ``x`` float32 ``(B, channels, img_size, img_size)`` in [-1, 1], ``y`` int64 ``(B,)``.
    ``setup`` builds ``train_set``, ``val_set`` and ``test_set``; it is idempotent (a second call, e.g. for testing
    after fitting, keeps the sets).

    Args:
        data_dir: folder (or, where a subclass says so, ``.zip`` file) holding the data set; ``~`` is expanded.
        download: let ``prepare_data`` download the data set with torchvision into ``data_dir`` (needs the network;
            only for SVHN, CIFAR-10, MNIST and CelebA).
        batch_size: images per batch (>= 1).
        num_workers: DataLoader worker processes (workers persist between epochs when > 0).
        val_size: images held out of the training split for validation with a seeded
            ``torch.utils.data.random_split``; a float in (0, 1) is a fraction of the training split; 0 holds
            nothing out and validation then uses the test split.
        seed: seed of the hold-out (and, for folders without official splits, of the train/test split).

    Attributes:
        img_size: image side in pixels (models read it).
        channels: 1 or 3 (models read it).
        data_dir: ``Path`` of ``data_dir``.
        train_set, val_set, test_set: the datasets, ``None`` before ``setup``.

    Raises:
        ValueError: for ``batch_size < 1``, a negative ``val_size``, or (in ``setup``) a ``val_size`` that leaves no
            training images.
        DatasetNotFoundError: in ``prepare_data`` and ``setup`` when the data is missing, a download fails, or a file
            is unreadable.
    """

    img_size: int = 32
    channels: int = 3
    #: name of the data set in messages, what is expected in ``data_dir``, and whether torchvision can download it.
    dataset_name = "data set"
    expected = "image files"
    downloadable = False

    def __init__(self, data_dir: str, download: bool = False, batch_size: int = 100, num_workers: int = 2,
                 val_size: int | float = 1000, seed: int = 1):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_size < 0 or (isinstance(val_size, float) and 1 <= val_size and not val_size.is_integer()):
            raise ValueError(f"val_size must be an integer >= 0 or a fraction in (0, 1), got {val_size}")
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ------------------------------------------------------------------ hooks for subclasses
    def _present(self) -> bool:
        """Whether the data set is in ``data_dir`` (cheap; no full read)."""
        raise NotImplementedError

    def _fetch(self) -> None:
        """Download the data set with torchvision into ``data_dir``."""
        raise NotImplementedError

    def _load(self) -> tuple[Dataset, Dataset | None]:
        """The transformed ``(train, test)`` datasets."""
        raise NotImplementedError

    def _missing_files(self) -> list[str]:
        """Names of the expected files that are absent (for the message; may be empty)."""
        return []

    # ------------------------------------------------------------------ errors
    def _not_found(self, why: str = "") -> DatasetNotFoundError:
        folder = self.data_dir.resolve()
        if why == "missing":
            missing = self._missing_files()
            why = "no such file or folder" if not folder.exists() else f"missing: {', '.join(missing)}" if missing \
                else why
        fix = f"{DOWNLOAD_FIX}, or {DATA_DIR_FIX}" if self.downloadable else DATA_DIR_FIX
        if why.startswith("download failed"):
            fix = f"check the network connection and retry --data.download true, or {DATA_DIR_FIX}"
        why = f" ({why})" if why else ""
        return DatasetNotFoundError(f"{self.dataset_name} not found in {folder}{why}: expected {self.expected}. "
                                    f"To fix it, {fix}.")

    @contextmanager
    def _reading(self, path: Path):
        """Turn any error while reading ``path`` into a DatasetNotFoundError naming it."""
        try:
            yield
        except (DatasetNotFoundError, MemoryError):
            raise
        except Exception as e:
            fix = f"delete it and {DOWNLOAD_FIX} again, or {DATA_DIR_FIX}" if self.downloadable else DATA_DIR_FIX
            raise DatasetNotFoundError(f"{self.dataset_name}: {path.resolve()} is not readable, is corrupt or is not "
                                       f"in the expected format ({summary(e)}); expected {self.expected}. To fix it, "
                                       f"{fix}.") from None

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Download the data set if ``download`` and it is missing (rank 0 only), then check that it is there.

        Raises:
            DatasetNotFoundError: if the data set is missing (and ``download`` is false) or the download fails.
        """
        if not self._present() and self.download and self.downloadable:
            try:
                self._fetch()
            except DatasetNotFoundError:
                raise
            except Exception as e:  # URLError/HTTPError (OSError), md5 mismatch (RuntimeError), bad archive, ...
                raise self._not_found(f"download failed: {summary(e)}") from None
        if not self._present():
            raise self._not_found("missing" if not self.download or not self.downloadable
                                  else "still missing after the download")

    def _n_val(self, n_train: int) -> int:
        v = self.val_size
        n = max(1, round(v * n_train)) if isinstance(v, float) and 0 < v < 1 else int(v)
        if n >= n_train:
            raise ValueError(f"val_size={v} leaves no training images out of {n_train}")
        return n

    def setup(self, stage: str | None = None) -> None:
        """Build ``train_set``, ``val_set`` and ``test_set`` (once; later calls keep them). Never downloads.

        Raises:
            DatasetNotFoundError: if the data set is missing or unreadable.
            ValueError: if ``val_size`` leaves no training images.
        """
        if self.train_set is not None:
            return
        if not self._present():
            raise self._not_found("missing")
        train, test = self._load()
        n_val = self._n_val(len(train))
        if n_val == 0:
            self.train_set, self.val_set = train, test
        else:
            g = torch.Generator().manual_seed(self.seed)
            self.train_set, self.val_set = random_split(train, [len(train) - n_val, n_val], generator=g)
        self.test_set = test

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        return make_loader(ds, batch_size=self.batch_size, shuffle=shuffle, drop_last=False,
                           num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                           pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of ``train_set`` (the last one may be smaller)."""
        return self.track_train_loaders(self._loader(self.train_set, shuffle=True))

    def val_dataloader(self) -> DataLoader:
        """Batches of ``val_set`` in order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of ``test_set`` in order."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Same as :meth:`test_dataloader`."""
        return self.test_dataloader()
