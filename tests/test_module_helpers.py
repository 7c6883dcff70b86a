"""The thin helpers every family shares (issue 17): ``EBMModule.data_from_batch``, ``log_train``, ``adam`` and
``refine``; the latent-prior base class; the short-run family's negative-energy names.
Tiny models, one training step each."""
import inspect

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers.logger import Logger
from torch.utils.data import DataLoader, TensorDataset

import lebm_zoo
from lebm_zoo import DataShapeError, EBMModule
from lebm_zoo.models import short_run as short_run_module
from lebm_zoo.models.latent_prior import LatentPriorBase
from lebm_zoo.nets import EnergyMLP, SequenceDecoder
from lebm_zoo.optim import AdamTF
from lebm_zoo.samplers import LangevinSampler
from lebm_zoo.text import Vocabulary


class MemoryLogger(Logger):
    """Keeps what the trainer sends to loggers: ``rows`` of (step, {name: float})."""

    name, version = "memory", 0

    def __init__(self):
        super().__init__()
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, *args, **kwargs):
        pass


def fit(model, loader, max_steps=1):
    logger = MemoryLogger()
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=1, logger=logger, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, loader)
    return trainer, logger


def images(n=4, channels=1, size=28):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


VOCAB = Vocabulary(["a", "b", "c", "d"]).to_list()

# the tiny models, and the keys each family's training step logged before the helpers (logger; progress bar)
FAMILIES = {
    "LatentEBMPrior": (
        lambda: lebm_zoo.LatentEBMPrior(img_size=28, channels=1, nz=8, ngf=4, ndf=16, prior_steps=2, posterior_steps=2),
        {"loss_g", "energy_pos", "energy_neg", "energy_gap", "grad_norm_g", "grad_norm_e"}, {"loss_g", "gap"}),
    "LatentEBMPrior-gaussian": (
        lambda: lebm_zoo.LatentEBMPrior(img_size=28, channels=1, nz=8, ngf=4, prior="gaussian", posterior_steps=2),
        {"loss_g", "grad_norm_g"}, {"loss_g"}),
    "SequenceLatentEBMPrior": (
        lambda: lebm_zoo.SequenceLatentEBMPrior(vocab=VOCAB, nz=2, ndf=8, emb_dim=8, hidden=8, prior_steps=2,
                                                posterior_steps=2),
        {"loss_g", "energy_pos", "energy_neg", "energy_gap", "grad_norm_g", "grad_norm_e"}, {"loss_g", "gap"}),
    "ShortRunEBM": (
        lambda: lebm_zoo.ShortRunEBM(img_size=28, channels=1, nf=4, n_steps=2),
        {"loss", "score_pos", "score_neg", "grad_norm"}, {"gap"}),
    "CoopNets": (
        lambda: lebm_zoo.CoopNets(img_size=28, channels=1, nz=8, ngf=4, ndf=4, n_out=3, n_chains=5,
                                  descriptor_steps=2),
        {"loss_d", "loss_g", "score_pos", "score_neg", "grad_norm_d", "grad_norm_g", "revision_rms"},
        {"loss_g", "gap"}),
    "DivergenceTriangle": (
        lambda: lebm_zoo.DivergenceTriangle(img_size=28, channels=1, nz=8, ngf=4, ndf=4, nif=4),
        {"loss_e", "loss_i", "loss_g", "recon", "kl", "latent_nll", "energy_pos", "energy_neg", "grad_norm_e",
         "grad_norm_i", "grad_norm_g"}, {"recon", "gap"}),
    "FlowContrastiveEBM": (
        lambda: lebm_zoo.FlowContrastiveEBM(dim=2, energy_hidden=8, flow_transforms=2, flow_hidden=8),
        {"value", "accuracy", "log_z", "flow_step"}, {"acc", "V"}),
    "FlowContrastiveEBM-pretrain": (
        lambda: lebm_zoo.FlowContrastiveEBM(dim=2, energy_hidden=8, flow_transforms=2, flow_hidden=8,
                                            flow_pretrain_steps=1),
        {"flow_nll"}, {"nll"}),
    "JointHierarchicalEBMPrior": (
        lambda: lebm_zoo.JointHierarchicalEBMPrior(img_size=28, channels=1, nz=(4, 3), ngf=4, cond_hidden=8,
                                                   cond_layers=1, energy_hidden=8, energy_layers=1, prior_steps=2,
                                                   posterior_steps=2),
        {"loss_g", "loss_cond", "loss_e", "loss_cond_1", "loss_e_1", "loss_e_2", "score_pos_1", "score_neg_1",
         "score_pos_2", "score_neg_2"}, {"loss_g", "gap"}),
}


def loader_for(name, model):
    if name.startswith("Sequence"):
        return DataLoader([model.encode(["a b c", "c b a", "a a", "b"])], batch_size=None)
    if name.startswith("FlowContrastive"):
        return DataLoader(TensorDataset(torch.randn(4, 2).clamp(-1, 1)), batch_size=4)
    return DataLoader(TensorDataset(images()), batch_size=4)


# ------------------------------------------------------------------------------------------------------ log_train
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_logs_exactly_its_keys(name):
    build, train_keys, bar_keys = FAMILIES[name]
    torch.manual_seed(0)
    model = build()
    trainer, logger = fit(model, loader_for(name, model))
    assert len(logger.rows) == 1
    logged = set(logger.rows[0][1]) - {"epoch"}
    assert logged == {f"train/{k}" for k in train_keys}  # to the loggers: train/..., nothing of the progress bar
    assert set(trainer.progress_bar_metrics) == bar_keys  # the progress bar: its own values only
    assert all(v.grad_fn is None and not v.requires_grad for v in trainer.callback_metrics.values())


class _Toy(EBMModule):
    """An EBMModule whose training step logs through ``log_train`` (values with and without a graph, a number)."""

    def __init__(self, with_bar: bool = True):
        super().__init__()
        self.with_bar = with_bar
        self.w = torch.nn.Parameter(torch.tensor(2.0))

    def training_step(self, batch, batch_idx):
        x = self.data_from_batch(batch, (3,))
        loss = (self.w * x).sum()
        self.optimizers().step()  # lr 0: counts the step (manual optimisation), changes nothing
        self.log_train({"loss": loss, "w": self.w, "three": 3.0}, {"bar": 2 * loss} if self.with_bar else None,
                       batch_size=x.shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("with_bar", [True, False])
def test_log_train_logs_train_keys_to_loggers_and_bar_keys_to_the_bar_detached(with_bar):
    x = torch.ones(2, 3)
    trainer, logger = fit(_Toy(with_bar), DataLoader(TensorDataset(x), batch_size=2))
    (step, row), = logger.rows
    assert step == 0 and set(row) - {"epoch"} == {"train/loss", "train/w", "train/three"}
    assert row["train/loss"] == 12.0 and row["train/w"] == 2.0 and row["train/three"] == 3.0
    assert dict(trainer.progress_bar_metrics) == ({"bar": 24.0} if with_bar else {})
    assert all(not v.requires_grad for v in trainer.callback_metrics.values())
    assert "train/loss_epoch" not in trainer.callback_metrics  # on_step only


# ------------------------------------------------------------------------------------------------ data_from_batch
def test_data_from_batch_returns_the_batch_tensor_and_checks_the_shape_with_the_hint():
    m = lebm_zoo.ShortRunEBM(img_size=28, channels=1, nf=4, n_steps=1)
    x = images(2)
    assert m.data_from_batch(x) is x
    assert m.data_from_batch((x, torch.zeros(2))) is x and m.data_from_batch([x]) is x
    assert m.data_from_batch({"x": x, "y": 0}) is x
    with pytest.raises(DataShapeError, match=r"^ShortRunEBM expects items of shape \(1, 28, 28\) but the data has "
                                             r"\(3, 28, 28\)\. Set --model\.channels/--model\.img_size\.$"):
        m.data_from_batch(images(2, channels=3))
    with pytest.raises(DataShapeError, match=r"expects items of shape \(2,\) but the data has \(3,\)\. Try this\.$"):
        m.data_from_batch(torch.zeros(4, 3), (2,), "Try this.")
    with pytest.raises(DataShapeError, match=r"but the data has \(3,\)\.$"):  # a given shape: no hint by default
        m.data_from_batch(torch.zeros(4, 3), (2,))
    with pytest.raises(TypeError, match="expected a batch of images"):
        m.data_from_batch("not a batch")


@pytest.mark.parametrize("model, batch, match", [
    (lambda: lebm_zoo.DivergenceTriangle(img_size=28, channels=1, nz=4, ngf=2, ndf=2, nif=2), images(4, size=32),
     r"DivergenceTriangle expects items of shape \(1, 28, 28\) .* Set --model\.channels/--model\.img_size\."),
    (lambda: lebm_zoo.CoopNets(img_size=28, channels=1, nz=4, ngf=2, ndf=2, n_out=2, n_chains=2),
     images(4, channels=3), r"CoopNets expects items of shape \(1, 28, 28\) but the data has \(3, 28, 28\)"),
    (lambda: lebm_zoo.FlowContrastiveEBM(dim=2, energy_hidden=4, flow_transforms=1, flow_hidden=4),
     torch.zeros(4, 3), r"expects items of shape \(2,\) .* Set --model\.dim or --model\.channels/--model\.img_size\."),
])
def test_training_refuses_a_batch_of_the_wrong_shape_with_the_familys_hint(model, batch, match):
    with pytest.raises(DataShapeError, match=match):
        fit(model(), DataLoader(TensorDataset(batch), batch_size=4))


# ----------------------------------------------------------------------------------------------------------- refine
def _triangle(**kw):
    torch.manual_seed(0)
    return lebm_zoo.DivergenceTriangle(img_size=28, channels=1, nz=4, ngf=2, ndf=4, nif=2, **kw)


def test_refine_with_zero_steps_returns_the_input_itself():
    m = _triangle(refine_steps=3)
    x = images(3)
    assert m.refine(x, n_steps=0) is x
    assert _triangle().refine(x) is x  # refine_steps defaults to 0


@pytest.mark.parametrize("model", [
    _triangle,
    lambda: lebm_zoo.FlowContrastiveEBM(img_size=28, channels=1, ndf=4, flow_transforms=1, flow_hidden=4),
    lambda: lebm_zoo.ShortRunEBM(img_size=28, channels=1, nf=4, n_steps=1),  # no refine hyperparameters: -E = f
])
def test_refine_matches_a_langevin_sampler_run_from_the_same_seed(model):
    m = model()
    x = images(3)
    torch.manual_seed(7)
    got = m.refine(x, n_steps=4, step_size=0.05)
    torch.manual_seed(7)
    want = LangevinSampler(4, 0.05)(lambda xx: -m.energy(xx), x)
    assert torch.equal(got, want) and not torch.equal(got, x)
    assert m.training and all(p.requires_grad for p in m.parameters())  # put back after the chain


def test_refine_defaults_to_the_refine_hyperparameters_and_sample_uses_it():
    m = _triangle(refine_steps=2, refine_step_size=0.03)
    x = images(3)
    torch.manual_seed(3)
    got = m.refine(x)
    torch.manual_seed(3)
    assert torch.equal(got, LangevinSampler(2, 0.03)(lambda xx: -m.energy(xx), x))
    torch.manual_seed(4)
    sampled = m.sample(3)
    torch.manual_seed(4)
    with torch.no_grad():
        drafts = m.generator(torch.randn(3, 4))
    assert torch.equal(sampled, LangevinSampler(2, 0.03)(lambda xx: -m.energy(xx), drafts))


def test_refine_errors():
    with pytest.raises(ValueError, match="n_steps must be >= 0"):
        _triangle().refine(images(2), n_steps=-1)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        _triangle().refine(images(2), n_steps=1, step_size=0.0)
    with pytest.raises(ValueError, match="ShortRunEBM has no refine_step_size hyperparameter"):
        lebm_zoo.ShortRunEBM(img_size=28, channels=1, nf=4).refine(images(2), n_steps=1)


# ------------------------------------------------------------------------------------------------------------- adam
def test_adam_uses_the_betas_hyperparameter_the_class_and_the_extra_arguments():
    tri = _triangle(betas=(0.3, 0.9), weight_decay_g=0.25)
    opt_e, opt_i, opt_g = tri.configure_optimizers()[0]
    assert all(type(o) is torch.optim.Adam and o.defaults["betas"] == (0.3, 0.9) for o in (opt_e, opt_i, opt_g))
    assert (opt_e.defaults["weight_decay"], opt_g.defaults["weight_decay"]) == (0, 0.25)
    opt = tri.adam([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5}], 1e-3, AdamTF, eps=1e-6)
    assert type(opt) is AdamTF and opt.param_groups[0]["lr"] == 0.5 and opt.defaults["lr"] == 1e-3
    assert opt.defaults["betas"] == (0.3, 0.9) and opt.defaults["eps"] == 1e-6


# --------------------------------------------------------------------------------------------- latent-prior classes
def test_image_and_sequence_priors_share_one_base_and_keep_their_hyperparameters_and_keys():
    torch.manual_seed(0)
    image = lebm_zoo.LatentEBMPrior(img_size=28, channels=1, nz=8, ngf=4, ndf=16)
    seq = lebm_zoo.SequenceLatentEBMPrior(vocab=VOCAB, nz=2, ndf=8, emb_dim=8, hidden=8)
    assert isinstance(image, LatentPriorBase) and isinstance(seq, LatentPriorBase)
    assert not isinstance(seq, lebm_zoo.LatentEBMPrior)
    assert lebm_zoo.LatentPriorBase is LatentPriorBase
    for m in (image, seq):  # every constructor argument, in the signature's order, and nothing else
        assert list(m.hparams) == list(inspect.signature(type(m).__init__).parameters)[1:]
    assert seq.hparams.lr_g == 1e-3 and seq.hparams.grad_clip_g == 5.0 and image.hparams.lr_g == 1e-4
    energy = ["energy_net." + k for k in EnergyMLP(nz=2, ndf=8).state_dict()]
    decoder = ["generator." + k for k in SequenceDecoder(len(VOCAB), 2, 8, 8).state_dict()]
    assert list(seq.state_dict()) == energy + decoder
    assert list(image.state_dict())[-6:] == ["energy_net." + k for k in EnergyMLP(nz=8, ndf=16).state_dict()]
    assert set(seq.samplers) == set(image.samplers) == {"prior", "posterior"}


# ----------------------------------------------------------------------------------- short-run names and aliases
def test_neg_energy_is_f_and_the_networks_live_in_their_family_files():
    torch.manual_seed(0)
    m = lebm_zoo.ShortRunEBM(img_size=28, channels=1, nf=4)
    x = images(3)
    f = m.neg_energy(x)
    assert f.shape == (3,) and torch.equal(f, m.score_net(x)) and torch.equal(m.energy(x), -f)
    # the deprecated aliases of 0.1.0's development are gone (issue 31: nothing was released)
    import lebm_zoo.nets as nets

    assert not hasattr(m, "score")
    for name in ("ShortRunScoreNet", "TriangleGenerator", "TriangleEnergy", "TriangleEncoder", "CoopDescriptor",
                 "CoopGenerator"):
        with pytest.raises(AttributeError):
            getattr(nets, name)
    with pytest.raises(AttributeError):
        short_run_module.ShortRunScoreNet  # noqa: B018
    with pytest.raises(ModuleNotFoundError):
        import datamodules.images  # noqa: F401


def test_short_run_checkpoint_keys_are_unchanged_and_old_state_dicts_load():
    """The network stays the attribute ``score_net``: the state-dict keys of checkpoints written before the rename."""
    torch.manual_seed(0)
    m = lebm_zoo.ShortRunEBM(img_size=28, channels=1, nf=4)
    old_keys = ["replay_buffer"] + [f"score_net.net.{i}.{p}" for i in (0, 2, 4, 6, 8) for p in ("weight", "bias")]
    assert list(m.state_dict()) == old_keys
    torch.manual_seed(1)
    old = {k: torch.randn_like(v) for k, v in m.state_dict().items()}  # a state dict with the old keys
    fresh = lebm_zoo.ShortRunEBM(img_size=28, channels=1, nf=4)
    fresh.load_state_dict(old, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], old[k]) for k in old_keys)


@pytest.mark.parametrize("name", ["CoopNets", "DiffusionRecoveryEBM", "ShortRunEBM", "DivergenceTriangle",
                                  "FlowContrastiveEBM"])
def test_every_image_family_samples_images_in_range_and_keeps_the_raw_chain_as_an_option(name):
    # issue 31: CoopNets' revisions and DiffusionRecoveryEBM's x_0 left [-1, 1]; the references clip when they write
    # pixels. Chains made to overshoot (large steps) show that clamp=False returns them as they are.
    from _data import TINY_MODELS

    torch.manual_seed(0)
    m = TINY_MODELS[name]().eval()
    wild = {"CoopNets": dict(n_steps=3), "DiffusionRecoveryEBM": dict(noise_scale=50.0),
            "ShortRunEBM": dict(noise_std=3.0), "DivergenceTriangle": dict(refine_steps=3, refine_step_size=3.0),
            "FlowContrastiveEBM": dict(refine_steps=3, refine_step_size=3.0)}[name]
    if name == "CoopNets":
        m.samplers["descriptor"] = LangevinSampler(3, 3.0)  # a revision that overshoots
    torch.manual_seed(1)
    clipped = m.sample(4, **wild)
    torch.manual_seed(1)
    raw = m.sample(4, clamp=False, **wild)
    assert clipped.min() >= -1 and clipped.max() <= 1
    assert raw.abs().max() > 1  # the raw chain left the range, so the clamp did something
    assert torch.equal(clipped, raw.clamp(-1, 1))


# ------------------------------------------------------------------------------------- autocast and mid-step updates
class _UpdateThenForward(EBMModule):
    """Two layers, each forwarded, updated by its optimiser (the first through ``optimizers()``, the second through
    ``step_uncounted``) and forwarded again in the same training step, as the triangle's G loss follows its E and I
    steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x = self.data_from_batch(batch, (4,))
        opt_a, opt_b = self.optimizers()
        before = self.a(x), self.b(x)
        for opt, y, step in ((opt_a, before[0], opt_a.step), (opt_b, before[1], lambda: self.step_uncounted(opt_b))):
            opt.zero_grad()
            self.manual_backward(y.float().square().sum())
            step()
        self.seen.append((torch.is_autocast_enabled(x.device.type), before, (self.a(x), self.b(x))))

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.5), torch.optim.SGD(self.b.parameters(), lr=0.5)


def test_a_forward_after_a_mid_step_update_uses_the_updated_weights_under_bf16_autocast():
    """Lightning's bf16-mixed runs the whole training step in one autocast region. With torch's autocast cache on,
    a forward after a mid-step update would reuse each weight's bf16 copy from before it; Lightning's region runs with
    the cache off (``cache_enabled=False``), so the families whose later losses follow an update (the triangle's G
    loss, the symbol-vector model's chains after F's step) see the updated weights, as in fp32. This pins that."""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    model = _UpdateThenForward()
    pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(model, DataLoader(TensorDataset(x), 6))
    (autocast, before, after), = model.seen
    assert autocast and after[0].dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh region: the updated weights
        expected = model.a(x), model.b(x)
    for b, a, e in zip(before, after, expected):
        assert not torch.equal(a, b)  # the update shows in the second forward
        torch.testing.assert_close(a.detach(), e, rtol=0, atol=0)
