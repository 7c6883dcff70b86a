"""CIFAR-10 32x32x3 (torchvision's batches, an image-folder tree or a ``.zip`` of one): :class:`CIFAR10DataModule`."""
from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from datamodules.base import ImageDataModule, normalize
from datamodules.files import extract_zip, lone_zip, open_rgb

__all__ = ["CIFAR10DataModule"]


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
    - a ``.zip`` of such a tree, extracted once by :func:`extract_zip` (the tree may sit in one top-level folder),
      or a folder holding one such ``.zip`` and nothing of the other layouts;
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
                "image-folder tree train/<class>/*.jpg + test/<class>/*.jpg, or a .zip of that tree (or a folder "
                "holding one such .zip)")
    downloadable = True

    def __init__(self, data_dir: str = "data/cifar10", download: bool = False, batch_size: int = 100,
                 num_workers: int = 2, val_size: int | float = 1000, seed: int = 1):
        super().__init__(data_dir, download, batch_size, num_workers, val_size, seed)
        self.save_hyperparameters()

    def _tree(self) -> Path | None:
        """The folder holding ``train/`` and ``test/`` (extracting a zip first), or None."""
        if self.data_dir.is_file() and self.data_dir.suffix.lower() == ".zip":
            return _find_dir_with(extract_zip(self.data_dir), ("train", "test"))
        tree = _find_dir_with(self.data_dir, ("train", "test"))
        if tree is None and not self._batches().is_dir() and (zipped := lone_zip(self.data_dir)) is not None:
            return _find_dir_with(extract_zip(zipped), ("train", "test"))  # a folder holding the downloaded zip
        return tree

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
            tf = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), *normalize(3)])
            out = []
            for split in ("train", "test"):
                with self._reading(tree / split):
                    out.append(datasets.ImageFolder(str(tree / split), transform=tf, loader=open_rgb))
            return tuple(out)
        tf = transforms.Compose(normalize(3))
        with self._reading(self._batches()):
            return (datasets.CIFAR10(str(self.data_dir), train=True, transform=tf),
                    datasets.CIFAR10(str(self.data_dir), train=False, transform=tf))
