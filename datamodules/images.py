"""Image LightningDataModules: SVHN, CIFAR-10, MNIST, CelebA-64, any image folder, and the offline quickstart digits.

Every module yields batches ``(x, y)``: ``x`` float32 ``(B, C, H, W)`` scaled to [-1, 1] (ToTensor then
Normalize(0.5, 0.5)), ``y`` int64 labels (0 where a data set has none). torchvision's datasets and transforms do the
reading. A missing, undownloadable or unreadable data set raises :class:`DatasetNotFoundError`, whose message names the
files expected, the folder searched (absolute) and the option that fixes it (``--data.download true`` /
``--data.data_dir PATH``).

Only ``prepare_data`` (rank 0) downloads; ``setup`` checks again and never downloads.
"""
from __future__ import annotations

import gzip
import os
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, random_split
from torchvision import datasets, transforms
from torchvision.datasets.celeba import CSV
from torchvision.datasets.utils import check_integrity, download_url

from datamodules.loaders import make_loader

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

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DOWNLOAD_FIX = "pass --data.download true to fetch it with torchvision"
DATA_DIR_FIX = "pass --data.data_dir PATH pointing at a copy"


class DatasetNotFoundError(FileNotFoundError):
    """A data set is missing, could not be downloaded, or is unreadable (corrupt file, zip that is not a zip).

    The message names the files expected, the folder searched (absolute path) and the fix (``--data.download true``
    where torchvision can download the data set, ``--data.data_dir PATH`` pointing at a copy); for an unreadable file
    it names that file. The CLI prints it without a traceback.
    """


def _summary(e: BaseException) -> str:
    """``Type: message`` of an exception on one line, at most about 300 characters."""
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    msg = msg if len(msg) <= 300 else msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ------------------------------------------------------------------------------------------------------ files, zips
def _cache_root() -> Path:
    """``$LEBM_ZOO_CACHE/data``, else ``~/.cache/lebm_zoo/data``."""
    root = os.environ.get("LEBM_ZOO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "lebm_zoo") / "data"


def extract_zip(path: str | Path) -> Path:
    """Extract a zip once to ``<cache>/data/<zip stem>/`` and return that folder.

    The cache is ``$LEBM_ZOO_CACHE`` if set, else ``~/.cache/lebm_zoo``. A marker file records the zip's size and
    modification time: a later call with the same zip returns at once, a changed zip is extracted again. Extraction
    goes to a temporary folder renamed into place, so concurrent processes never see a half-extracted tree.

    Args:
        path: the ``.zip`` file.

    Returns:
        The folder holding the zip's contents.

    Raises:
        DatasetNotFoundError: if ``path`` is not a readable zip (names the file) or cannot be extracted.
    """
    path = Path(path).expanduser().resolve()
    dest = _cache_root() / path.stem
    marker = dest / ".lebm_zoo_extracted"
    stat = path.stat()
    stamp = f"{path} {stat.st_size} {stat.st_mtime_ns}"
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(path) as zf:
            zf.extractall(tmp)
    except zipfile.BadZipFile as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetNotFoundError(f"{path} is not a readable zip of images ({_summary(e)}). To fix it, "
                                   f"{DATA_DIR_FIX} (a folder of images or a valid .zip of one).") from None
    except (OSError, EOFError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetNotFoundError(f"could not extract {path} to {dest} ({_summary(e)}). To fix it, check that the "
                                   f"zip is complete and the disk has room, or set $LEBM_ZOO_CACHE to another folder."
                                   ) from None
    (tmp / marker.name).write_text(stamp)
    if dest.exists():  # a stale extraction of an older zip with the same name
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (marker.is_file() and marker.read_text() == stamp):
            raise
    return dest


def _iter_images(root: Path) -> Iterator[Path]:
    """Image files below ``root`` (any depth), skipping hidden files and folders and ``__MACOSX``."""
    for p in root.rglob("*"):
        if p.suffix.lower() in IMG_EXTENSIONS and p.is_file() and \
                not any(s.startswith(".") or s == "__MACOSX" for s in p.relative_to(root).parts):
            yield p


def _open_rgb(path: str) -> Image.Image:
    """PIL loader (RGB) whose error names the file: a truncated or non-image file is a clear error."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetNotFoundError(f"{Path(path).resolve()} is not a readable image ({_summary(e)}). To fix it, "
                                   f"delete or replace that file.") from None


class _ImageFiles(Dataset):
    """Every image file below ``root`` (sorted paths), as ``(transform(RGB image), 0)``."""

    def __init__(self, root: Path, transform):
        self.files = sorted(_iter_images(root))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(_open_rgb(str(self.files[i]))), 0


def _normalize(channels: int) -> list:
    """ToTensor then Normalize(0.5, 0.5): uint8 0 -> -1.0, 255 -> 1.0."""
    return [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]


# ------------------------------------------------------------------------------------------------------------ base
class ImageDataModule(pl.LightningDataModule):
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
                                       f"in the expected format ({_summary(e)}); expected {self.expected}. To fix it, "
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
                raise self._not_found(f"download failed: {_summary(e)}") from None
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
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of ``val_set`` in order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of ``test_set`` in order."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Same as :meth:`test_dataloader`."""
        return self.test_dataloader()


# ------------------------------------------------------------------------------------------------------------ SVHN
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
        tf = transforms.Compose(_normalize(3))
        for split, filename in self.FILES.items():
            with self._reading(self.data_dir / filename):
                ds = _SVHN(str(self.data_dir), split=split, transform=tf, checksum=self.checksum)
                if ds.data.shape[1:] != (3, 32, 32) or np.size(ds.labels) != len(ds.data):
                    raise ValueError(f"X has shape {ds.data.shape[::-1]} (expected (32, 32, 3, N)) and y "
                                     f"{len(ds.labels)} labels")
            out.append(ds)
        return tuple(out)


# -------------------------------------------------------------------------------------------------------- CIFAR-10
def _find_dir_with(root: Path, names: tuple[str, ...]) -> Path | None:
    """``root`` or the shallowest folder below it (depth <= 2) that holds sub-folders ``names``, else None."""
    level = [root] if root.is_dir() else []
    for _ in range(3):
        for cand in level:
            if all((cand / n).is_dir() for n in names):
                return cand
        level = sorted(d for c in level for d in c.iterdir() if d.is_dir() and not d.name.startswith((".", "__MACOSX")))
    return None


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 32x32x3 (50,000 train, 10,000 test): torchvision's ``cifar-10-batches-py``, an image-folder tree, or
    a ``.zip`` of such a tree.

    ``data_dir`` may be (checked in this order):

    - a folder (or a folder up to two levels below it) with ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``
      (torchvision ``ImageFolder``; labels are the sorted class names' indices, which for CIFAR-10's ten class names
      is the canonical order airplane=0 ... truck=9), images resized and centre-cropped to 32 if needed;
    - a ``.zip`` of such a tree, extracted once by :func:`extract_zip` (the tree may sit in one top-level folder);
    - a folder with torchvision's ``cifar-10-batches-py/`` (downloaded there with ``download=True``).

    ``x`` is ``(B, 3, 32, 32)`` in [-1, 1], ``y`` the class 0..9.

    Args:
        data_dir: folder or ``.zip`` as above.
        download, batch_size, num_workers, val_size, seed: see :class:`ImageDataModule`.

    Attributes:
        img_size: 32. channels: 3.

    Raises:
        DatasetNotFoundError: nothing of the above in ``data_dir``, download failed, a zip that is not a zip, an md5
            mismatch of torchvision's files, or an unreadable image (names the file).
    """

    img_size, channels = 32, 3
    dataset_name = "CIFAR-10"
    expected = ("cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (torchvision's layout), or an "
                "image-folder tree train/<class>/*.jpg + test/<class>/*.jpg, or a .zip of that tree")
    downloadable = True

    def __init__(self, data_dir: str = "data/cifar10", download: bool = False, batch_size: int = 100,
                 num_workers: int = 2, val_size: int | float = 1000, seed: int = 1):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed)
        self.save_hyperparameters()

    def _tree(self) -> Path | None:
        """The folder holding ``train/`` and ``test/`` (extracting a zip first), or None."""
        if self.data_dir.is_file() and self.data_dir.suffix.lower() == ".zip":
            return _find_dir_with(extract_zip(self.data_dir), ("train", "test"))
        return _find_dir_with(self.data_dir, ("train", "test"))

    def _batches(self) -> Path:
        return self.data_dir / datasets.CIFAR10.base_folder

    def _present(self) -> bool:
        if self._tree() is not None:
            return True
        names = [f for f, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list]
        return all((self._batches() / f).is_file() for f in [*names, datasets.CIFAR10.meta["filename"]])

    def _fetch(self) -> None:
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise self._not_found("data_dir is a file, so torchvision cannot download into it")
        datasets.CIFAR10(str(self.data_dir), train=True, download=True)

    def _load(self):
        tree = self._tree()
        if tree is not None:
            tf = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), *_normalize(3)])
            out = []
            for split in ("train", "test"):
                with self._reading(tree / split):
                    out.append(datasets.ImageFolder(str(tree / split), transform=tf, loader=_open_rgb))
            return tuple(out)
        tf = transforms.Compose(_normalize(3))
        with self._reading(self._batches()):
            return (datasets.CIFAR10(str(self.data_dir), train=True, transform=tf),
                    datasets.CIFAR10(str(self.data_dir), train=False, transform=tf))


# ----------------------------------------------------------------------------------------------------------- MNIST
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
        tf = transforms.Compose([*pad, *_normalize(1)])
        out = []
        for train in (True, False):
            with self._reading(self._root() / "MNIST" / "raw" / ("train-*-ubyte" if train else "t10k-*-ubyte")):
                out.append(datasets.MNIST(str(self._root()), train=train, transform=tf))
        return tuple(out)


# ------------------------------------------------------------------------------------------- folders of images
class _FolderModule(ImageDataModule):
    """A folder (flat or nested) or ``.zip`` of images without splits, split into train/test by ``seed``."""

    expected = "image files (*.jpg, *.png, ...) in the folder or any folder below it, or a .zip of such a folder"

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
        return self.data_dir if self.data_dir.is_dir() else None

    def _transform(self):
        raise NotImplementedError

    def _present(self) -> bool:
        root = self._folder()
        return root is not None and next(_iter_images(root), None) is not None

    def _load(self):
        ds = _ImageFiles(self._folder(), self._transform())
        t = self.test_size
        n_test = max(1, round(t * len(ds))) if isinstance(t, float) and 0 < t < 1 else int(t)
        if n_test >= len(ds):
            raise ValueError(f"test_size={t} leaves no training images out of {len(ds)}")
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.seed)).tolist()
        return Subset(ds, perm[n_test:]), Subset(ds, perm[:n_test])


class _CelebACrop:
    """PIL image -> its centre square of side ``round(min(W, H) * 140 / 178)``.

    That is the standard 140-px crop of CelebA's aligned 178x218 images, scaled to the image's size (70 px of 89x109).
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        return transforms.functional.center_crop(img, round(min(img.size) * 140 / 178))

    def __repr__(self) -> str:
        return "CelebACrop(side=round(min(W, H) * 140 / 178))"


class _CelebA(datasets.CelebA):
    """torchvision CelebA that needs only ``img_align_celeba/`` and ``list_eval_partition.txt`` (no md5 check; the
    identity, bbox, landmark and attribute files are read when present, empty otherwise)."""

    def _check_integrity(self) -> bool:
        base = os.path.join(self.root, self.base_folder)
        return (os.path.isdir(os.path.join(base, "img_align_celeba"))
                and os.path.isfile(os.path.join(base, "list_eval_partition.txt")))

    def _load_csv(self, filename: str, header: int | None = None) -> CSV:
        if os.path.isfile(os.path.join(self.root, self.base_folder, filename)):
            return super()._load_csv(filename, header)
        index = super()._load_csv("list_eval_partition.txt").index
        return CSV([], index, torch.zeros(len(index), 0, dtype=torch.long))


class CelebA64DataModule(_FolderModule):
    """CelebA faces at 64x64x3.

    ``data_dir`` may be:

    - torchvision's layout, ``data_dir/celeba/img_align_celeba/*.jpg`` plus ``data_dir/celeba/list_eval_partition.txt``
      (read by torchvision ``CelebA``; the official train split, 162,770 images, and test split, 19,962);
    - otherwise a folder of face images (flat, e.g. ``celebA/000001.jpg``, or nested) or a ``.zip`` of one (extracted
      once by :func:`extract_zip`), split into train/test by ``seed`` with ``test_size``.

    Each image is centre-cropped to a square of side ``round(min(H, W) * 140/178)`` (the standard 140-px crop of the
    178x218 originals, scaled to the image's size) and resized to 64. ``x`` is ``(B, 3, 64, 64)`` in [-1, 1]; ``y`` is
    0 (no labels).

    Args:
        data_dir: folder or ``.zip`` as above.
        download: let torchvision download CelebA (Google Drive; needs the ``gdown`` package) when nothing is found.
        test_size: images (int) or fraction (float in (0, 1)) held out as the test split of a folder without
            official splits.
        batch_size, num_workers, val_size, seed: see :class:`ImageDataModule`.

    Attributes:
        img_size: 64. channels: 3.

    Raises:
        ValueError: for a negative ``test_size``/``val_size`` or sizes that leave no training images.
        DatasetNotFoundError: no images found, download failed, a zip that is not a zip, or an unreadable image.
    """

    img_size, channels = 64, 3
    dataset_name = "CelebA"
    expected = ("celeba/img_align_celeba/*.jpg + celeba/list_eval_partition.txt (torchvision's layout), or image "
                "files (*.jpg, *.png, ...) in the folder or below it, or a .zip of such a folder")
    downloadable = True

    def __init__(self, data_dir: str = "data/celeba", download: bool = False, batch_size: int = 100,
                 num_workers: int = 2, val_size: int | float = 1000, seed: int = 1, test_size: int | float = 0.1):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed, test_size)
        self.save_hyperparameters()

    def _transform(self):
        return transforms.Compose([_CelebACrop(), transforms.Resize(64), transforms.CenterCrop(64), *_normalize(3)])

    def _official(self) -> bool:
        base = self.data_dir / "celeba"
        return (base / "img_align_celeba").is_dir() and (base / "list_eval_partition.txt").is_file()

    def _present(self) -> bool:
        return self._official() or super()._present()

    def _fetch(self) -> None:
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise self._not_found("data_dir is a file, so torchvision cannot download into it")
        datasets.CelebA(str(self.data_dir), split="all", target_type=[], download=True)

    def _load(self):
        if not self._official():
            return super()._load()
        out = []
        for split in ("train", "test"):
            with self._reading(self.data_dir / "celeba" / "list_eval_partition.txt"):
                ds = _CelebA(str(self.data_dir), split=split, target_type=[], transform=self._transform())
            out.append(_ZeroLabels(ds))
        return tuple(out)


class _ZeroLabels(Dataset):
    """``(x, 0)`` for a dataset that yields images only (torchvision CelebA with ``target_type=[]``)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x = self.base[i]
        return (x[0] if isinstance(x, tuple) else x), 0


class ImageFolderDataModule(_FolderModule):
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
                                   *_normalize(self.channels)])


# ------------------------------------------------------------------------------------------------------ quickstart
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
