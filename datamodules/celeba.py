"""CelebA faces at 64x64x3 (torchvision's layout, or a folder or ``.zip`` of faces): :class:`CelebA64DataModule`."""
from __future__ import annotations

import os

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.celeba import CSV

from datamodules.base import normalize
from datamodules.image_folder import FolderDataModule

__all__ = ["CelebA64DataModule"]


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


class CelebA64DataModule(FolderDataModule):
    """CelebA faces at 64x64x3.

    ``data_dir`` may be:

    - torchvision's layout, ``data_dir/celeba/img_align_celeba/*.jpg`` plus ``data_dir/celeba/list_eval_partition.txt``
      (read by torchvision ``CelebA``; the official train split, 162,770 images, and test split, 19,962);
    - otherwise a folder of face images (flat, e.g. ``celebA/000001.jpg``, or nested) or a ``.zip`` of one (extracted
      once by :func:`extract_zip`; also a folder holding only that ``.zip``), split into train/test by ``seed`` with
      ``test_size``.

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
                "files (*.jpg, *.png, ...) in the folder or below it, or a .zip of such a folder (or a folder "
                "holding one such .zip)")
    downloadable = True

    def __init__(self, data_dir: str = "data/celeba", download: bool = False, batch_size: int = 100,
                 num_workers: int = 2, val_size: int | float = 1000, seed: int = 1, test_size: int | float = 0.1):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed, test_size)
        self.save_hyperparameters()

    def _transform(self):
        return transforms.Compose([_CelebACrop(), transforms.Resize(64), transforms.CenterCrop(64), *normalize(3)])

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
