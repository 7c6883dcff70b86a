"""Metric callbacks: FID (vs itself, vs torchmetrics, cached real statistics, DDP), reconstruction MSE, sample grids."""
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from _data import FID_WEIGHTS as WEIGHTS
from _data import tensor_loader, tiny_trainer, uniform_images
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.io import read_image

from lebm_zoo.callbacks import FIDCallback, FIDWeightsNotFoundError, ReconstructionMSE, SampleGrid, default_fid_weights
from lebm_zoo.models.base import leave_process_group
from lebm_zoo.utils import to_uint8

images = partial(uniform_images, s=8)  # 8-pixel images unless asked


class Data(pl.LightningDataModule):
    """Every split serves the same images in (x, y) batches; counts the loaders built per split."""

    def __init__(self, x, batch_size=8):
        super().__init__()
        self.x, self.batch_size = x, batch_size
        self.channels, self.img_size = x.shape[1], x.shape[-1]
        self.loads = Counter()

    def _loader(self, split):
        self.loads[split] += 1
        return tensor_loader(self.x, self.batch_size, shuffle=split == "train")

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


class Toy(pl.LightningModule):
    """A fixed model. ``sample`` returns ``data`` (+ ``shift``) in order, rank r starting at image r * rank_offset,
    or, without ``data``, tanh of a fixed random linear map of Gaussian noise. ``reconstruct(x) = clamp(x + offset)``.
    Only ``w`` is trained."""

    def __init__(self, data=None, shift=0.0, offset=0.0, rank_offset=0, shape=(1, 8, 8)):
        super().__init__()
        self.data, self.shift, self.offset, self.rank_offset, self.shape = data, shift, offset, rank_offset, shape
        self.w = nn.Parameter(torch.zeros(1))
        self.gen = nn.Linear(4, int(torch.tensor(shape).prod())).requires_grad_(False)
        self.cursor = None
        self.reconstructed = 0

    def sample(self, n):
        if self.data is None:
            return torch.tanh(self.gen(torch.randn(n, 4, device=self.device))).view(n, *self.shape)
        if self.cursor is None:
            self.cursor = self.global_rank * self.rank_offset
        idx = torch.arange(self.cursor, self.cursor + n) % len(self.data)
        self.cursor += n
        return (self.data[idx] + self.shift).clamp(-1, 1).to(self.device)

    def reconstruct(self, x):
        self.reconstructed += x.shape[0]
        return (x + self.offset).clamp(-1, 1)

    def training_step(self, batch, batch_idx):
        return ((self.w - 1) ** 2).sum() + 0 * batch[0].sum()

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        pass

    def teardown(self, stage):
        # as EBMModule: a ddp_spawn worker leaves the process group with its peer before it exits; torn down one rank
        # at a time at interpreter exit, a rank can abort after a successful run (SIGABRT, one run in four here)
        if self._trainer is not None and isinstance(self.trainer.strategy.launcher, _MultiProcessingLauncher):
            leave_process_group()

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


class TinyFeature(nn.Module):
    """A custom FID feature extractor: 4x4-pooled pixels through a fixed random projection to 6 features."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(3 * 4 * 4, 6, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3  # the callback feeds uint8 RGB
        return nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj


#: the tiny_trainer arguments of these tests: one epoch of 2 training and 2 validation batches
SHORT_EPOCH = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 2}


def reference_fid(real, fake, **kw):
    """torchmetrics FID computed directly on the same uint8 RGB images."""
    m = FrechetInceptionDistance(normalize=False, **kw)
    m.update(to_uint8(real).repeat(1, 3 // real.shape[1], 1, 1), real=True)
    m.update(to_uint8(fake).repeat(1, 3 // fake.shape[1], 1, 1), real=False)
    return float(m.compute())


# --------------------------------------------------------------------------------------------------------------- FID
def test_fid_custom_feature_self_shift_and_real_statistics_cache(tmp_path):
    x = images(32, lo=-0.8, hi=0.8)
    cache = tmp_path / "stats"
    kw = {"num_samples": 32, "batch_size": 8, "cache_dir": str(cache), "on_test": False}

    dm = Data(x)
    cb = FIDCallback(feature=TinyFeature(), **kw)
    t = tiny_trainer(tmp_path, [cb], **SHORT_EPOCH)
    t.fit(Toy(x), datamodule=dm)
    same = float(t.callback_metrics["val/fid"])
    assert dm.loads["test"] == 1 and not cb.real_stats_from_cache
    files = list(cache.glob("*.pt"))
    assert files == [cb.cache_path(t)]
    assert int(cb.metric.real_features_num_samples) == 32

    dm = Data(x)
    cb = FIDCallback(feature=TinyFeature(), **kw)  # a new but identical feature module: same cache key
    t = tiny_trainer(tmp_path, [cb], **SHORT_EPOCH)
    t.fit(Toy(x, shift=0.3), datamodule=dm)
    shifted = float(t.callback_metrics["val/fid"])
    assert dm.loads["test"] == 0 and cb.real_stats_from_cache  # real images not read again
    assert shifted == pytest.approx(reference_fid(x, (x + 0.3).clamp(-1, 1), feature=TinyFeature()), rel=1e-4)
    assert shifted > 0.1 and abs(same) < 1e-3 * shifted

    dm = Data(x)
    cb = FIDCallback(feature=TinyFeature(), num_real=16, **kw)
    t = tiny_trainer(tmp_path, [cb], **SHORT_EPOCH)
    t.fit(Toy(x), datamodule=dm)
    assert dm.loads["test"] == 1 and not cb.real_stats_from_cache  # another num_real: another key, recomputed
    assert len(list(cache.glob("*.pt"))) == 2 and cb.cache_path(t) not in files
    assert int(cb.metric.real_features_num_samples) == 16


def test_fid_every_n_epochs_and_test_key(tmp_path):
    x = images(16)
    cb = FIDCallback(feature=TinyFeature(), num_samples=16, batch_size=16, every_n_epochs=2,
                     cache_dir=str(tmp_path))
    t = tiny_trainer(tmp_path, [cb], **SHORT_EPOCH)
    t.fit(Toy(x), datamodule=Data(x))  # epoch 0 only: (0 + 1) % 2 != 0
    assert "val/fid" not in t.callback_metrics and cb.last_value is None
    out = t.test(Toy(x, shift=0.5), datamodule=Data(x), verbose=False)[0]
    assert out["test/fid"] == pytest.approx(cb.last_value) and cb.last_value > 0


@pytest.mark.fid_weights
def test_fid_matches_torchmetrics_with_inception_weights_on_grayscale(tmp_path):
    real, fake = images(8, c=1, s=28, seed=1), images(8, c=1, s=28, seed=2) * 0.5
    cb = FIDCallback(num_samples=8, weights_path=str(WEIGHTS), every_n_epochs=0, batch_size=8,
                     cache_dir=str(tmp_path))
    ours = tiny_trainer(tmp_path, [cb], **SHORT_EPOCH).test(Toy(fake), datamodule=Data(real), verbose=False)
    ours = ours[0]["test/fid"]
    ref = reference_fid(real, fake, feature=2048, antialias=False, feature_extractor_weights_path=str(WEIGHTS))
    assert ours == pytest.approx(ref, rel=1e-4) and ref > 1


def test_fid_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LEBM_ZOO_FID_WEIGHTS", raising=False)
    missing = tmp_path / "nope.pth"
    x = images(8)
    cb = FIDCallback(num_samples=8, weights_path=str(missing), cache_dir=str(tmp_path))
    with pytest.raises(FIDWeightsNotFoundError, match="lebm-zoo fid-weights") as err:
        tiny_trainer(tmp_path, [cb], **SHORT_EPOCH).test(Toy(x), datamodule=Data(x), verbose=False)
    assert str(missing) in str(err.value) and "LEBM_ZOO_FID_WEIGHTS" in str(err.value)

    # resolution order: argument, then $LEBM_ZOO_FID_WEIGHTS, then ~/.cache/lebm_zoo/...
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FIDWeightsNotFoundError, match="offline"):
        default_fid_weights()
    fake = tmp_path / "w.pth"
    fake.write_bytes(b"")
    monkeypatch.setenv("LEBM_ZOO_FID_WEIGHTS", str(fake))
    assert default_fid_weights() == fake
    with pytest.raises(FIDWeightsNotFoundError):
        default_fid_weights(str(missing))


# ------------------------------------------------------------------------------------------------ reconstruction
def test_reconstruction_mse_identity_shift_cap_and_png(tmp_path):
    x = images(24, lo=-0.8, hi=0.8)  # x + 0.2 never clamps
    cb = ReconstructionMSE(max_images=None)
    t = tiny_trainer(tmp_path, [cb], **SHORT_EPOCH)
    t.fit(Toy(x), datamodule=Data(x))
    assert float(t.callback_metrics["val/recon_mse"]) == 0.0

    model = Toy(x, offset=0.2)
    cb = ReconstructionMSE(max_images=12)
    t = tiny_trainer(tmp_path / "shift", [cb], **SHORT_EPOCH, val_check_interval=1)  # two validations in epoch 0
    t.fit(model, datamodule=Data(x))
    assert float(t.callback_metrics["val/recon_mse"]) == pytest.approx(0.01, rel=1e-5)  # 0.2/2 = 0.1 in [0, 1]
    assert model.reconstructed == 2 * 12  # 8 + 4 images per validation (sanity check skipped)
    pngs = sorted(p.name for p in (tmp_path / "shift" / "reconstructions").glob("*.png"))
    assert pngs == ["epoch=0000-step=2.png", "epoch=0000.png"]
    grid = read_image(str(cb.last_path))
    assert grid.shape == (3, 2 * 10 + 2, 8 * 10 + 2)  # 8 originals over 8 reconstructions, 8-px images, 2-px pad
    assert not torch.equal(grid[:, 2:10], grid[:, 12:20])  # the bottom row differs (offset)

    # clamping: images up to 1, so x + 0.2 saturates; hand-computed on the first 12 test images only
    x = images(24, seed=3)
    model = Toy(x, offset=0.2)
    cb = ReconstructionMSE(max_images=12)
    out = tiny_trainer(tmp_path / "test", [cb], **SHORT_EPOCH).test(model, datamodule=Data(x), verbose=False)[0]

    def mse(v):
        return float((((v + 0.2).clamp(-1, 1) + 1) / 2 - (v + 1) / 2).pow(2).mean())

    assert out["test/recon_mse"] == pytest.approx(mse(x[:12]), rel=1e-5)
    assert mse(x[:12]) != pytest.approx(mse(x[:16]), rel=1e-3)  # the cap matters
    assert model.reconstructed == 12 and cb.last_path == tmp_path / "test" / "reconstructions" / "test.png"


# ------------------------------------------------------------------------------------------------------ samples
class ImageRecorder(Logger):
    """A logger with ``log_image`` (like WandbLogger) that records its calls."""

    def __init__(self):
        super().__init__()
        self.images = []

    name = "recorder"
    version = 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_image(self, key, images, step=None):
        self.images.append((key, images, step))


class RNGProbe(SampleGrid):
    """Records whether the global CPU RNG state is the same after the hook as before it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng_unchanged = []

    def on_validation_epoch_end(self, trainer, pl_module):
        before = torch.get_rng_state()
        super().on_validation_epoch_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self.rng_unchanged.append(torch.equal(before, torch.get_rng_state()))


def test_sample_grid_png_size_loggers_rng_and_reproducibility(tmp_path, monkeypatch):
    x = images(16)
    model = Toy()  # Gaussian noise through a fixed generator: sampling consumes the global RNG
    state = torch.get_rng_state()
    model.sample(2)
    assert not torch.equal(state, torch.get_rng_state())

    tb, rec = TensorBoardLogger(str(tmp_path), name="tb"), ImageRecorder()
    added = []
    monkeypatch.setattr(tb.experiment, "add_image", lambda tag, img, step: added.append((tag, img.shape, step)))
    cb = RNGProbe(num_samples=12, nrow=4)
    every2 = SampleGrid(num_samples=4, every_n_epochs=2, dirpath=str(tmp_path / "every2"))
    t = tiny_trainer(tmp_path, [cb, every2], max_epochs=2, limit_train_batches=2, limit_val_batches=2,
                     logger=[tb, rec])
    t.fit(model, datamodule=Data(x))

    folder = Path(tb.log_dir) / "samples"
    assert sorted(p.name for p in folder.glob("*.png")) == ["epoch=0000.png", "epoch=0001.png"]
    a, b = (read_image(str(folder / f"epoch=000{i}.png")) for i in (0, 1))
    assert a.shape == (3, 3 * 10 + 2, 4 * 10 + 2)  # 12 images, 4 per row, 8-px images, 2-px padding
    assert torch.equal(a, b) and a.float().std() > 10  # the same (non-blank) grid from a fixed model
    assert cb.rng_unchanged == [True, True]  # sanity check skipped; training RNG untouched
    assert cb.last_path == folder / "epoch=0001.png"
    assert [p.name for p in (tmp_path / "every2").glob("*.png")] == ["epoch=0001.png"]
    small = (3, 8 + 4, 4 * 10 + 2)  # every2's grid: 4 images in one row
    assert added == [("val/samples", a.shape, 2), ("val/samples", a.shape, 4), ("val/samples", small, 4)]
    assert [(k, len(v), v[0].shape, step) for k, v, step in rec.images] == [(k, 1, s, i) for k, s, i in added]

    t.test(model, datamodule=Data(x), verbose=False)
    assert cb.last_path == folder / "test.png" and torch.equal(read_image(str(cb.last_path)), a)
    assert added[-1][0] == "test/samples" and rec.images[-1][0] == "test/samples"


# ---------------------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_callbacks_under_ddp_spawn_on_two_cpu_processes(tmp_path):
    """Sharded real statistics and samples give the single-process FID; no rank-zero-only collective hangs."""
    x = images(32, lo=-0.8, hi=0.8)
    fid = FIDCallback(feature=TinyFeature(), num_samples=32, batch_size=8, on_test=False, cache_dir=str(tmp_path))
    t = tiny_trainer(tmp_path, [fid, ReconstructionMSE(max_images=None), SampleGrid(num_samples=4)], **SHORT_EPOCH,
                     devices=2, strategy="ddp_spawn")
    t.fit(Toy(x, shift=0.3, offset=0.2, rank_offset=16), datamodule=Data(x))
    expected = reference_fid(x, (x + 0.3).clamp(-1, 1), feature=TinyFeature())
    assert float(t.callback_metrics["val/fid"]) == pytest.approx(expected, rel=1e-4)
    assert float(t.callback_metrics["val/recon_mse"]) == pytest.approx(0.01, rel=1e-5)
    assert len(list(tmp_path.glob("*.pt"))) == 2  # one real-statistics shard per rank
    assert list((tmp_path / "samples").glob("*.png")) and list((tmp_path / "reconstructions").glob("*.png"))


# ------------------------------------------------------------------------------------------------ BestCheckpoint
class _Scored(pl.LightningModule):
    """Validation logs ``scores[epoch]`` as ``val/score``."""

    def __init__(self, scores):
        super().__init__()
        self.w, self.scores = nn.Parameter(torch.zeros(1)), scores

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0].mean()).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", float(self.scores[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_scored(folder, scores, ckpt_path=None):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lebm_zoo.callbacks import BestCheckpoint

    loader = tensor_loader(torch.rand(4, 1), batch_size=2, shuffle=False)
    trainer = pl.Trainer(max_epochs=len(scores), logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[BestCheckpoint(monitor="val/score", dirpath=folder),
                                                            ModelCheckpoint(dirpath=folder, save_last=True)])
    trainer.fit(_Scored(scores), loader, loader, ckpt_path=ckpt_path)
    return folder / "last.ckpt"


def test_best_checkpoint_keeps_the_best_score_across_resumes_into_other_folders(tmp_path):
    from lebm_zoo.checkpoint import find_best_checkpoint, read_checkpoint

    scores = [3.0, 1.0, 2.0, 1.5, 0.5]
    last = _fit_scored(tmp_path / "v0", scores[:3])
    assert read_checkpoint(last)["epoch"] == 2  # last.ckpt is the last epoch's, though its score did not improve
    first = tmp_path / "v0" / "best-epoch=001.ckpt"
    assert find_best_checkpoint(last) == (first, "val/score", 1.0)
    assert sorted(p.name for p in (tmp_path / "v0").glob("best*")) == [first.name]
    # resumed into another folder: epoch 3's 1.5 is worse than epoch 1's 1.0 (Lightning's own callback would keep it)
    last = _fit_scored(tmp_path / "v1", scores[:4], ckpt_path=last)
    assert read_checkpoint(last)["epoch"] == 3 and find_best_checkpoint(last) == (first, "val/score", 1.0)
    assert not list((tmp_path / "v1").glob("best*"))
    # and once more: epoch 4's 0.5 is better, so it is the best now (Lightning deletes no file of another folder)
    last = _fit_scored(tmp_path / "v2", scores, ckpt_path=last)
    assert find_best_checkpoint(last) == (tmp_path / "v2" / "best-epoch=004.ckpt", "val/score", 0.5)
    assert first.exists()
