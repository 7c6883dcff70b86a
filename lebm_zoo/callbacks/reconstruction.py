"""Reconstruction MSE on held-out images, the LEBM papers' protocol (Pang et al. 2020, Table 2)."""
from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torchmetrics import MeanSquaredError
from torchvision.utils import make_grid, save_image

from lebm_zoo.callbacks._common import _epoch_stem, _run_dir
from lebm_zoo.utils import images_from_batch

__all__ = ["ReconstructionMSE"]

GRID_IMAGES = 32  # originals (and as many reconstructions) in the PNG
GRID_NROW = 8


class ReconstructionMSE(pl.Callback):
    """Per-pixel mean squared error of ``pl_module.reconstruct(x)`` on held-out images.

    Protocol (Pang et al. 2020, Table 2): each held-out image x (the validation or test split) is reconstructed as
    G(z) with z inferred by the model's posterior Langevin chain (``reconstruct(x)``, x and the result in [-1, 1]); the
    squared error is averaged over images, pixels and channels with both images mapped to [0, 1] (reconstructions
    clamped to [0, 1] first), i.e. ``mean(((x_rec + 1) / 2 - (x + 1) / 2) ** 2)``. A value of 0.01 is an RMS error
    of 0.1 on the [0, 1] scale. The paper reports 0.008 (SVHN), 0.020 (CIFAR-10), 0.013 (CelebA-64) on this scale.

    Updated in ``on_validation_batch_end``/``on_test_batch_end`` with at most ``max_images`` images per epoch (under
    DDP ``ceil(max_images / world_size)`` per rank; first dataloader only), reset at epoch start, skipped during the
    sanity check. It is a
    torchmetrics ``MeanSquaredError``: computed at epoch end on every rank (states summed across ranks) and logged
    from every rank with the same value.

    Also writes a PNG of the first validation/test batch: up to 32 originals (top rows) above their reconstructions
    (bottom rows), 8 per row, to ``<run folder>/reconstructions/epoch=NNNN.png`` during fit
    (``epoch=NNNN-step=S.png`` for further validations in the same epoch) and ``.../reconstructions/test.png`` at
    test (the run folder: ``trainer.log_dir`` with a TensorBoard or CSV logger, ``<save_dir>/<name>/<version>`` with
    another logger such as W&B; see ``_run_dir``); only rank zero writes. ``self.last_path`` is the latest PNG.

    Args:
        max_images: images reconstructed per validation/test epoch (None: the whole split).

    Logs:
        ``val/recon_mse`` and ``test/recon_mse`` (lower is better).

    Raises:
        ValueError: for ``max_images < 1``, or when ``reconstruct`` returns a shape other than its input's.
    """

    def __init__(self, max_images: int | None = 1000):
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
        self.max_images = max_images
        self.mse = MeanSquaredError()
        self.last_path: Path | None = None
        self._seen = 0
        self._used: set[str] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._used = set()

    def _cap(self, trainer: pl.Trainer) -> int | None:
        return None if self.max_images is None else math.ceil(self.max_images / trainer.world_size)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.inference_mode(False):
            self.mse = self.mse.to(pl_module.device)
            self.mse.reset()
        self._seen = 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int,
                dataloader_idx: int, test: bool) -> None:
        if trainer.sanity_checking or dataloader_idx != 0:
            return
        first = batch_idx == 0
        png = None
        if first:  # trainer.log_dir broadcasts: every rank must ask
            stem = "test" if test else _epoch_stem(trainer, self._used)
            png = _run_dir(trainer) / "reconstructions" / f"{stem}.png"
        cap = self._cap(trainer)
        if cap is not None and self._seen >= cap:
            return
        x = images_from_batch(batch)
        if cap is not None:
            x = x[: cap - self._seen]
        x = x.to(pl_module.device)
        x_rec = pl_module.reconstruct(x)
        if x_rec.shape != x.shape:
            raise ValueError(f"pl_module.reconstruct returned shape {tuple(x_rec.shape)} for input {tuple(x.shape)}")
        with torch.inference_mode(False), torch.no_grad():
            self.mse.update(((x_rec.detach().float() + 1) / 2).clamp(0, 1), (x.float() + 1) / 2)
        self._seen += x.shape[0]
        if png is not None and trainer.is_global_zero:
            self._save_png(x, x_rec, png)

    def _save_png(self, x: torch.Tensor, x_rec: torch.Tensor, path: Path) -> None:
        k = min(GRID_IMAGES, x.shape[0])
        nrow = min(GRID_NROW, k)
        pad = (-k) % nrow  # blank (black) cells so reconstructions start on a fresh row

        def rows(t: torch.Tensor) -> torch.Tensor:
            t = t[:k].detach().float().cpu()
            return torch.cat([t, t.new_full((pad, *t.shape[1:]), -1.0)]) if pad else t

        grid = make_grid(torch.cat([rows(x), rows(x_rec)]), nrow=nrow, normalize=True, value_range=(-1, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        self.last_path = path

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, pl_module, batch, batch_idx, dataloader_idx, test=False)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, pl_module, batch, batch_idx, dataloader_idx, test=True)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, key: str) -> None:
        if trainer.sanity_checking:
            return
        if trainer.world_size == 1 and self._seen == 0:
            return
        with torch.inference_mode(False), torch.no_grad():
            value = self.mse.compute()  # every rank: syncs the sums under DDP
        if torch.isfinite(value):
            pl_module.log(key, value, sync_dist=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "val/recon_mse")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "test/recon_mse")
