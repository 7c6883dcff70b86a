"""Test reconstruction MSE, the LEBM papers' protocol (Pang et al. 2020, Table 2)."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torchmetrics import MeanSquaredError
from torchvision.utils import save_image

from lebm_zoo.utils import images_from_batch

__all__ = ["ReconstructionMSE"]


class ReconstructionMSE(pl.Callback):
    """Per-pixel mean squared error of ``pl_module.reconstruct(x)`` on held-out images.

    Protocol: each held-out image x is reconstructed as G(z) with z inferred by the model's posterior Langevin chain
    (``reconstruct``); the error is averaged over images, pixels and channels with both images mapped to [0, 1]
    (so a value of 0.01 is an RMS error of 0.1 on a [0, 1] scale). The paper reports 0.008 (SVHN), 0.020
    (CIFAR-10), 0.013 (CelebA-64) on this scale.

    Args:
        max_images: images per validation/test epoch (None: all of the split).

    Logs ``val/recon_mse`` and ``test/recon_mse`` (computed on every rank, synced by torchmetrics). Writes a PNG of
    the first batch (up to 32 originals above their reconstructions) to ``<log_dir>/reconstructions/``.
    """

    def __init__(self, max_images: int | None = 1000):
        self.max_images = max_images
        self.mse = MeanSquaredError()
        self._seen = 0
        self.last_path: Path | None = None

    def _start(self, pl_module):
        self.mse = self.mse.to(pl_module.device)
        self.mse.reset()
        self._seen = 0

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start(pl_module)

    def on_test_epoch_start(self, trainer, pl_module):
        self._start(pl_module)

    def _update(self, trainer, pl_module, batch, batch_idx, name):
        if trainer.sanity_checking or (self.max_images is not None and self._seen >= self.max_images):
            return
        x = images_from_batch(batch)
        if self.max_images is not None:
            x = x[: self.max_images - self._seen]
        x = x.to(pl_module.device)
        x_rec = pl_module.reconstruct(x)
        self.mse.update((x_rec.float() + 1) / 2, (x.float() + 1) / 2)
        self._seen += x.shape[0]
        if batch_idx == 0 and trainer.is_global_zero:
            k = min(32, x.shape[0])
            out = Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions" / f"{name}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            save_image(torch.cat([x[:k], x_rec[:k]]).float().cpu(), out, nrow=8, normalize=True,
                       value_range=(-1, 1))
            self.last_path = out

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(trainer, pl_module, batch, batch_idx, f"epoch={trainer.current_epoch:04d}-step={trainer.global_step}")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(trainer, pl_module, batch, batch_idx, "test")

    def _finish(self, trainer, pl_module, key):
        if trainer.sanity_checking or self._seen == 0:
            return
        pl_module.log(key, self.mse.compute(), sync_dist=False, rank_zero_only=True)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._finish(trainer, pl_module, "val/recon_mse")

    def on_test_epoch_end(self, trainer, pl_module):
        self._finish(trainer, pl_module, "test/recon_mse")
