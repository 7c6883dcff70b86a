"""FID on the papers' protocol: torchmetrics ``FrechetInceptionDistance`` with the TF-Inception pool3 weights."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from lebm_zoo.utils import images_from_batch, to_uint8

__all__ = ["FIDCallback", "default_fid_weights", "FIDWeightsNotFoundError"]

_WEIGHTS_NAME = "weights-inception-2015-12-05-pool3-only.pth"


class FIDWeightsNotFoundError(FileNotFoundError):
    """The FID Inception weights are not on disk (and cannot be downloaded offline)."""


def default_fid_weights(weights_path: str | None = None) -> Path:
    """Resolve the FID Inception weights: ``weights_path``, else ``$LEBM_ZOO_FID_WEIGHTS``, else
    ``~/.cache/lebm_zoo/weights-inception-2015-12-05-pool3-only.pth``.

    Raises:
        FIDWeightsNotFoundError: if the resolved file does not exist, saying how to build it offline.
    """
    path = Path(weights_path or os.environ.get("LEBM_ZOO_FID_WEIGHTS")
                or Path.home() / ".cache" / "lebm_zoo" / _WEIGHTS_NAME).expanduser()
    if not path.is_file():
        raise FIDWeightsNotFoundError(
            f"FID Inception weights not found at {path}. torchmetrics would download them from GitHub, which is not "
            "possible offline. Build them with `python ../shared/tools/fid_inception_weights.py` (or `make "
            "fid-weights`), or use any copy of the standard pt_inception-2015-12-05 weights, then pass "
            "weights_path=... to FIDCallback (--trainer.callbacks ... weights_path) or set LEBM_ZOO_FID_WEIGHTS.")
    return path


class FIDCallback(pl.Callback):
    """Frechet Inception Distance between model samples and real images (Heusel et al., 2017).

    Protocol: 2048-d pool3 features of the TF Inception graph (2015-12-05) as in TTUR's ``fid.py`` and the LEBM
    reference's ``fid_v2_tf_cpu.py``; uint8 input, bilinear resize to 299 without antialiasing (``antialias=False``,
    matching the TF-era numbers); grayscale images repeated to 3 channels. Samples come from ``pl_module.sample(n)``
    (images in [-1, 1]); real images from the datamodule's ``real_split`` loader.

    The real-data statistics are computed once and cached on disk (``cache_dir``), keyed by everything they depend on;
    only the generated images are re-featurised at each evaluation. Under DDP every rank featurises its shard of the
    real and generated images and the metric syncs its sums across ranks; it is computed on every rank and logged on
    rank zero.

    Args:
        num_samples: generated images per evaluation (split across ranks).
        num_real: real images (default: ``num_samples``; -1: the whole split).
        real_split: ``"train"``, ``"val"`` or ``"test"``: the datamodule loader that supplies real images.
        every_n_epochs: evaluate after validation every n epochs (0: never during fit; never in the sanity check).
        on_test: evaluate at the end of ``test``.
        batch_size: images per ``sample`` call and per feature batch.
        weights_path: FID Inception weights (see :func:`default_fid_weights`).
        feature: a custom feature extractor (``nn.Module`` taking uint8 ``(B, 3, H, W)``, with ``num_features``)
            instead of Inception, for research or tests.
        cache_dir: folder of cached real statistics (default ``$LEBM_ZOO_CACHE/fid_stats`` or
            ``~/.cache/lebm_zoo/fid_stats``).

    Logs ``val/fid`` during fit and ``test/fid`` at test (lower is better).

    Raises:
        FIDWeightsNotFoundError: at setup, when no weights file is found and no ``feature`` is given.
        ValueError: for an unknown ``real_split``.
    """

    def __init__(self, num_samples: int = 1000, num_real: int | None = None, real_split: str = "test",
                 every_n_epochs: int = 1, on_test: bool = True, batch_size: int = 100, weights_path: str | None = None,
                 feature: nn.Module | None = None, cache_dir: str | None = None):
        if real_split not in ("train", "val", "test"):
            raise ValueError(f"real_split must be 'train', 'val' or 'test', got {real_split!r}")
        self.num_samples = num_samples
        self.num_real = num_samples if num_real is None else num_real
        self.real_split = real_split
        self.every_n_epochs = every_n_epochs
        self.on_test = on_test
        self.batch_size = batch_size
        self.weights_path = weights_path
        self.feature = feature
        self.cache_dir = Path(cache_dir) if cache_dir else \
            Path(os.environ.get("LEBM_ZOO_CACHE") or Path.home() / ".cache" / "lebm_zoo") / "fid_stats"
        self.metric = None
        self.last_value: float | None = None
        self.real_stats_from_cache = False

    # ------------------------------------------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if self.metric is not None:
            return
        if self.feature is not None:
            self._weights_id = f"{type(self.feature).__module__}.{type(self.feature).__qualname__}"
            self.metric = FrechetInceptionDistance(feature=self.feature, reset_real_features=False)
        else:
            path = default_fid_weights(self.weights_path)
            st = path.stat()
            self._weights_id = f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
            self.metric = FrechetInceptionDistance(feature=2048, reset_real_features=False, normalize=False,
                                                   antialias=False, feature_extractor_weights_path=str(path))
        self.metric.sync_on_compute = trainer.world_size > 1

    def _cache_file(self, trainer: pl.Trainer) -> Path:
        dm = trainer.datamodule
        key = "|".join(str(v) for v in (
            type(dm).__module__, type(dm).__qualname__, getattr(dm, "data_dir", ""), self.real_split, self.num_real,
            getattr(dm, "img_size", ""), getattr(dm, "channels", ""), getattr(dm, "val_size", ""),
            getattr(dm, "seed", ""), self._weights_id, trainer.world_size, trainer.global_rank))
        return self.cache_dir / f"{type(dm).__name__}-{self.real_split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def _loader(self, trainer: pl.Trainer):
        dm = trainer.datamodule
        if dm is None:
            raise RuntimeError("FIDCallback needs a LightningDataModule (trainer.datamodule) for its real images")
        return {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[self.real_split]()

    @staticmethod
    def _rgb_uint8(x: torch.Tensor) -> torch.Tensor:
        x = to_uint8(x)  # (B, C, H, W) uint8
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def _real_stats(self, trainer: pl.Trainer, device: torch.device) -> None:
        m = self.metric
        if int(m.real_features_num_samples) > 0:
            return
        path = self._cache_file(trainer)
        names = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
        if path.is_file():
            stats = torch.load(path, map_location=device, weights_only=True)
            for n in names:
                setattr(m, n, stats[n].to(device))
            self.real_stats_from_cache = True
            return
        rank, world = trainer.global_rank, trainer.world_size
        target = None if self.num_real < 0 else self.num_real
        seen, batches = 0, 0
        bar = tqdm(total=target, desc="FID real statistics", disable=not trainer.is_global_zero, leave=False)
        for i, batch in enumerate(self._loader(trainer)):
            if target is not None and seen >= target:
                break
            x = images_from_batch(batch)
            if target is not None:
                x = x[: target - seen]
            seen += x.shape[0]
            bar.update(x.shape[0])
            if i % world == rank:  # this rank's shard
                m.update(self._rgb_uint8(x.to(device)), real=True)
                batches += 1
        bar.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({n: getattr(m, n).cpu() for n in names}, path)
        self.real_stats_from_cache = False

    # ----------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def compute_fid(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Sample ``num_samples`` images, featurise them and return the FID (every rank takes part)."""
        device = pl_module.device
        m = self.metric.to(device)
        self._real_stats(trainer, device)
        m.reset()  # fake statistics only (reset_real_features=False)
        per_rank = max(self.num_samples // trainer.world_size, 2)
        bar = tqdm(total=per_rank, desc="FID samples", disable=not trainer.is_global_zero, leave=False)
        done = 0
        while done < per_rank:
            n = min(self.batch_size, per_rank - done)
            x = pl_module.sample(n)
            m.update(self._rgb_uint8(x), real=False)
            done += n
            bar.update(n)
        bar.close()
        value = float(m.compute())
        self.last_value = value
        return value

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        pl_module.log("val/fid", self.compute_fid(trainer, pl_module), rank_zero_only=True)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_test:
            pl_module.log("test/fid", self.compute_fid(trainer, pl_module), rank_zero_only=True)
