"""Exact resume: N steps straight and k + resume (N - k) give bitwise the same weights (CPU, num_workers=0), for an
image family, a sequence family and a model with a replay buffer; the checkpoint written at a stop holds the true
epoch, batch position, learning rate and scheduler state."""
import shutil

import pytest
import pytorch_lightning as pl
import torch
from _data import FIXTURES, tiny_trainer, write_mnist
from pytorch_lightning.callbacks import ModelCheckpoint

from datamodules import MNISTDataModule, PTBDataModule
from lebm_zoo import LatentEBMPrior, SequenceLatentEBMPrior, ShortRunEBM


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mnist")
    write_mnist(d, n=64)  # 60 training images after a 4-image validation split: 15 batches of 4 per epoch
    return d


def image_model(kind):
    if kind == "shortrun":  # a replay buffer (persistent chains), saved in checkpoints
        return ShortRunEBM(img_size=28, channels=1, nf=4, n_steps=2, init="persistent", buffer_size=16)
    return LatentEBMPrior(img_size=28, channels=1, nz=4, ngf=2, ndf=8, prior_steps=2, posterior_steps=2, lr_decay=0.5)


def run(folder, make_model, make_data, max_steps, ckpt=None):
    """``fit`` to ``max_steps`` (resuming from ``ckpt``); returns the model and the trainer."""
    pl.seed_everything(0)
    model = make_model()
    t = tiny_trainer(folder, [ModelCheckpoint(dirpath=str(folder), save_last=True)], max_steps=max_steps,
                     limit_val_batches=0, enable_checkpointing=True)
    t.fit(model, make_data(), ckpt_path=ckpt)
    return model, t


def assert_resume_is_exact(tmp_path, make_model, make_data, total, first):
    straight, _ = run(tmp_path / "straight", make_model, make_data, total)
    run(tmp_path / "split", make_model, make_data, first)
    resumed, t = run(tmp_path / "split", make_model, make_data, total, ckpt=str(tmp_path / "split" / "last.ckpt"))
    assert t.global_step == total
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    shutil.rmtree(tmp_path / "split")


@pytest.mark.parametrize("kind", ["lebm", "shortrun"])
@pytest.mark.parametrize("total, first", [(10, 5), (20, 15), (34, 30)])  # inside an epoch; at an epoch's end
def test_image_families_resume_exactly(tmp_path, mnist_dir, kind, total, first):
    def data():
        return MNISTDataModule(str(mnist_dir), batch_size=4, num_workers=0, val_size=4, download=False)

    assert_resume_is_exact(tmp_path, lambda: image_model(kind), data, total, first)


def test_sequence_family_resumes_exactly(tmp_path):
    def data():
        return PTBDataModule(str(FIXTURES / "ptb"), batch_size=32)  # 300 sentences: 10 batches per epoch

    def model():
        return SequenceLatentEBMPrior(nz=4, ndf=8, emb_dim=8, hidden=8, prior_steps=2, posterior_steps=2)

    assert_resume_is_exact(tmp_path, model, data, 14, 6)


def test_a_stop_inside_an_epoch_stores_the_true_epoch_position_and_lr(tmp_path, mnist_dir):
    def data():
        return MNISTDataModule(str(mnist_dir), batch_size=4, num_workers=0, val_size=4, download=False)

    run(tmp_path, lambda: image_model("lebm"), data, 5)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 5
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] >= 4
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [0, 0]  # no decay for an unfinished epoch
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    # resume to the end of epoch 1 (step 30): epochs 0 and 1 at lr x 1 (the reference schedule), then x 0.5
    model, t = run(tmp_path, lambda: image_model("lebm"), data, 31, ckpt=str(tmp_path / "last.ckpt"))
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5e-4)  # epoch 2's, not decayed at the stop
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 31
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [2, 2]
