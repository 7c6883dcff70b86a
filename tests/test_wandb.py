"""SampleGrid with a W&B logger (offline): the logged image has the PNG's pixels (W&B renders a float tensor in [0, 1]
as black), and every run writes its grids to its own folder, ``<save_dir>/<project>/<run id>/samples/``."""
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from _data import tiny_trainer
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lebm_zoo.callbacks import SampleGrid

wandb = pytest.importorskip("wandb", reason="wandb is in the dev extra: pip install -e '.[dev]'")
from pytorch_lightning.loggers import WandbLogger  # noqa: E402


class Bright(pl.LightningModule):
    """``sample(n)``: images in [0, 1] (the upper half of the [-1, 1] range), so the grid is far from black."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def sample(self, n):
        return torch.rand(n, 3, 16, 16, device=self.device)

    def training_step(self, batch, batch_idx):
        return ((self.w - 1) ** 2).sum() + 0 * batch[0].sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "wandb_cache"),
                     ("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_DATA_DIR", "wandb_data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    yield tmp_path
    wandb.finish()


def fit(root: Path) -> tuple[WandbLogger, SampleGrid, Path]:
    """A 2-step fit with a W&B logger and SampleGrid; returns the logger, the callback and the W&B run folder."""
    logger = WandbLogger(offline=True, save_dir=str(root))
    grid = SampleGrid(num_samples=8, nrow=4)
    data = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)
    trainer = tiny_trainer(root, [grid], logger=logger, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                           num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(Bright(), data, data)
    assert trainer.global_step == 2
    run_dir = Path(logger.experiment.dir).parent  # <save_dir>/wandb/offline-run-<date>-<id>
    wandb.finish()  # the next WandbLogger starts a new run instead of reusing this one
    return logger, grid, run_dir


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_logged_grid_is_the_png_not_black(offline):
    logger, grid, run_dir = fit(offline)
    media = sorted(run_dir.glob("files/media/images/**/*.png"))
    assert len(media) == 1, list(run_dir.rglob("*"))
    logged, png = pixels(media[0]), pixels(grid.last_path)
    assert logged.mean() > 60, f"the W&B image is (almost) black: mean pixel {logged.mean():.1f}"
    assert logged.shape == png.shape and np.array_equal(logged, png)
    # the PNG lies in the run's own folder, beside where ModelCheckpoint would put its checkpoints/
    assert grid.last_path == offline / logger.name / logger.version / "samples" / "epoch=0000.png"


def test_two_runs_in_the_same_root_keep_their_own_grids(offline):
    (first, a, _), (second, b, _) = fit(offline), fit(offline)
    assert first.version != second.version
    assert a.last_path != b.last_path and a.last_path.parent != b.last_path.parent
    assert a.last_path.is_file() and b.last_path.is_file()
    assert sorted(p.relative_to(offline) for p in offline.glob("*/*/samples/*.png")) == sorted(
        p.last_path.relative_to(offline) for p in (a, b))
