"""Image LightningDataModules: SVHN, CIFAR-10, MNIST, CelebA-64, any image folder, and the offline quickstart digits.

Every module yields batches ``(x, y)``: ``x`` float32 ``(B, C, H, W)`` scaled to [-1, 1] (ToTensor then
Normalize(0.5, 0.5)), ``y`` int64 labels (0 where a data set has none). torchvision's datasets do the reading; a
missing or unreadable data set raises :class:`DatasetNotFoundError` naming the files expected, the folder searched and
the argument that fixes it.
"""
from __future__ import annotations

import gzip
import os
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import scipy.io.matlab
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, random_split
from torchvision import datasets, transforms

__all__ = [
    "DatasetNotFoundError",
    "ImageDataModule",
    "SVHNDataModule",
    "CIFAR10DataModule",
    "MNISTDataModule",
    "CelebA64DataModule",
    "ImageFolderDataModule",
    "QuickstartMNISTDataModule",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetNotFoundError(FileNotFoundError):
    """A data set is missing, unreadable or not downloadable; the message says which files, where, and the fix."""


def _missing(name: str, files: str, folder: Path, can_download: bool, cause: str = "") -> DatasetNotFoundError:
    if cause.startswith("download failed"):
        fix = "put the files there by hand (from a machine with network access), or point --data.data_dir at a copy"
    else:
        fix = ("pass --data.download true to let torchvision fetch it, or " if can_download else "") + \
            "point --data.data_dir at a folder that holds it"
    why = f" ({cause})" if cause else ""
    return DatasetNotFoundError(f"{name} not found in {folder.resolve()}{why}: expected {files}. To fix: {fix}.")


def _cache_root() -> Path:
    return Path(os.environ.get("LEBM_ZOO_CACHE") or Path.home() / ".cache" / "lebm_zoo") / "data"


def extract_zip(path: Path) -> Path:
    """Extract an image-folder zip once to ``$LEBM_ZOO_CACHE/data/<stem>`` (default ``~/.cache/lebm_zoo``).

    Raises:
        DatasetNotFoundError: if the file is not a readable zip.
    """
    dest = _cache_root() / path.stem
    done = dest / ".extracted"
    if not done.exists():
        try:
            with zipfile.ZipFile(path) as zf:
                zf.extractall(dest)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetNotFoundError(f"{path.resolve()} is not a readable zip of images ({e}).") from None
        done.touch()
    return dest


def _find_dir_with(root: Path, names: tuple[str, ...]) -> Path | None:
    """``root`` or the shallowest folder below it (depth <= 2) that holds all of ``names``."""
    for cand in [root, *sorted(p for p in root.glob("*") if p.is_dir()),
                 *sorted(p for p in root.glob("*/*") if p.is_dir())]:
        if all((cand / n).is_dir() for n in names):
            return cand
    return None


class _ImageFiles(Dataset):
    """Every image file below ``root`` (sorted paths; label 0), loaded with PIL and transformed."""

    def __init__(self, root: Path, transform):
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), 0


class ImageDataModule(pl.LightningDataModule):
    """Base class: splits, loaders and common arguments of every image data module.

    Args:
        data_dir: folder (or, where stated, zip file) holding the data set.
        download: let torchvision download the data set into ``data_dir`` (needs the network).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        val_size: images held out of the training split for validation (seeded ``random_split``); a float in (0, 1)
            is a fraction; 0 holds nothing out and validation uses the test split.
        seed: seed of the hold-out split.

    Attributes:
        img_size: image side in pixels; channels: 1 or 3 (models read both).

    Raises:
        DatasetNotFoundError: in ``prepare_data``/``setup`` when the data is missing, unreadable or not downloadable.
    """

    img_size: int = 32
    channels: int = 3

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 100, num_workers: int = 2,
                 val_size: int | float = 1000, seed: int = 1):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data_dir = Path(data_dir).expanduser()
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.train_set = self.val_set = self.test_set = None

    # subclasses implement these two
    def _train_and_test(self) -> tuple[Dataset, Dataset]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _download(self) -> None:
        """Fetch the data set (rank 0 only); the default checks that it is there."""
        self._train_and_test()

    def transform(self):
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * self.channels,
                                                                               [0.5] * self.channels)])

    def prepare_data(self) -> None:
        self._download()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, test = self._train_and_test()
        n_val = int(round(self.val_size * len(train))) if isinstance(self.val_size, float) and self.val_size < 1 \
            else int(self.val_size)
        if n_val < 0 or n_val >= len(train):
            raise ValueError(f"val_size={self.val_size} leaves no training images out of {len(train)}")
        if n_val == 0:
            self.train_set, self.val_set = train, test
        else:
            g = torch.Generator().manual_seed(self.seed)
            self.train_set, self.val_set = random_split(train, [len(train) - n_val, n_val], generator=g)
        self.test_set = test

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class _SVHN(datasets.SVHN):
    """torchvision SVHN whose md5 check is optional (``checksum``), so copies and test files load."""

    def __init__(self, *args, checksum: bool = False, **kwargs):
        self.checksum = checksum
        super().__init__(*args, **kwargs)

    def _check_integrity(self) -> bool:
        if self.checksum:
            return super()._check_integrity()
        return os.path.isfile(os.path.join(self.root, self.filename))


class SVHNDataModule(ImageDataModule):
    """SVHN 32x32x3 (Netzer et al. 2011) through torchvision: ``train_32x32.mat`` (73,257), ``test_32x32.mat``
    (26,032). Labels 1..10 of the files are mapped by torchvision to digits, 10 -> 0.

    Args:
        checksum: verify the files' md5 against the official ones (off: any file in SVHN's format loads).
        others: see :class:`ImageDataModule`.
    """

    img_size, channels = 32, 3

    def __init__(self, data_dir: str = "data/svhn", download: bool = False, batch_size: int = 100,
                 num_workers: int = 2, val_size: int | float = 1000, seed: int = 1, checksum: bool = False):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed)
        self.checksum = checksum
        self.save_hyperparameters()

    def _split(self, split: str, download: bool = False):
        try:
            return _SVHN(str(self.data_dir), split=split, transform=self.transform(), download=download,
                         checksum=self.checksum)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            raise _missing("SVHN", "train_32x32.mat, test_32x32.mat", self.data_dir, True,
                           "missing, or md5 mismatch with checksum=True") from None
        except OSError as e:  # network failure during download
            raise _missing("SVHN", "train_32x32.mat, test_32x32.mat", self.data_dir, True,
                           f"download failed: {e}") from None
        except (ValueError, TypeError, KeyError, scipy.io.matlab.MatReadError) as e:  # scipy cannot read the .mat
            raise DatasetNotFoundError(f"{self.data_dir.resolve() / f'{split}_32x32.mat'} is not a readable SVHN "
                                       f".mat file ({type(e).__name__}: {e}).") from None

    def _download(self) -> None:
        for split in ("train", "test"):
            self._split(split, download=self.download)

    def _train_and_test(self):
        return self._split("train"), self._split("test")


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 32x32x3: torchvision's ``cifar-10-batches-py``, or an image-folder tree ``train/<class>/*.jpg``,
    ``test/<class>/*.jpg``, or a ``.zip`` of such a tree (extracted once to the cache, see :func:`extract_zip`).

    The copy in ``../shared/data/cifar10/cifar10-jpeg.zip`` is such a zip (JPEG re-encoded: FID against it is not
    comparable with published CIFAR-10 numbers).
    """

    img_size, channels = 32, 3
    FILES = "cifar-10-batches-py/ (torchvision), or train/<class>/*.png|jpg and test/<class>/... , or a .zip of those"

    def __init__(self, data_dir: str = "data/cifar10", download: bool = False, batch_size: int = 100,
                 num_workers: int = 2, val_size: int | float = 1000, seed: int = 1):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed)
        self.save_hyperparameters()

    def _folder(self) -> Path | None:
        root = extract_zip(self.data_dir) if self.data_dir.suffix == ".zip" and self.data_dir.is_file() \
            else self.data_dir
        return _find_dir_with(root, ("train", "test")) if root.is_dir() else None

    def _download(self) -> None:
        if self._folder() is not None:
            return
        try:
            datasets.CIFAR10(str(self.data_dir), train=True, download=self.download)
        except RuntimeError:
            raise _missing("CIFAR-10", self.FILES, self.data_dir, True) from None
        except OSError as e:
            raise _missing("CIFAR-10", self.FILES, self.data_dir, True, f"download failed: {e}") from None

    def _train_and_test(self):
        folder = self._folder()
        if folder is not None:
            return (datasets.ImageFolder(str(folder / "train"), transform=self.transform()),
                    datasets.ImageFolder(str(folder / "test"), transform=self.transform()))
        try:
            return (datasets.CIFAR10(str(self.data_dir), train=True, transform=self.transform()),
                    datasets.CIFAR10(str(self.data_dir), train=False, transform=self.transform()))
        except RuntimeError:
            raise _missing("CIFAR-10", self.FILES, self.data_dir, True) from None


class MNISTDataModule(ImageDataModule):
    """MNIST 28x28x1 through torchvision (``MNIST/raw/*-ubyte`` under ``data_dir``): 60,000 train, 10,000 test.

    Args:
        img_size: 28 (native) or 32 (zero-padded by 2 pixels on each side, i.e. -1 in the [-1, 1] scale).
    """

    channels = 1
    FILES = "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"

    def __init__(self, data_dir: str = "data/mnist", download: bool = False, batch_size: int = 100,
                 num_workers: int = 2, val_size: int | float = 1000, seed: int = 1, img_size: int = 28):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed)
        if img_size not in (28, 32):
            raise ValueError(f"img_size must be 28 or 32, got {img_size}")
        self.img_size = img_size
        self.save_hyperparameters()

    def transform(self):
        pad = [transforms.Pad(2)] if self.img_size == 32 else []
        return transforms.Compose([*pad, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def _split(self, train: bool, download: bool = False):
        try:
            return datasets.MNIST(str(self.data_dir), train=train, transform=self.transform(), download=download)
        except RuntimeError:
            raise _missing("MNIST", self.FILES, self.data_dir, True) from None
        except OSError as e:
            raise _missing("MNIST", self.FILES, self.data_dir, True, f"download failed: {e}") from None

    def _download(self) -> None:
        self._split(True, download=self.download)
        self._split(False, download=self.download)

    def _train_and_test(self):
        return self._split(True), self._split(False)


def _celeba_transform(img):
    """Centre crop of side min(H, W) * 140/178 (CelebA's standard 140-px crop, scaled), then resize to 64."""
    w, h = img.size
    side = round(min(w, h) * 140 / 178)
    return transforms.functional.resize(transforms.functional.center_crop(img, side), 64)


class _FolderModule(ImageDataModule):
    """Any folder (flat or nested) or zip of images, split into train/test by seed."""

    FILES = "image files (*.jpg, *.png, ...) in the folder or below it, or a .zip of them"
    name = "image folder"

    def __init__(self, data_dir, download, batch_size, num_workers, val_size, seed, test_size: int | float = 0.1):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed)
        self.test_size = test_size

    def _files(self) -> _ImageFiles:
        if self.data_dir.suffix == ".zip" and self.data_dir.is_file():
            root = extract_zip(self.data_dir)
        elif self.data_dir.is_dir():
            root = self.data_dir
        else:
            raise _missing(self.name, self.FILES, self.data_dir, False)
        ds = _ImageFiles(root, self.transform())
        if len(ds) == 0:
            raise _missing(self.name, self.FILES, self.data_dir, False, "no image files found")
        return ds

    def _train_and_test(self):
        ds = self._files()
        n_test = int(round(self.test_size * len(ds))) if isinstance(self.test_size, float) else int(self.test_size)
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.seed)).tolist()
        return Subset(ds, perm[n_test:]), Subset(ds, perm[:n_test])


class CelebA64DataModule(_FolderModule):
    """CelebA at 64x64x3: torchvision ``CelebA`` (official splits) when ``data_dir/celeba/img_align_celeba`` and
    ``list_eval_partition.txt`` are there; otherwise a folder or zip of face images (e.g. the 10,000-image copy in
    ``../shared/data/celeba``), split by seed with ``test_size``. Each image is centre-cropped to a square of side
    ``min(H, W) * 140/178`` (the standard 140-px crop of the 178x218 originals) and resized to 64.
    """

    img_size, channels = 64, 3
    name = "CelebA"

    def __init__(self, data_dir: str = "data/celeba", download: bool = False, batch_size: int = 100,
                 num_workers: int = 2, val_size: int | float = 1000, seed: int = 1, test_size: int | float = 0.1):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed, test_size)
        self.save_hyperparameters()

    def transform(self):
        return transforms.Compose([transforms.Lambda(_celeba_transform), transforms.ToTensor(),
                                   transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def _official(self) -> bool:
        base = self.data_dir / "celeba"
        return (base / "img_align_celeba").is_dir() and (base / "list_eval_partition.txt").is_file()

    def _train_and_test(self):
        if self._official():
            mk = lambda split: datasets.CelebA(str(self.data_dir), split=split, target_type=[],  # noqa: E731
                                               transform=self.transform())
            return _Labelled(mk("train")), _Labelled(mk("test"))
        return super()._train_and_test()


class _Labelled(Dataset):
    """Give label 0 to a dataset whose targets are empty."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x = self.base[i]
        return (x[0] if isinstance(x, tuple) else x), 0


class ImageFolderDataModule(_FolderModule):
    """Any folder (flat or nested) or ``.zip`` of images, resized (shorter side) and centre-cropped to ``img_size``.

    Args:
        img_size: output side in pixels.
        channels: 3 (RGB) or 1 (grayscale).
        test_size: images (int) or fraction (float) held out as the test split, by ``seed``.
    """

    name = "image folder"

    def __init__(self, data_dir: str, img_size: int = 32, channels: int = 3, download: bool = False,
                 batch_size: int = 100, num_workers: int = 2, val_size: int | float = 1000, seed: int = 1,
                 test_size: int | float = 0.1):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed, test_size)
        self.img_size, self.channels = img_size, channels
        self.save_hyperparameters()

    def transform(self):
        gray = [transforms.Grayscale(1)] if self.channels == 1 else []
        return transforms.Compose([transforms.Resize(self.img_size), transforms.CenterCrop(self.img_size), *gray,
                                   transforms.ToTensor(), transforms.Normalize([0.5] * self.channels,
                                                                               [0.5] * self.channels)])


def _read_idx(name: str) -> np.ndarray:
    data = gzip.decompress((resources.files("lebm_zoo") / "assets" / name).read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class QuickstartMNISTDataModule(ImageDataModule):
    """The 10,000 MNIST test digits embedded in the package (gzip idx, 1.6 MB): offline by construction.

    ``10,000 - val_size`` images train, ``val_size`` validate; the test split is the validation split.
    """

    channels = 1

    def __init__(self, batch_size: int = 100, num_workers: int = 0, val_size: int | float = 1000, seed: int = 1,
                 img_size: int = 28):
        super().__init__("<package>", False, batch_size, num_workers, val_size, seed)
        if img_size not in (28, 32):
            raise ValueError(f"img_size must be 28 or 32, got {img_size}")
        self.img_size = img_size
        self.save_hyperparameters()

    def _download(self) -> None:
        return None

    def _train_and_test(self):
        if not self.val_size:
            raise ValueError("QuickstartMNISTDataModule needs val_size > 0: its test split is the validation split")
        x = torch.from_numpy(_read_idx("mnist-t10k-images-idx3-ubyte.gz").copy()).float().div(127.5).sub(1)
        x = x.unsqueeze(1)  # (10000, 1, 28, 28) in [-1, 1]
        if self.img_size == 32:
            x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
        y = torch.from_numpy(_read_idx("mnist-t10k-labels-idx1-ubyte.gz").astype(np.int64))
        return TensorDataset(x, y), None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.test_set = self.val_set
