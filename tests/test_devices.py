"""Every family on every available device: train 2 steps, sample, round-trip a checkpoint (issue 22 item 1), resume
from a checkpoint and run its recipes' test metrics (issue 29 item 1).

The device axis is ``cpu`` (always) and ``cuda`` (marker ``cuda``; it runs where a CUDA device is present and is
skipped, saying so, elsewhere). ``pytest -m cuda`` selects the CUDA cases alone: that is what
``benchmarks/gpu_check.sh`` runs on a GPU machine. Each case also runs in fp32 and bf16-mixed. The resume test fits 2
steps with a ``ModelCheckpoint(save_last=True)``, resumes with a fresh trainer to step 3, then runs ``trainer.test``
with the metric callbacks the family's recipes pin (FID with a tiny feature extractor instead of Inception,
reconstruction MSE, AUPRC/AUROC, accuracy, perplexity and NLL, molecule validity where RDKit is installed; the LSTM
language model's own test perplexity) and checks that each logged metric is finite and in range. The samplers' moment
tests and the FID callback's device placement run on each device too. Tiny models (``_data.TINY_MODELS``), 2-step
chains, 8 test images: the whole file takes about a minute on one CPU core.
"""
import math

import pytest
import pytorch_lightning as pl
import torch
from _data import TINY_MODELS, tensor_loader, tiny_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from test_callbacks import Data, TinyFeature, Toy
from torch.utils.data import DataLoader

import lebm_zoo
from lebm_zoo.callbacks import (
    AnomalyDetectionCallback,
    ClassificationAccuracy,
    FIDCallback,
    MoleculeMetricsCallback,
    PerplexityCallback,
    ReconstructionMSE,
    TrajectoryMetrics,
)
from lebm_zoo.samplers import HMCSampler, LangevinSampler
from lebm_zoo.text import Vocabulary, pad_batch

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")])
DEVICES = ["cpu", CUDA]
PRECISIONS = ["32-true", "bf16-mixed"]
TEXT = {"SequenceLatentEBMPrior", "LSTMLanguageModel"}
TRAJECTORIES = {"TrajectoryLEBM"}


def walks(n: int = 16, seed: int = 0) -> torch.Tensor:
    """``n`` pedestrian windows ``(n, 20, 2)`` in metres: random walks of about 0.5 m per step."""
    g = torch.Generator().manual_seed(seed)
    return (0.2 * torch.randn(n, 20, 2, generator=g) + 0.4).cumsum(1) + torch.randn(n, 1, 2, generator=g)


def training_data(name: str):
    """A loader of 16 examples in the batch format of family ``name`` (images, 2-D points or token rows)."""
    g = torch.Generator().manual_seed(0)
    if name in TEXT:
        words = [Vocabulary(["a", "b", "c"]).stoi[w] for w in "a b c".split()]
        rows = [[Vocabulary.bos_index, *words[: 1 + i % 3], Vocabulary.eos_index] for i in range(16)]
        return DataLoader(rows, batch_size=8, collate_fn=pad_batch)
    if name == "FlowContrastiveEBM-2d":
        return tensor_loader(torch.randn(16, 2, generator=g) * 0.5, batch_size=8)
    if name in TRAJECTORIES:
        return tensor_loader(walks(), batch_size=8)
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
    # P(x > 0) = 0.3 Phi(-1.5) + 0.7 Phi(1.5) = 0.6733; 3,000 chains: standard error 0.0086, so 0.03 is 3.5 of them
    p_positive = 0.3 * 0.5 * math.erfc(1.5 / math.sqrt(2)) + 0.7 * 0.5 * math.erfc(-1.5 / math.sqrt(2))
    assert abs((x > 0).float().mean().item() - p_positive) < 0.03


@pytest.mark.parametrize("device", DEVICES)
def test_fid_updates_on_the_models_device(device, tmp_path):
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    cb = FIDCallback(feature=TinyFeature(), num_samples=16, batch_size=8, cache_dir=str(tmp_path), on_test=False)
    t = tiny_trainer(tmp_path, [cb], accelerator=device, max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    t.fit(Toy(x, shift=0.3), datamodule=Data(x))
    assert cb.last_device.type == device  # the Inception features and sums lived where the model ran
    assert cb.metric.device.type == "cpu"  # and went back to the CPU at teardown, freeing the accelerator
    assert int(cb.metric.real_features_num_samples) == 16 and float(t.callback_metrics["val/fid"]) > 0



# ------------------------------------------------------------------------------------ resume and test metrics
#: the metric callbacks each family's recipes pin (recipes/*.yaml), by the names of :func:`metric_callback`
TEST_METRICS = {
    "LatentEBMPrior": ["recon_mse", "fid", "anomaly"],  # {mnist,svhn,cifar10,celeba64}_prior, mnist_anomaly_prior
    "JointHierarchicalEBMPrior": ["fid", "anomaly"],  # {mnist,cifar10}_hierarchical, mnist_anomaly_hierarchical
    "ShortRunEBM": ["fid"],
    "CoopNets": ["fid"],
    "DivergenceTriangle": ["recon_mse", "fid"],
    "FlowContrastiveEBM": ["fid"],
    "FlowContrastiveEBM-2d": [],  # toy2d_fce pins only DensityPlot2D, a picture: no test metric, resume only
    "SequenceLatentEBMPrior": ["perplexity", "molecules"],  # ptb_prior; zinc_prior and moses_prior
    "LSTMLanguageModel": ["own_ppl"],  # ptb_lm pins no metric callback: the model's test_step logs test/ppl
    "DiffusionRecoveryEBM": ["fid"],
    "SymbolVectorLEBM": ["accuracy"],  # {mnist,svhn,cifar10}_semisup
    "TrajectoryLEBM": ["ade_fde"],  # {eth,hotel,univ,zara1,zara2,sdd}_lbebm
}
#: the range of each test metric (all must also be finite)
BOUNDS = {"test/fid": (0, math.inf), "test/recon_mse": (0, 1), "test/auprc": (0, 1), "test/ap": (0, 1),
          "test/auroc": (0, 1), "test/accuracy": (0, 1), "test/ppl": (1, math.inf), "test/nll": (0, math.inf),
          "test/nll_ppl": (1, math.inf), "test/fppl": (1, math.inf), "test/rppl": (1, math.inf),
          "test/validity": (0, 1), "test/ade": (0, math.inf), "test/fde": (0, math.inf)}


class LabelledImages(Data):
    """:class:`test_callbacks.Data` with labels 0, 1, 0, 1, ...: both classes for AnomalyDetectionCallback (1 =
    anomaly), classes below the tiny SymbolVectorLEBM's 3 for ClassificationAccuracy."""

    def _loader(self, split):
        self.loads[split] += 1
        return tensor_loader(self.x, self.batch_size, labels=torch.arange(len(self.x)) % 2)


class Tokens(pl.LightningDataModule):
    """The token rows of :func:`training_data` as every split, with the SMILES attributes MoleculeMetricsCallback
    reads (training set for novelty, test set for the property distances)."""

    train_smiles = ["CCO", "CC(=O)O", "c1ccccc1"]
    test_smiles = ["CCN", "CC(=O)Oc1ccccc1C(=O)O", "c1ccncc1"]

    def __init__(self, name):
        super().__init__()
        self.name = name

    def train_dataloader(self):
        return training_data(self.name)

    test_dataloader = train_dataloader


def metric_callback(kind: str, tmp_path):
    """The recipes' metric callback ``kind`` at its tiniest settings, and the test metrics it must log (no callback
    for ``own_ppl``, the language model's own test metric)."""
    if kind == "own_ppl":
        return None, ["test/ppl"]
    if kind == "ade_fde":
        return TrajectoryMetrics(k=2, plot=False), ["test/ade", "test/fde"]
    if kind == "fid":  # TinyFeature: no Inception weights needed (the GPU machine has none)
        return FIDCallback(feature=TinyFeature(), num_samples=8, batch_size=8, cache_dir=str(tmp_path / "fid")), \
            ["test/fid"]
    if kind == "recon_mse":
        return ReconstructionMSE(max_images=8), ["test/recon_mse"]
    if kind == "anomaly":
        return AnomalyDetectionCallback(max_images=8), ["test/auprc", "test/ap", "test/auroc"]
    if kind == "accuracy":
        return ClassificationAccuracy(max_test_images=8), ["test/accuracy"]
    if kind == "perplexity":  # a real-data language model of the same vocabulary, as the ptb_lm recipe writes one
        lm = TINY_MODELS["LSTMLanguageModel"]().save_pretrained(tmp_path / "lm")
        cb = PerplexityCallback(lm_path=str(lm), num_samples=4, rppl_epochs=1, nll_sentences=4, nll_samples=2,
                                log_z_samples=16, batch_size=4)
        return cb, ["test/nll", "test/nll_ppl", "test/fppl", "test/rppl"]
    if kind == "molecules":  # the tiny model decodes words, not SMILES: validity is defined (0) and nothing else
        return MoleculeMetricsCallback(num_samples=4, batch_size=4, grid_size=4), ["test/validity"]
    raise KeyError(kind)


def run_test_metrics(model, kinds, name, device, precision, tmp_path):
    """``trainer.test`` of ``model`` with the callbacks ``kinds`` on ``device``: check every metric they log is there,
    finite and in range; return the callbacks."""
    made = [metric_callback(k, tmp_path) for k in kinds]
    callbacks, keys = [cb for cb, _ in made if cb is not None], [k for _, ks in made for k in ks]
    if name in TEXT:
        data = Tokens(name)
    elif name in TRAJECTORIES:
        data = Data(walks(8, seed=1))
    else:
        data = LabelledImages(torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    t = tiny_trainer(tmp_path, callbacks, accelerator=device, precision=precision)
    out = t.test(model, datamodule=data, verbose=False)[0]
    for k in keys:
        assert k in out and k in t.callback_metrics, f"{name}: {k} not logged on {device} ({precision}): {sorted(out)}"
        v = float(t.callback_metrics[k])
        lo, hi = BOUNDS[k]
        assert math.isfinite(v) and lo <= v <= hi, f"{name}: {k} = {v} on {device} ({precision})"
    return callbacks


class ResumeProbe(pl.Callback):
    """What a resumed fit starts from (its step, device and weights, restored before ``on_train_start``) and how
    many batches it trains."""

    def on_train_start(self, trainer, pl_module):
        self.step, self.device, self.batches = trainer.global_step, pl_module.device, 0
        self.weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # resuming into the same folder
def test_family_resumes_and_runs_its_test_metrics_on_device(name, device, precision, tmp_path):
    kinds = TEST_METRICS[name]  # a new family in TINY_MODELS needs its entry
    torch.manual_seed(0)
    ckpt_dir = tmp_path / "ckpt"
    t = tiny_trainer(tmp_path, [ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True)], accelerator=device,
                     precision=precision, max_steps=2, enable_checkpointing=True)
    t.fit(TINY_MODELS[name](), training_data(name))
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    saved = ckpt["state_dict"]

    torch.manual_seed(1)  # a fresh model with other initial weights: the resume must put the checkpoint's back
    model, probe = TINY_MODELS[name](), ResumeProbe()
    t = tiny_trainer(tmp_path, [ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True), probe], accelerator=device,
                     precision=precision, max_steps=3, enable_checkpointing=True)
    t.fit(model, training_data(name), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert t.global_step == 3 and probe.step == 2 and probe.batches == 1, (t.global_step, probe.step, probe.batches)
    assert torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3
    assert probe.device.type == device
    assert probe.weights.keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in probe.weights.items()), f"{name}: resumed from other weights"
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    moved = [k for k in after if after[k].is_floating_point() and not torch.equal(saved[k], after[k].cpu())]
    assert moved, f"{name}: no weight moved in the resumed step on {device} ({precision})"

    if not kinds:
        return  # no recipe of this family has a test metric (see TEST_METRICS)
    model.to(device)
    callbacks = run_test_metrics(model, [k for k in kinds if k != "molecules"], name, device, precision, tmp_path)
    for cb in callbacks:
        if isinstance(cb, FIDCallback):
            assert cb.last_device.type == device  # featurised where the model ran
    if "molecules" in kinds:  # last: RDKit is an optional dependency (absent on the GPU machine)
        pytest.importorskip("rdkit", reason="RDKit not installed: the molecule metrics were not run (the resume and "
                                            "the perplexity metrics above passed)")
        run_test_metrics(model, ["molecules"], name, device, precision, tmp_path)
