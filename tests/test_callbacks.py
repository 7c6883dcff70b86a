"""Metric callbacks: FID (against torchmetrics directly, cached real statistics), reconstruction MSE, sample grids."""
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lebm_zoo.callbacks import FIDCallback, FIDWeightsNotFoundError, ReconstructionMSE, SampleGrid
from lebm_zoo.utils import to_uint8

WEIGHTS = Path.home() / ".cache" / "lebm_zoo" / "weights-inception-2015-12-05-pool3-only.pth"


class Data(pl.LightningDataModule):
    def __init__(self, x, batch_size=8):
        super().__init__()
        self.x, self.batch_size = x, batch_size
        self.channels, self.img_size = x.shape[1], x.shape[2]
        self.loads = 0

    def _dl(self):
        self.loads += 1
        return DataLoader(TensorDataset(self.x, torch.zeros(len(self.x))), batch_size=self.batch_size)

    train_dataloader = val_dataloader = test_dataloader = _dl


class Fake(pl.LightningModule):
    """sample() returns real images (+ shift); reconstruct() returns x + offset."""

    def __init__(self, x, shift=0.0, offset=0.0):
        super().__init__()
        self.x, self.shift, self.offset = x, shift, offset
        self.w = nn.Parameter(torch.zeros(1))
        self.i = 0

    def sample(self, n):
        idx = torch.arange(self.i, self.i + n) % len(self.x)
        self.i += n
        return (self.x[idx] + self.shift).clamp(-1, 1) + 0 * torch.rand(1)  # consumes RNG like a chain would

    def reconstruct(self, x):
        return (x + self.offset).clamp(-1, 1)

    def training_step(self, batch, i):
        return (self.w ** 2).sum() + 0 * batch[0].sum()

    def validation_step(self, batch, i):
        pass

    def test_step(self, batch, i):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MeanPool(nn.Module):
    """A tiny feature extractor: 4x4 average-pooled pixels (48 features)."""

    num_features = 48

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)


def images(n=64, c=3, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, s, s, generator=g) * 2 - 1


def run_test(module, dm, callbacks, tmp_path):
    t = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
    return t.test(module, datamodule=dm, verbose=False)[0]


def test_fid_is_zero_against_itself_larger_when_shifted_and_real_stats_are_cached(tmp_path):
    x = images()
    kw = dict(num_samples=64, num_real=64, feature=MeanPool(), cache_dir=str(tmp_path / "stats"), batch_size=16)
    dm = Data(x)
    cb = FIDCallback(**kw)
    same = run_test(Fake(x), dm, [cb], tmp_path)["test/fid"]
    assert abs(same) < 1e-3 and not cb.real_stats_from_cache
    assert len(list((tmp_path / "stats").glob("*.pt"))) == 1

    loads = dm.loads
    cb2 = FIDCallback(**kw)
    shifted = run_test(Fake(x, shift=0.3), dm, [cb2], tmp_path)["test/fid"]
    assert cb2.real_stats_from_cache and dm.loads == loads + 1  # the test loop's own load; FID read no real data
    assert shifted > 0.1

    run_test(Fake(x), dm, [FIDCallback(**{**kw, "num_real": 32})], tmp_path)
    assert len(list((tmp_path / "stats").glob("*.pt"))) == 2  # another num_real is another cache entry


@pytest.mark.skipif(not WEIGHTS.exists(), reason="FID Inception weights not built; run make fid-weights")
def test_fid_matches_torchmetrics_with_the_inception_weights_on_grayscale(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = images(8, c=1, s=28, seed=1), images(8, c=1, s=28, seed=2)
    cb = FIDCallback(num_samples=8, num_real=8, weights_path=str(WEIGHTS), cache_dir=str(tmp_path), batch_size=8)
    ours = run_test(Fake(fake), Data(real), [cb], tmp_path)["test/fid"]
    ref = FrechetInceptionDistance(feature=2048, normalize=False, antialias=False,
                                   feature_extractor_weights_path=str(WEIGHTS))
    ref.update(to_uint8(real).expand(-1, 3, -1, -1), real=True)
    ref.update(to_uint8(fake).expand(-1, 3, -1, -1), real=False)
    assert ours == pytest.approx(float(ref.compute()), rel=1e-4)


def test_fid_without_weights_says_how_to_build_them(tmp_path, monkeypatch):
    monkeypatch.delenv("LEBM_ZOO_FID_WEIGHTS", raising=False)
    cb = FIDCallback(weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(FIDWeightsNotFoundError, match="fid_inception_weights.py"):
        run_test(Fake(images()), Data(images()), [cb], tmp_path)


def test_reconstruction_mse_is_per_pixel_in_unit_range(tmp_path):
    x = images(32).clamp(-0.5, 0.5)  # so that x + 0.2 is never clamped
    zero = run_test(Fake(x), Data(x), [ReconstructionMSE(max_images=None)], tmp_path)["test/recon_mse"]
    assert zero == pytest.approx(0.0, abs=1e-8)
    cb = ReconstructionMSE(max_images=12)
    mse = run_test(Fake(x, offset=0.2), Data(x), [cb], tmp_path)["test/recon_mse"]
    assert mse == pytest.approx(0.01, rel=1e-4)  # 0.2 in [-1, 1] is 0.1 in [0, 1]
    assert cb._seen == 12 and cb.last_path.is_file()


def test_sample_grid_is_written_reproducible_and_leaves_rng_alone(tmp_path):
    x = images(16)
    model = Fake(x)
    cb = SampleGrid(num_samples=16, nrow=4, dirpath=str(tmp_path / "grids"))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=2, limit_train_batches=1, limit_val_batches=1,
                         callbacks=[cb], default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=Data(x))
    files = sorted((tmp_path / "grids").glob("*.png"))
    assert len(files) == 2
    a, b = (Image.open(f) for f in files)
    assert a.size == (4 * 16 + 5 * 2, 4 * 16 + 5 * 2)  # make_grid: 4 images of 16 px and 2-px padding per row
    model.i = 0
    state = torch.get_rng_state()
    cb.draw(trainer, model, "again")
    assert torch.equal(state, torch.get_rng_state())
    assert list(Image.open(cb.last_path).getdata()) == list(Image.open(files[0]).getdata())
