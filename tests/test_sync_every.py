"""The divergence guard with deferred reads (``SyncEvery`` / ``EBMModule.sync_every``): the losses are read on the host
once every N batches, training equals the default guard's when nothing diverges, and a divergence found late stops the
run with no checkpoint written from the bad step on."""
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from _data import TINY_MODELS, tensor_loader, tiny_trainer, uniform_images
from pytorch_lightning.callbacks import ModelCheckpoint
from test_devices import training_data

from lebm_zoo import LatentEBMPrior, TrainingDivergedError
from lebm_zoo.callbacks import SyncEvery


def tiny():
    torch.manual_seed(0)
    return LatentEBMPrior(img_size=28, channels=1, nz=4, ngf=4, ndf=8, prior_steps=2, posterior_steps=2)


def images(n=16, nan_batch=None, bs=2):
    x = uniform_images(n, 1, 28, seed=1)
    if nan_batch is not None:
        x[nan_batch * bs] = float("nan")  # the losses of that batch are non-finite
    return tensor_loader(x, bs, labels=torch.zeros(n, dtype=torch.long))


def count_reads(model):
    reads = []
    original = model._read_checks

    def spy(checks, when=""):
        reads.append([c.batch for c in checks])
        return original(checks, when)

    model._read_checks = spy
    return reads


def test_reads_once_per_n_batches_and_trains_as_the_default_guard():
    default = tiny()
    tiny_trainer(max_epochs=1).fit(default, images())
    deferred = tiny()
    reads = count_reads(deferred)
    tiny_trainer(max_epochs=1, callbacks=[SyncEvery(3)]).fit(deferred, images())
    assert deferred.divergence is None
    # 8 batches: read after batches 2 and 5, then at the epoch's last batch (7)
    assert reads == [[0, 1, 2], [3, 4, 5], [6, 7]]
    for (k, a), b in zip(default.state_dict().items(), deferred.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_late_divergence_ends_fit_at_once_and_saves_nothing(tmp_path):
    """Found 2 batches late, the weights hold 2 updates made from NaN losses: fit ends there, and the epoch-end
    checkpoint (which Lightning would write when a run stops) is not written."""
    m = tiny()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = tiny_trainer(tmp_path, max_epochs=1, callbacks=[SyncEvery(4), ckpt], enable_checkpointing=True)
    with pytest.raises(TrainingDivergedError, match=r"at epoch 0, step 1: .*found 2 batch\(es\) later"):
        t.fit(m, images(nan_batch=1))
    assert "sync_every" in m.divergence and t.global_step == 3  # batches 0-2 were applied; the read came in 3
    assert sorted(tmp_path.glob("*.ckpt")) == []


def test_a_divergence_in_the_batch_being_read_is_skipped_as_by_the_default_guard(tmp_path):
    m = tiny()
    t = tiny_trainer(tmp_path, max_epochs=1, callbacks=[SyncEvery(4)])
    with pytest.warns(UserWarning, match="diverged"):
        t.fit(m, images(nan_batch=3))  # batch 3 is the read's own batch
    assert "step 3" in m.divergence and "The update was skipped" in m.divergence
    assert t.global_step == 3  # batches 0-2 were applied, batch 3's update was skipped, then the run stopped
    assert all(torch.isfinite(v).all() for v in m.state_dict().values() if v.is_floating_point())


def test_the_period_is_the_callbacks_only_during_its_fit():
    m = tiny()
    tiny_trainer(max_steps=1, callbacks=[SyncEvery(5)]).fit(m, images())
    assert m.sync_every == 1  # a later fit without the callback reads at every check again


def test_cli_exits_1_with_the_message(tmp_path, capsys, monkeypatch):
    from lebm_zoo.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["fit", "--recipe", "quickstart", "--trainer.max_steps", "6", "--model.llhd_sigma", "1e-30",
               "--trainer.callbacks+=lebm_zoo.callbacks.SyncEvery", "--trainer.callbacks.steps", "3",
               "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "100"])
    err = capsys.readouterr().err
    assert rc == 1 and "lebm-zoo: error: LatentEBMPrior training diverged at epoch 0, step 0" in err
    assert "sync_every" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_no_checkpoint_is_written_from_the_bad_step_on(tmp_path):
    m = tiny()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    t = tiny_trainer(tmp_path, max_epochs=1, callbacks=[SyncEvery(8), ckpt], enable_checkpointing=True)
    with pytest.raises(TrainingDivergedError, match="before a checkpoint was written"):
        t.fit(m, images(nan_batch=1))
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert saved == ["epoch=0-step=1.ckpt"]  # after batch 0; batch 1's checkpoint found the divergence
    state = torch.load(tmp_path / saved[0], weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_sync_every_refuses_a_bad_period(steps):
    with pytest.raises(ValueError, match="integer >= 1"):
        SyncEvery(steps)


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "to")


def _to_host(name, args, kwargs, caller) -> bool:
    """Whether a spied call copies a value to the host: any of HOST_READS but ``to``, and ``to("cpu")`` written in the
    zoo's code (on this CPU-only machine the moves to "the model's device", ``.to(self.device)``, are to the CPU too;
    on a GPU they are not host copies)."""
    if name != "to":
        return True
    target = kwargs.get("device", args[0] if args else None)
    return "lebm_zoo" in caller.f_code.co_filename and isinstance(target, str) and target.startswith("cpu")


def _optimiser_step_counter(frame) -> bool:
    """torch's optimisers read their step counter with ``.item()``: a host tensor unless the optimiser is
    capturable, so no device synchronisation."""
    return frame.f_back.f_code.co_name == "_get_value" and "optim" in frame.f_back.f_code.co_filename


@pytest.fixture
def host_reads(monkeypatch):
    """Spies on the tensor methods that copy a value to the host, and on logged numbers (copied to the device);
    ``reads.trace(model)`` records, for each training step of ``model``, ``(batch_idx, method, caller)`` (the caller:
    the innermost lebm_zoo frame; for a logged number, its name)."""
    in_step = [None]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            frame = sys._getframe()
            if (in_step[0] is not None and _to_host(_name, a, k, frame.f_back)
                    and not _optimiser_step_counter(frame)):
                while frame is not None and "lebm_zoo" not in frame.f_code.co_filename:
                    frame = frame.f_back
                caller = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}" if frame else "?"
                reads.append((in_step[0], _name, caller))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    log = pl.LightningModule.log

    def log_spy(self, name, value, *a, **k):  # Lightning copies a logged number to the model's device: a host sync
        if in_step[0] is not None and not isinstance(value, torch.Tensor):
            reads.append((in_step[0], "log a number", name))
        return log(self, name, value, *a, **k)

    monkeypatch.setattr(pl.LightningModule, "log", log_spy)

    class Reads(list):
        def trace(self, model):
            step = model.training_step

            def training_step(batch, batch_idx):
                in_step[0] = batch_idx
                try:
                    return step(batch, batch_idx)
                finally:
                    in_step[0] = None

            model.training_step = training_step
            return model

    reads = Reads()
    return reads


#: the reads a family's step makes by design (FCE's alternation rule needs the classification accuracy each step)
BY_DESIGN = {"FlowContrastiveEBM": {"flow_contrastive.py:training_step"},
             "FlowContrastiveEBM-2d": {"flow_contrastive.py:training_step"}}


@pytest.mark.parametrize("name", sorted(n for n in TINY_MODELS if n != "LSTMLanguageModel"))  # not an EBM
def test_training_steps_between_reads_never_read_a_tensor_on_the_host(name, host_reads):
    """What a CPU can prove of "no host-device synchronisation inside a training step": with SyncEvery, the steps
    call none of the tensor methods that copy a value to the host (the CUDA case below asks the CUDA runtime)."""
    torch.manual_seed(0)
    model = host_reads.trace(TINY_MODELS[name]())
    data = training_data(name)
    tiny_trainer(max_steps=len(data) - 1, callbacks=[SyncEvery(10)]).fit(model, data)  # not the epoch's last batch
    assert model.divergence is None
    assert {caller for *_, caller in host_reads} == BY_DESIGN.get(name, set()), host_reads


def test_the_default_guard_reads_at_every_step(host_reads):
    tiny_trainer(max_steps=2).fit(host_reads.trace(tiny()), images())
    assert {(b, caller) for b, _, caller in host_reads} == {(0, "base.py:_read_checks"), (1, "base.py:_read_checks")}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_training_steps_between_reads_do_not_synchronise():
    """On a GPU: CUDA's synchronisation debug mode raises on any synchronising call inside the steps between reads.
    The first step is not checked: Lightning's first ``self.log`` of each key moves its accumulators from the CPU
    with a blocking copy (pytorch-lightning 2.6.6, ``_ResultCollection.log``), once per run."""
    m = tiny()
    step, checked_steps = m.training_step, []

    def checked(batch, batch_idx):
        if batch_idx == 0:
            return step(batch, batch_idx)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = step(batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked_steps.append(batch_idx)
        return out

    m.training_step = checked
    tiny_trainer(max_steps=4, callbacks=[SyncEvery(10)], accelerator="cuda").fit(m, images())
    assert m.divergence is None and m.global_step == 4 and checked_steps == [1, 2, 3]


def test_the_cli_takes_it_as_a_callback(capsys):
    from lebm_zoo.cli import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--recipe", "quickstart", "--trainer.callbacks+=lebm_zoo.callbacks.SyncEvery",
              "--trainer.callbacks.steps", "7", "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: lebm_zoo.callbacks.SyncEvery\n    init_args:\n      steps: 7" in out
