"""Pedestrian trajectories: ETH-UCY in the Social-GAN leave-one-scene-out splits (:class:`TrajectoryDataModule`) and
Stanford Drone in PECNet's pickle format (:class:`SDDDataModule`), as LB-EBM's reference (``bpucla/lbebm``) reads them.

Batches are windows of ``past_length + future_length`` consecutive rows of one pedestrian, ``(B, T, 2)`` float32
positions in the data's units (metres for ETH-UCY, pixels for SDD); SDD batches are ``(windows, mask)`` scene groups
with a ``(B, B)`` social mask. The models make the coordinates relative and scale them.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, TensorDataset

from datamodules.base import DatasetNotFoundError, summary
from datamodules.loaders import SplitLoadersMixin, make_loader

__all__ = ["ETH_UCY_SCENES", "ETH_ANNOTATION_STEP", "SDDDataModule", "TrajectoryDataModule", "read_scene_file",
           "read_sdd_pickle", "resample_tracks", "strided_windows"]

#: the five leave-one-scene-out splits of ETH-UCY
ETH_UCY_SCENES = ("eth", "hotel", "univ", "zara1", "zara2")


def read_scene_file(path: str | Path, delimiter: str = "\t") -> np.ndarray:
    """Rows ``(N, 4)`` float64 ``frame, ped, x, y`` of one Social-GAN text file.

    Raises:
        DatasetNotFoundError: naming the file, when it is unreadable or not four numeric columns.
    """
    path = Path(path)
    try:
        rows = np.loadtxt(path, delimiter=delimiter, dtype=np.float64, ndmin=2)
    except Exception as e:
        raise DatasetNotFoundError(f"{path.resolve()} is not a trajectory file ({summary(e)}): expected rows of "
                                   "'frame<TAB>ped<TAB>x<TAB>y'") from None
    if rows.shape[1] != 4 or not np.isfinite(rows).all():
        raise DatasetNotFoundError(f"{path.resolve()} is not a trajectory file: expected 4 finite numeric columns "
                                   f"'frame<TAB>ped<TAB>x<TAB>y', got {rows.shape[1]} columns")
    return rows


#: frames between two annotations of the ETH sequence (``seq_eth``, filmed at 15 fps and annotated every 0.4 s, the
#: time between the other scenes' rows); Social-GAN's ``biwi_eth*.txt`` files hold a row every 10 frames, about
#: 0.67 s (``docs/results.md``). The annotated frames are the multiples of 6 (780, 786, ...).
ETH_ANNOTATION_STEP = 6


def resample_tracks(rows: np.ndarray, step: float, origin: float = 0.0, spacing: float | None = None) -> np.ndarray:
    """Each pedestrian's track re-sampled onto the frames ``origin + k * step`` by linear interpolation, ``(M, 4)``
    float64 ``frame, ped, x, y`` sorted by frame then pedestrian.

    A track is interpolated only between rows at most ``spacing`` frames apart: across a longer gap (the pedestrian
    left and came back) no row is made. A stretch that holds no grid frame gives none.

    Args:
        rows: ``(N, 4)`` rows of one Social-GAN file (:func:`read_scene_file`).
        step: frames between two new rows (finite, > 0; e.g. :data:`ETH_ANNOTATION_STEP`).
        origin: a frame of the new grid.
        spacing: the largest gap, in frames, between two rows of one pedestrian that is interpolated across; None
            (the default): the most common gap between two consecutive rows of one pedestrian in ``rows``.

    Raises:
        ValueError: ``step`` or ``spacing`` is not a finite number > 0, or a pedestrian has two rows at one frame.
    """
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"step must be a finite number of frames > 0, got {step}")
    tracks = []
    for p in np.unique(rows[:, 1]):
        t = rows[rows[:, 1] == p]
        t = t[np.argsort(t[:, 0], kind="stable")]
        same = np.flatnonzero(np.diff(t[:, 0]) == 0)
        if len(same):
            raise ValueError(f"pedestrian {p:g} has two rows at frame {t[same[0], 0]:g}: a track holds one row per "
                             "frame")
        tracks.append(t)
    if spacing is None:
        gaps = np.concatenate([np.diff(t[:, 0]) for t in tracks]) if tracks else np.zeros(0)
        values, counts = np.unique(gaps, return_counts=True)
        spacing = float(values[np.argmax(counts)]) if len(values) else 0.0  # no gap at all: lone rows only
    elif not (np.isfinite(spacing) and spacing > 0):
        raise ValueError(f"spacing must be a finite number of frames > 0, got {spacing}")
    out = []
    for t in tracks:
        for part in np.split(t, np.flatnonzero(np.diff(t[:, 0]) > spacing + 1e-9) + 1):
            lo, hi = np.ceil((part[0, 0] - origin) / step - 1e-9), np.floor((part[-1, 0] - origin) / step + 1e-9)
            frames = origin + step * np.arange(lo, hi + 1)
            if len(frames):
                xy = [np.interp(frames, part[:, 0], part[:, c]) for c in (2, 3)]
                out.append(np.stack([frames, np.full_like(frames, part[0, 1]), *xy], 1))
    if not out:
        return np.zeros((0, 4))
    r = np.concatenate(out)
    return r[np.lexsort((r[:, 1], r[:, 0]))]


#: the rotation angles of the reference's augmentation (``utils.get_strided_data_clust(rotate=...)``), in radians
ROTATION_ANGLES = (0.0, 0.25 * np.pi, 0.5 * np.pi, -0.25 * np.pi, -0.5 * np.pi)


def strided_windows(rows: np.ndarray, length: int = 20, rotate: bool = False) -> np.ndarray:
    """Every window of ``length`` consecutive rows of each pedestrian, ``(W, length, 2)`` float32 ``(x, y)``.

    As the reference (``utils.get_strided_data_clust``, stride 1): rows sorted by frame then pedestrian,
    pedestrians in the order they first appear, each one's rows in frame order, windows starting at each of its rows
    (a pedestrian with fewer than ``length`` rows gives none). Positions are rounded to float32 first, as there.

    ``rotate``: also the windows turned about the origin by each of :data:`ROTATION_ANGLES` (0, 45, 90, -45 and -90
    degrees), ``(5 W, length, 2)``, one block of W per angle in that order, each ``xy @ R(angle)`` in float64 with
    ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` and rounded to float32, as the reference's ``rotate`` option.
    """
    if rows.size == 0:
        return np.zeros((0, length, 2), np.float32)
    rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
    peds, first = np.unique(rows[:, 1], return_index=True)
    out = []
    for p in peds[np.argsort(first)]:
        xy = rows[rows[:, 1] == p, 2:4].astype(np.float32)
        if len(xy) >= length:
            out.append(np.lib.stride_tricks.sliding_window_view(xy, (length, 2))[:, 0])
    if not out:
        return np.zeros((0, length, 2), np.float32)
    w = np.concatenate(out)
    if not rotate:
        return w.copy()
    turns = [np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) for a in ROTATION_ANGLES]
    return np.concatenate([np.matmul(w, r).astype(np.float32) for r in turns])


class TrajectoryDataModule(SplitLoadersMixin, pl.LightningDataModule):
    """One ETH-UCY scene's leave-one-out split: train and validation windows from the other scenes' ``train/`` and
    ``val/`` files, test windows from the held-out scene's ``test/`` files (``<data_dir>/<scene>/{train,val,test}/
    *.txt``, rows ``frame<TAB>ped<TAB>x<TAB>y`` in metres, one row per pedestrian every 10 frames: 0.4 s, except in
    the ``biwi_eth*`` files, where 10 frames are about 0.67 s; see ``eth_at_annotation_rate``).

    Batches are ``(B, past_length + future_length, 2)`` float32 windows (:func:`strided_windows`); training batches
    are shuffled (batch 70, the reference's), evaluation batches of ``eval_batch_size`` are in file order.

    Args:
        data_dir: the folder holding the five scene folders (e.g. ``data/eth_ucy``).
        scene: ``eth``, ``hotel``, ``univ``, ``zara1`` or ``zara2``.
        batch_size: training windows per batch (>= 1).
        eval_batch_size: validation and test windows per batch (the reference: 10 x batch_size).
        past_length, future_length: observed and predicted steps (8 and 12).
        num_workers: DataLoader workers (0 is best for in-memory tensors).
        seed: seed of the training shuffle; None (the default): the run's global seed (``torch.initial_seed()``, which
            ``seed_everything`` sets), so that each training seed also draws its own data order, as in the reference.
        rotate: add to the training windows their copies turned by 45, 90, -45 and -90 degrees (5 x the windows;
            :func:`strided_windows`), the reference loader's ``rotate`` option, which its scripts as published do not
            pass (default False). Validation and test windows are never turned. ``docs/fidelity.md`` and
            ``docs/results.md`` say what it changes.
        eth_at_annotation_rate: re-sample every ``biwi_eth*.txt`` file (eth's test file; the other scenes' training and
            validation copies) onto the ETH sequence's own annotation frames, every :data:`ETH_ANNOTATION_STEP`
            frames, one row per 0.4 s as in the other scenes (:func:`resample_tracks`). Social-GAN's files, which the
            reference reads as they are, space ETH's rows about 0.67 s apart (default False: as the reference). A
            deviation: ``docs/fidelity.md``; ``docs/results.md`` says what it changes.

    Attributes:
        train_set, val_set, test_set: ``TensorDataset``s of windows after ``setup``.

    Raises:
        ValueError: an unknown scene or a non-positive size; in ``prepare_data`` / ``setup``, with
            ``eth_at_annotation_rate``, splits without a ``biwi_eth*.txt`` file.
        DatasetNotFoundError: in ``prepare_data`` / ``setup``, a missing split folder, a folder without ``.txt``
            files, an unreadable file, a split without a single window, or, with ``eth_at_annotation_rate``, an ETH
            file with two rows of one pedestrian at one frame.
    """

    def __init__(self, data_dir: str, scene: str = "eth", batch_size: int = 70, eval_batch_size: int = 700,
                 past_length: int = 8, future_length: int = 12, num_workers: int = 0, seed: int | None = None,
                 rotate: bool = False, eth_at_annotation_rate: bool = False):
        super().__init__()
        if scene not in ETH_UCY_SCENES:
            raise ValueError(f"scene must be one of {', '.join(ETH_UCY_SCENES)}, got {scene!r}")
        if min(batch_size, eval_batch_size, past_length, future_length) < 1:
            raise ValueError("batch_size, eval_batch_size, past_length and future_length must be >= 1")
        self.data_dir = Path(data_dir).expanduser()
        self.scene, self.batch_size, self.eval_batch_size = scene, batch_size, eval_batch_size
        self.past_length, self.future_length = past_length, future_length
        self.num_workers, self.seed, self.rotate = num_workers, seed, bool(rotate)
        self.eth_at_annotation_rate = bool(eth_at_annotation_rate)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def split_files(self, split: str) -> list[Path]:
        """The ``.txt`` files of one split, sorted by name.

        Raises:
            DatasetNotFoundError: the folder is missing or holds no ``.txt`` file.
        """
        folder = self.data_dir / self.scene / split
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if not files:
            raise DatasetNotFoundError(f"ETH-UCY scene {self.scene!r}: no .txt files in {folder.resolve()} (expected "
                                       f"<data_dir>/{self.scene}/{{train,val,test}}/*.txt, Social-GAN's splits). To "
                                       "fix it, pass --data.data_dir PATH pointing at the folder of the five scenes.")
        return files

    def windows(self, split: str) -> torch.Tensor:
        """All windows of one split ``(W, T, 2)`` float32, files in name order (``train`` with ``rotate``: each
        file's windows and their turned copies)."""
        length = self.past_length + self.future_length
        rotate = self.rotate and split == "train"
        parts = [strided_windows(self.read(f), length, rotate) for f in self.split_files(split)]
        w = np.concatenate(parts)
        if len(w) == 0:
            raise DatasetNotFoundError(f"ETH-UCY scene {self.scene!r}, split {split}: no pedestrian has {length} rows "
                                       f"in {(self.data_dir / self.scene / split).resolve()}")
        return torch.from_numpy(w)

    def read(self, path: Path) -> np.ndarray:
        """One file's rows (:func:`read_scene_file`), re-sampled when ``eth_at_annotation_rate`` asks for it."""
        rows = read_scene_file(path)
        if self.eth_at_annotation_rate and path.name.startswith("biwi_eth"):
            try:
                rows = resample_tracks(rows, ETH_ANNOTATION_STEP)
            except ValueError as e:
                raise DatasetNotFoundError(f"{path.resolve()} cannot be re-sampled ({e})") from None
        return rows

    def prepare_data(self) -> None:
        for split in ("train", "val", "test"):
            self.split_files(split)
        self._check_eth_files()

    def _check_eth_files(self) -> None:
        """With ``eth_at_annotation_rate``, at least one ``biwi_eth*.txt`` file must be in the splits."""
        if self.eth_at_annotation_rate and not any(f.name.startswith("biwi_eth") for split in ("train", "val", "test")
                                                   for f in self.split_files(split)):
            raise ValueError(f"eth_at_annotation_rate is on, but no split of {(self.data_dir / self.scene).resolve()} "
                             "holds a biwi_eth*.txt file (the ETH files it re-samples): turn it off for these data")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._check_eth_files()
        self.train_set = TensorDataset(self.windows("train"))
        self.val_set = TensorDataset(self.windows("val"))
        self.test_set = TensorDataset(self.windows("test"))

    def _loader(self, ds, train: bool):
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        g = _shuffle_generator(self.seed) if train else None
        return make_loader(ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                           generator=g, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                           collate_fn=_windows_only)


def _shuffle_generator(seed: int | None) -> torch.Generator:
    """The training shuffle's generator: seeded with ``seed``, or with the global seed when it is None."""
    return torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)


def _windows_only(items) -> torch.Tensor:
    return torch.stack([it[0] for it in items])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles lists, tuples, dicts, numbers and numpy arrays only: any other global is refused, so a data file
    cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("builtins", "bytearray")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name} (only numpy arrays are allowed)")


def read_sdd_pickle(path: str | Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """PECNet's Stanford Drone pickle ``(trajectories, masks)``: per scene group an array ``(n, 20, 4)`` of ``frame,
    ped, x, y`` (pixels) and a ``(n, n)`` social mask. Loaded with an unpickler that only builds numpy arrays and
    builtin containers.

    Returns:
        ``(windows, masks)``: lists of ``(n, 20, 2)`` float64 positions and ``(n, n)`` float64 masks.

    Raises:
        DatasetNotFoundError: a missing or unreadable file, a refused object, or another layout.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(f"Stanford Drone pickle not found: {path.resolve()} (PECNet's "
                                   "train_all_512_0_100.pickle / test_all_4096_0_100.pickle). To fix it, pass "
                                   "--data.train_file / --data.test_file PATH.")
    try:
        data = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
        traj, masks = data
        windows = [np.asarray(t, dtype=np.float64)[:, :, 2:4] for t in traj]
        masks = [np.asarray(m, dtype=np.float64) for m in masks]
    except Exception as e:
        raise DatasetNotFoundError(f"{path.resolve()} is not a PECNet Stanford Drone pickle ({summary(e)}): expected "
                                   "a pair (list of (n, 20, 4) frame/ped/x/y arrays, list of (n, n) masks)") from None
    if len(windows) != len(masks) or not windows or any(
            w.ndim != 3 or w.shape[2] != 2 or m.shape != (len(w), len(w)) for w, m in zip(windows, masks)):
        raise DatasetNotFoundError(f"{path.resolve()} is not a PECNet Stanford Drone pickle: expected as many (n, n) "
                                   "masks as (n, T, 4) trajectory groups")
    return windows, masks


class _Groups(Dataset):
    def __init__(self, windows, masks):
        self.windows = [torch.from_numpy(w.astype(np.float32)) for w in windows]
        self.masks = [torch.from_numpy(m.astype(np.float32)) for m in masks]

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return self.windows[i], self.masks[i]


class SDDDataModule(SplitLoadersMixin, pl.LightningDataModule):
    """Stanford Drone in PECNet's pickles, as LB-EBM's ``lbebm_sdd.py`` reads them: each batch is one scene group
    ``(windows (n, 20, 2) pixels, mask (n, n))``; training groups are doubled with their time-reversed copies (the
    reference's augmentation). There is no validation split in the reference: validation uses the test file, so
    select nothing on it.

    The pickles themselves could not be had here: this module is tested on files the tests write in their format.

    Args:
        train_file, test_file: the two pickles (``train_all_512_0_100.pickle``, ``test_all_4096_0_100.pickle``).
        num_workers: DataLoader workers.
        seed: seed of the order of the training groups; None (the default): the run's global seed
            (``torch.initial_seed()``, which ``seed_everything`` sets).

    Raises:
        DatasetNotFoundError: in ``setup``, see :func:`read_sdd_pickle`.
    """

    def __init__(self, train_file: str, test_file: str, num_workers: int = 0, seed: int | None = None):
        super().__init__()
        self.train_file, self.test_file = Path(train_file).expanduser(), Path(test_file).expanduser()
        self.num_workers, self.seed = num_workers, seed
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        windows, masks = read_sdd_pickle(self.train_file)
        aug_w, aug_m = [], []
        for w, m in zip(windows, masks):
            aug_w += [w, np.flip(w, axis=1).copy()]
            aug_m += [m, m]
        self.train_set = _Groups(aug_w, aug_m)
        self.test_set = self.val_set = _Groups(*read_sdd_pickle(self.test_file))

    def _loader(self, ds, train: bool):
        g = _shuffle_generator(self.seed) if train else None
        return make_loader(ds, batch_size=None, shuffle=train, generator=g, num_workers=self.num_workers,
                           persistent_workers=self.num_workers > 0)
