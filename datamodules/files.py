"""Image files on disk: the zip cache (:func:`extract_zip`) and the reading of folders of images (:func:`iter_images`,
:func:`open_rgb`, :class:`ImageFiles`). Unreadable zips and images raise
:class:`~datamodules.base.DatasetNotFoundError` naming the file."""
from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import DATA_DIR_FIX, DatasetNotFoundError, summary

__all__ = ["IMG_EXTENSIONS", "ImageFiles", "extract_zip", "iter_images", "lone_zip", "open_rgb"]


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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
        raise DatasetNotFoundError(f"{path} is not a readable zip of images ({summary(e)}). To fix it, "
                                   f"{DATA_DIR_FIX} (a folder of images or a valid .zip of one).") from None
    except (OSError, EOFError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetNotFoundError(f"could not extract {path} to {dest} ({summary(e)}). To fix it, check that the "
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


def lone_zip(folder: Path) -> Path | None:
    """The one ``.zip`` file directly in ``folder`` (what a user who downloaded a zipped data set holds), or None
    when the folder holds none or several, or is not a folder."""
    if not folder.is_dir():
        return None
    zips = [p for p in folder.iterdir() if p.suffix.lower() == ".zip" and p.is_file() and not p.name.startswith(".")]
    return zips[0] if len(zips) == 1 else None


def iter_images(root: Path) -> Iterator[Path]:
    """Image files below ``root`` (any depth), skipping hidden files and folders and ``__MACOSX``."""
    for p in root.rglob("*"):
        if p.suffix.lower() in IMG_EXTENSIONS and p.is_file() and \
                not any(s.startswith(".") or s == "__MACOSX" for s in p.relative_to(root).parts):
            yield p


def open_rgb(path: str) -> Image.Image:
    """PIL loader (RGB) whose error names the file: a truncated or non-image file is a clear error."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetNotFoundError(f"{Path(path).resolve()} is not a readable image ({summary(e)}). To fix it, "
                                   f"delete or replace that file.") from None


class ImageFiles(Dataset):
    """Every image file below ``root`` (sorted paths), as ``(transform(RGB image), 0)``."""

    def __init__(self, root: Path, transform):
        self.files = sorted(iter_images(root))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(open_rgb(str(self.files[i]))), 0
