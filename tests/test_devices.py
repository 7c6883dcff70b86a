"""Every family on every available device: train 2 steps, sample, round-trip a checkpoint (issue 22 item 1).

The device axis is ``cpu`` (always) and ``cuda`` (marker ``cuda``; it runs where a CUDA device is present and is
skipped, saying so, elsewhere). ``pytest -m cuda`` selects the CUDA cases alone: that is what
``benchmarks/gpu_check.sh`` runs on a GPU machine. Each case also runs in fp32 and bf16-mixed. The samplers' moment
tests and the FID callback's device placement run on each device too. Tiny models (``_data.TINY_MODELS``), 2-step
chains: the whole file takes well under a minute on one CPU core.
"""
import math

import pytest
import torch
from _data import TINY_MODELS, tensor_loader, tiny_trainer
from test_callbacks import Data, TinyFeature, Toy
from torch.utils.data import DataLoader

import lebm_zoo
from lebm_zoo.callbacks import FIDCallback
from lebm_zoo.samplers import HMCSampler, LangevinSampler
from lebm_zoo.text import Vocabulary, pad_batch

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")])
DEVICES = ["cpu", CUDA]
PRECISIONS = ["32-true", "bf16-mixed"]
TEXT = {"SequenceLatentEBMPrior", "LSTMLanguageModel"}


def training_data(name: str):
    """A loader of 16 examples in the batch format of family ``name`` (images, 2-D points or token rows)."""
    g = torch.Generator().manual_seed(0)
    if name in TEXT:
        words = [Vocabulary(["a", "b", "c"]).stoi[w] for w in "a b c".split()]
        rows = [[Vocabulary.bos_index, *words[: 1 + i % 3], Vocabulary.eos_index] for i in range(16)]
        return DataLoader(rows, batch_size=8, collate_fn=pad_batch)
    if name == "FlowContrastiveEBM-2d":
        return tensor_loader(torch.randn(16, 2, generator=g) * 0.5, batch_size=8)
    return tensor_loader(torch.rand(16, 1, 28, 28, generator=g) * 2 - 1, batch_size=8)


def check_samples(out, device: str, n: int = 4):
    if isinstance(out, list):  # the text families decode to strings
        assert len(out) == n and all(isinstance(s, str) for s in out)
        return
    assert out.shape[0] == n and out.device.type == device, (out.shape, out.device)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_family_trains_samples_and_round_trips_on_device(name, device, precision, tmp_path):
    torch.manual_seed(0)
    model = TINY_MODELS[name]()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = tiny_trainer(tmp_path, accelerator=device, precision=precision, max_steps=2)
    trainer.fit(model, training_data(name))
    assert trainer.state.finished and trainer.global_step >= 2
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    changed = [k for k in after if after[k].is_floating_point() and not torch.equal(before[k], after[k].cpu())]
    assert changed, f"{name}: no weight moved in 2 steps on {device} ({precision})"

    model = model.to(device).eval()
    assert model.device.type == device
    with trainer.precision_plugin.forward_context():  # sample in the precision it trained in
        check_samples(model.sample(4), device)

    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = lebm_zoo.load_pretrained(ckpt)
    assert type(loaded) is type(model) and loaded.device.type == "cpu"  # a checkpoint loads on any machine
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k].cpu()) for k, v in loaded.state_dict().items())


def _gaussian_target(device):
    mu = torch.tensor([1.0, -1.0], device=device)
    prec = torch.linalg.inv(torch.tensor([[1.0, 0.8], [0.8, 1.0]], device=device))

    def log_prob(x):
        d = x - mu
        return -0.5 * ((d @ prec) * d).sum(1)

    return log_prob, mu


@pytest.mark.parametrize("device", DEVICES)
def test_langevin_moments_on_device(device):
    torch.manual_seed(0)
    log_prob, mu = _gaussian_target(device)
    x = LangevinSampler(n_steps=600, step_size=0.2)(log_prob, torch.randn(4000, 2, device=device) * 3)
    assert x.device.type == device
    # ULA on this target: mean exact, covariance within the discretisation bias (+0.01) and 4,000-chain noise
    assert torch.allclose(x.mean(0), mu, atol=0.07)
    cov = torch.cov(x.T).cpu()
    assert torch.allclose(cov, torch.tensor([[1.0, 0.8], [0.8, 1.0]]), atol=0.08), cov


@pytest.mark.parametrize("device", DEVICES)
def test_hmc_moments_on_device(device):
    torch.manual_seed(0)

    def mixture(x):  # 0.3 N(-1.5, 1) + 0.7 N(1.5, 1)
        x = x[:, 0]
        return torch.logaddexp(math.log(0.3) - 0.5 * (x + 1.5) ** 2, math.log(0.7) - 0.5 * (x - 1.5) ** 2)

    x, trace = HMCSampler(n_steps=200, n_leapfrog=8, step_size=0.3)(mixture, torch.randn(3000, 1, device=device) * 2,
                                                                     return_trace=True)
    assert x.device.type == device and trace["acceptance_rate"].device.type == device
    assert abs(x.mean().item() - 0.6) < 0.1 and abs(x.var().item() - 2.89) < 0.2
    assert abs((x > 0).float().mean().item() - 0.7) < 0.04


@pytest.mark.parametrize("device", DEVICES)
def test_fid_updates_on_the_models_device(device, tmp_path):
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    cb = FIDCallback(feature=TinyFeature(), num_samples=16, batch_size=8, cache_dir=str(tmp_path), on_test=False)
    t = tiny_trainer(tmp_path, [cb], accelerator=device, max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    t.fit(Toy(x, shift=0.3), datamodule=Data(x))
    assert cb.metric.device.type == device  # the Inception features and sums live where the model ran
    assert int(cb.metric.real_features_num_samples) == 16 and float(t.callback_metrics["val/fid"]) > 0

