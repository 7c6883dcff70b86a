"""Sample grids: a PNG per validation epoch (and at test), also sent to the logger when it takes images."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torchvision.utils import make_grid, save_image

__all__ = ["SampleGrid"]


class SampleGrid(pl.Callback):
    """Save a grid of ``pl_module.sample(num_samples)`` (images in [-1, 1]) after each validation epoch and at test.

    Samples are drawn under a forked RNG seeded with ``seed``: grids of successive epochs start from the same noise
    (so they are comparable) and training's RNG stream is untouched. Only rank zero samples and writes.

    Args:
        num_samples: images in the grid.
        nrow: images per row.
        every_n_epochs: draw every n validation epochs (never in the sanity check).
        seed: RNG seed of the chains' noise.
        dirpath: folder of the PNGs (default ``<trainer.log_dir>/samples``).

    Files: ``epoch=NNNN-step=S.png`` during fit, ``test.png`` at test; ``self.last_path`` is the latest.
    A TensorBoard logger gets the grid as image ``samples``; a logger with ``log_image`` (W&B) gets it too.
    """

    def __init__(self, num_samples: int = 64, nrow: int = 8, every_n_epochs: int = 1, seed: int = 0,
                 dirpath: str | None = None):
        self.num_samples, self.nrow, self.every_n_epochs, self.seed = num_samples, nrow, every_n_epochs, seed
        self.dirpath = dirpath
        self.last_path: Path | None = None

    @torch.no_grad()
    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            x = pl_module.sample(self.num_samples).float().cpu()
        grid = make_grid(x, nrow=self.nrow, normalize=True, value_range=(-1, 1))
        out = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "samples") / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
        self.last_path = out
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):  # TensorBoard
                exp.add_image("samples", grid, trainer.global_step)
            elif hasattr(logger, "log_image"):  # Weights & Biases and similar
                logger.log_image(key="samples", images=[grid], step=trainer.global_step)
        return out

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.every_n_epochs <= 0 or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.draw(trainer, pl_module, f"epoch={trainer.current_epoch:04d}-step={trainer.global_step}")

    def on_test_epoch_end(self, trainer, pl_module):
        self.draw(trainer, pl_module, "test")
