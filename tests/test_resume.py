"""Exact resume: N steps straight and k + resume (N - k) give bitwise the same weights (CPU, num_workers=0), for an
image family, a sequence family and a model with a replay buffer; the checkpoint written at a stop holds the true
epoch, batch position, learning rate and scheduler state."""
import os
import shutil
import signal

import pytest
import pytorch_lightning as pl
import torch
from _data import FIXTURES, tiny_trainer, write_mnist
from pytorch_lightning.callbacks import ModelCheckpoint

from datamodules import MNISTDataModule, PTBDataModule
from lebm_zoo import LatentEBMPrior, SequenceLatentEBMPrior, ShortRunEBM
from lebm_zoo.models.base import StoppedBySignal


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


def test_a_run_stopped_by_max_steps_resumes_across_the_epoch_boundary(tmp_path, mnist_dir):
    # issue 30 finding 3: 8 batches a epoch, 2 epochs; stopped at step 5, then resumed without max_steps. Lightning's
    # ModelCheckpoint saved last.ckpt again at the end of fit, after the epoch had closed, over the stop's file: the
    # resume counted epoch 0 as done and trained 13 steps in all instead of 16, with one scheduler step.
    def fit(folder, max_steps, ckpt=None):
        pl.seed_everything(0)
        model = image_model("lebm")
        t = tiny_trainer(folder, [ModelCheckpoint(dirpath=str(folder), save_last=True)], max_steps=max_steps,
                         max_epochs=2, limit_train_batches=8, limit_val_batches=0, enable_checkpointing=True)
        t.fit(model, MNISTDataModule(str(mnist_dir), batch_size=4, num_workers=0, val_size=4, download=False),
              ckpt_path=ckpt)
        return model, t

    straight, t = fit(tmp_path / "straight", -1)
    assert t.global_step == 16
    fit(tmp_path / "split", 5)
    stored = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)
    assert stored["epoch"] == 0 and stored["global_step"] == 5
    resumed, t = fit(tmp_path / "split", -1, ckpt=str(tmp_path / "split" / "last.ckpt"))
    assert t.global_step == 16
    assert [c.scheduler.last_epoch for c in t.lr_scheduler_configs] == [2, 2]  # stepped at both epochs' ends
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and a run that stops by itself at its last epoch's end stores that epoch as finished
    final = torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 16 and final["epoch"] == 1


class SendSignal(pl.Callback):
    """Sends ``signum`` to this process as batch ``at`` (0-based, counted over the run) starts."""

    def __init__(self, signum, at):
        self.signum, self.at = signum, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("at", [4, 14])  # inside the first epoch; at its last batch (15 batches an epoch)
def test_a_signal_writes_last_ckpt_where_it_stops_and_the_resume_is_exact(tmp_path, mnist_dir, signum, at):
    # issue 30 finding 4: SIGTERM ended the run with exit code 0 and SIGINT with 1, losing the steps since the last
    # periodic checkpoint
    def fit(folder, callbacks=(), ckpt=None):
        pl.seed_everything(0)
        model = image_model("lebm")
        t = tiny_trainer(folder, [ModelCheckpoint(dirpath=str(folder), save_last=True), *callbacks], max_epochs=2,
                         limit_val_batches=0, enable_checkpointing=True)
        t.fit(model, MNISTDataModule(str(mnist_dir), batch_size=4, num_workers=0, val_size=4, download=False),
              ckpt_path=ckpt)
        return model, t

    straight, _ = fit(tmp_path / "straight")
    before = signal.getsignal(signum)
    with pytest.raises(StoppedBySignal) as stop:
        fit(tmp_path / "split", [SendSignal(signum, at)])
    assert stop.value.code == 128 + signum and f"after step {at + 1}" in stop.value.message
    assert signal.getsignal(signum) is before  # the handlers are put back
    assert torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)["global_step"] == at + 1
    resumed, t = fit(tmp_path / "split", ckpt=str(tmp_path / "split" / "last.ckpt"))
    assert t.global_step == 30
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["lebm", "shortrun"])
def test_an_epoch_based_run_extended_by_an_epoch_is_the_longer_run(tmp_path, mnist_dir, kind):
    # max_epochs 1, then --ckpt_path last with max_epochs 2: Lightning makes new loaders for the second epoch (it
    # restores a loader's position only inside an epoch), which shuffled from their initial seed and repeated the first
    # epoch's order; the datamodule's state now carries the shuffling generators
    def fit(folder, epochs, ckpt=None):
        pl.seed_everything(0)
        model = image_model(kind)
        t = tiny_trainer(folder, [ModelCheckpoint(dirpath=str(folder), save_last=True)], max_epochs=epochs,
                         limit_val_batches=0, enable_checkpointing=True)
        t.fit(model, MNISTDataModule(str(mnist_dir), batch_size=4, num_workers=0, val_size=4, download=False),
              ckpt_path=ckpt)
        return model, t

    straight, _ = fit(tmp_path / "straight", 2)
    fit(tmp_path / "split", 1)
    resumed, t = fit(tmp_path / "split", 2, ckpt=str(tmp_path / "split" / "last.ckpt"))
    assert t.global_step == 30
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class BreaksAt(torch.utils.data.Dataset):
    """Images whose item ``bad`` cannot be read (as a truncated JPEG fails in a loader)."""

    def __init__(self, n, bad):
        self.x, self.bad = torch.rand(n, 1, 28, 28) * 2 - 1, bad

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.bad:
            raise OSError(f"image {i} is truncated")
        return self.x[i], 0


def test_an_error_between_steps_writes_last_ckpt_first(tmp_path):
    # issue 30 (minor): a truncated JPEG failed mid-epoch without writing last.ckpt
    pl.seed_everything(0)
    t = tiny_trainer(tmp_path, [ModelCheckpoint(dirpath=str(tmp_path), save_last=True)], max_steps=50,
                     limit_val_batches=0, enable_checkpointing=True)
    with pytest.raises(OSError, match="image 9 is truncated"):
        t.fit(image_model("lebm"), torch.utils.data.DataLoader(BreaksAt(16, bad=9), batch_size=4))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2  # batches 0 and 1 trained


@pytest.mark.parametrize("visible, current", [(1, 0), (2, 1), (4, 3)])
def test_cuda_rng_states_saved_with_more_gpus_visible_restore_what_fits(monkeypatch, visible, current):
    """A checkpoint saved where 4 GPUs were visible, by a process drawing from cuda:2, resumes where fewer (or as
    many) are visible: the saved states go to the devices that exist (no IndexError), then cuda:2's state goes to the
    resuming process's current device, so that run's generator continues. (CUDA calls recorded: no GPU here.)"""
    from lebm_zoo.utils import set_rng_state

    saved = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)

    def set_state(new_state, device="cuda"):
        assert isinstance(device, int) and 0 <= device < visible  # an index this process has
        restored[device] = int(new_state[0])

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    set_rng_state({"cuda": saved, "cuda_device": 2})
    expected = {i: i for i in range(visible)} | {current: 2}
    assert restored == expected
    # a checkpoint from before the drawing device was saved: the devices that exist, by index
    restored.clear()
    set_rng_state({"cuda": saved})
    assert restored == {i: i for i in range(visible)}
    # a run on the CPU of a GPU machine (CUDA not started): the states are queued by index as before, and CUDA is not
    # started to ask for the current device
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("CUDA started by a CPU run's resume"))
    restored.clear()
    set_rng_state({"cuda": saved, "cuda_device": 2})
    assert restored == {i: i for i in range(visible)}
