"""Sample grids: a PNG per validation epoch (and at test), also sent to the logger when it takes images."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytorch_lightning as pl
import torch
from torchvision.utils import make_grid, save_image

from lebm_zoo.callbacks._common import _epoch_stem, _log_image, _run_dir

__all__ = ["SampleGrid"]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Fork the CPU RNG (and ``device``'s CUDA RNG) and seed them with ``seed``; the states are restored on exit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.random.default_generator.manual_seed(seed)
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)  # only this device: other GPUs' RNG are neither forked nor touched
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


class SampleGrid(pl.Callback):
    """Save a grid of ``pl_module.sample(num_samples)`` after validation epochs and at test.

    Sampling runs under ``torch.random.fork_rng`` seeded with ``seed`` (the CPU RNG, and the CUDA RNG of the
    module's device when it is on CUDA): every grid starts from the same noise, so grids of successive epochs are
    comparable, and the training RNG stream is left exactly as it was. Only rank zero samples and writes (the model
    handles grad/eval mode in ``sample`` itself).

    The grid (``torchvision.utils.make_grid``, ``nrow`` images per row, 2-pixel padding, [-1, 1] mapped to [0, 1];
    grayscale becomes 3 identical channels) is saved as a PNG at ``<dirpath>/epoch=NNNN.png`` during fit
    (``epoch=NNNN-step=S.png`` for further validations within the same epoch) and ``<dirpath>/test.png`` at test,
    where ``dirpath`` defaults to ``<run folder>/samples``: the run's own folder, ``trainer.log_dir``
    (``lightning_logs/version_N/``) with a TensorBoard or CSV logger, ``<save_dir>/<name>/<version>/`` with another
    logger (W&B: ``<save_dir>/<project>/<run id>/``, beside the run's ``checkpoints/``), ``default_root_dir`` without
    a logger. It is also sent to the loggers that take images (see :func:`_log_image`): a ``TensorBoardLogger`` gets
    ``experiment.add_image(tag, grid, global_step)``, a ``WandbLogger`` the grid as an ``(H, W, 3)`` uint8 array
    with the PNG's pixels, another logger with a ``log_image`` method ``log_image(key=tag, images=[grid])``; others
    are ignored. Tags: ``val/samples`` and ``test/samples``.

    Args:
        num_samples: images in the grid.
        nrow: images per row.
        every_n_epochs: draw at the end of validation epochs where ``(epoch + 1) % every_n_epochs == 0`` (0: never
            during fit); never during the sanity check.
        seed: seed of the forked RNG the samples are drawn with.
        dirpath: folder of the PNGs (default ``<run folder>/samples``, as above).

    Attributes:
        last_path: the latest PNG written (None before the first).
        last_grid: the latest grid, ``(3, H, W)`` float in [0, 1] on the CPU.

    Raises:
        ValueError: for ``num_samples < 1`` or ``nrow < 1``.
    """

    def __init__(self, num_samples: int = 64, nrow: int = 8, every_n_epochs: int = 1, seed: int = 0,
                 dirpath: str | None = None):
        if num_samples < 1 or nrow < 1:
            raise ValueError(f"num_samples and nrow must be >= 1, got {num_samples} and {nrow}")
        self.num_samples = num_samples
        self.nrow = nrow
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.dirpath = dirpath
        self.last_path: Path | None = None
        self.last_grid: torch.Tensor | None = None
        self._used: set[str] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._used = set()

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stem: str, tag: str) -> Path | None:
        """Sample, save ``<folder>/<stem>.png`` and send the grid to the loggers. Call on every rank.

        Returns:
            the PNG path on rank zero, None on other ranks.
        """
        folder = Path(self.dirpath).expanduser() if self.dirpath else _run_dir(trainer) / "samples"  # collective
        if not trainer.is_global_zero:
            return None
        with _seeded(self.seed, pl_module.device):
            x = pl_module.sample(self.num_samples)
        grid = make_grid(x.detach().float().cpu(), nrow=self.nrow, normalize=True, value_range=(-1, 1))
        path = folder / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        self.last_path, self.last_grid = path, grid
        _log_image(trainer, tag, grid)
        return path

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0 or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.draw(trainer, pl_module, _epoch_stem(trainer, self._used), "val/samples")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer, pl_module, "test", "test/samples")
