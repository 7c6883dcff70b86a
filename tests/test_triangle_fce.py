"""DivergenceTriangle and FlowContrastiveEBM: loss signs, the toy density FCE learns, CLI recipes, checkpoints."""
import math

import pytest
import pytorch_lightning as pl
import torch
from _data import fixed_batch, write_mnist
from torch.utils.data import DataLoader, TensorDataset

import lebm_zoo
from datamodules import EightGaussiansDataModule
from datamodules.toy import eight_gaussian_centers
from lebm_zoo import CheckpointError, DivergenceTriangle, FlowContrastiveEBM, ShortRunEBM
from lebm_zoo.callbacks import DensityPlot2D
from lebm_zoo.callbacks.density import grid_log_density
from lebm_zoo.cli import main
from lebm_zoo.models.triangle import diag_normal_nll


def fit(model, data, steps, tmp_path=None, **kw):
    cfg = dict(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    cfg.update(kw)
    t = pl.Trainer(**cfg)
    if isinstance(data, torch.Tensor):
        data = DataLoader(TensorDataset(data, torch.zeros(len(data))), batch_size=8, shuffle=True)
    t.fit(model, data)
    return t


def triangle(**kw):
    cfg = dict(img_size=28, channels=1, nz=8, ngf=4, ndf=4, nif=4)
    cfg.update(kw)
    return DivergenceTriangle(**cfg)


# ------------------------------------------------------------------------------------------ DivergenceTriangle
def test_triangle_defaults_and_architecture_are_the_reference_ones():
    m = DivergenceTriangle()
    hp = m.hparams
    assert (hp.nz, hp.lr_e, hp.lr_g, hp.lr_i, tuple(hp.betas), hp.weight_decay_g, hp.grad_clip, hp.lr_decay) == \
        (100, 1e-4, 3e-4, 3e-4, (0.5, 0.999), 5e-4, 100.0, 0.998)
    assert hp.latent_weight == 0.1 and hp.vae_weight == 1.0 and hp.kl_weight == 1.0
    g = [mod for mod in m.generator.modules() if isinstance(mod, torch.nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in g] == [(100, 512), (512, 512), (512, 256), (256, 128), (128, 3)]
    e = [mod for mod in m.energy_net.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in e] == [64, 128, 256, 256, 1]
    assert [c.bias is not None for c in g] == [False] * 4 + [True]  # only the output layers have a bias
    assert [c.bias is not None for c in e] == [False] * 4 + [True]
    assert m.encoder.mu.out_channels == m.encoder.logvar.out_channels == 100
    opt_e, opt_i, opt_g = m.configure_optimizers()[0]
    assert opt_g.defaults["weight_decay"] == 5e-4 and opt_e.defaults["weight_decay"] == 0


@pytest.mark.parametrize("img_size,channels", [(28, 1), (32, 3), (64, 3)])
def test_triangle_public_methods_shapes(img_size, channels):
    m = triangle(img_size=img_size, channels=channels).eval()
    x = m.sample(3)
    assert x.shape == (3, channels, img_size, img_size) and x.abs().max() <= 1
    assert m.infer_latent(x).shape == (3, 8) and m.reconstruct(x).shape == x.shape and m.energy(x).shape == (3,)
    refined = m.sample(3, refine_steps=2)
    assert refined.shape == x.shape


def test_latent_nll_matches_torch_distributions_up_to_its_constant():
    """Per sample, summed over the latent dimensions, without (nz / 2) log 2 pi; the reference's 1e-6 added to the
    variance changes it by far less than the tolerance at these variances."""
    z, mu, logvar = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 3) * 2 - 1
    ref = -torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(1)
    assert torch.allclose(diag_normal_nll(z, mu, logvar) + 1.5 * math.log(2 * math.pi), ref, atol=1e-4)


def test_triangle_losses_have_the_reference_signs():
    """After steps on a fixed batch: E lowers data energy relative to G's samples, I's reconstruction improves,
    and the KL term is a mean (not a sum) over entries."""
    torch.manual_seed(0)
    m = triangle(lr_e=1e-3, lr_i=1e-3, lr_g=1e-3)
    x = fixed_batch()

    def state():
        with torch.no_grad():
            m.eval()
            xg = m.sample(16)
            out = float(m.energy(x).mean() - m.energy(xg).mean()), float((m.reconstruct(x) - x).pow(2).mean())
            m.train()
            return out

    gap0, rec0 = state()
    t = fit(m, x, steps=15)
    gap1, rec1 = state()
    assert gap1 < gap0  # data energy falls relative to generated
    assert rec1 < rec0  # inference + generation reconstruct better
    assert t.global_step == 15  # one count per iteration with three optimisers
    mets = t.callback_metrics
    assert float(mets["train/kl"]) >= 0 and float(mets["train/recon"]) > 0


def test_triangle_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = triangle()
    t = fit(m, fixed_batch(), steps=2, tmp_path=tmp_path)
    t.save_checkpoint(tmp_path / "t.ckpt")
    loaded = lebm_zoo.load_pretrained(tmp_path / "t.ckpt")
    assert isinstance(loaded, DivergenceTriangle)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(CheckpointError, match="not a ShortRunEBM"):
        ShortRunEBM.load_pretrained(tmp_path / "t.ckpt")


# ------------------------------------------------------------------------------------------ FlowContrastiveEBM
def test_fce_value_and_accuracy_match_a_hand_computation():
    """V = mean_data[log p - logaddexp(log p, log q)] + mean_flow[log q - logaddexp(log p, log q)], with the EBM made
    the constant -c, so log p is known exactly."""
    torch.manual_seed(0)
    m = FlowContrastiveEBM(dim=2)
    with torch.no_grad():
        m.energy_net.net[-1].weight.zero_()
        m.energy_net.net[-1].bias.zero_()
        m.log_z.fill_(2.5)
        x_data, x_flow = torch.randn(64, 2), m.flow.sample(32)
        v, acc = m.value(x_data, x_flow)
        lq_d, lq_f = m.flow.log_prob(x_data), m.flow.log_prob(x_flow)
    lp = torch.tensor(-2.5)
    assert torch.allclose(m.log_prob(x_data).detach(), lp.expand(64))
    expected_v = (lp - torch.logaddexp(lp, lq_d)).mean() + (lq_f - torch.logaddexp(lp, lq_f)).mean()
    expected_acc = ((lp >= lq_d).sum() + (lq_f > lp).sum()) / 96
    assert v.item() == pytest.approx(expected_v.item(), rel=1e-5)
    assert acc.item() == pytest.approx(expected_acc.item())
    assert v.item() < 0  # a log-likelihood of labels
    with pytest.raises(ValueError, match="model must be"):
        m.log_prob(x_data, "vae")


def test_fce_learns_the_eight_gaussians_density(tmp_path):
    """FCE on the 2-D toy: the EBM's normalised log-density on held-out points beats the flow's alone, and its mass
    concentrates on the eight modes."""
    torch.manual_seed(0)
    dm = EightGaussiansDataModule(n_train=600_000, n_val=2000, n_test=2000, batch_size=500)
    m = FlowContrastiveEBM(dim=2)
    t = fit(m, dm, steps=1200, tmp_path=tmp_path, callbacks=[DensityPlot2D(n=60, every_n_epochs=0)],
            limit_val_batches=0)
    assert t.callbacks[0].last_path.exists()  # final.png with the three panels
    dm.setup()
    x = dm.test_set.tensors[0]
    with torch.no_grad():
        lp_ebm_grid, area = grid_log_density(m.log_prob, 3.0, 150)  # numerically normalised on [-3, 3]^2
        lp_flow = m.log_prob(x, "flow").mean()
        lp_ebm = m.log_prob(x, "ebm").mean()
    assert lp_ebm > lp_flow  # the EBM improves on its noise distribution
    xs = torch.linspace(-3, 3, 150)
    yy, xx = torch.meshgrid(xs, xs, indexing="ij")
    near = torch.cdist(torch.stack([xx.flatten(), yy.flatten()], 1), eight_gaussian_centers()).min(1).values < 0.3
    mass = (lp_ebm_grid.exp().flatten() * area)[near].sum()
    assert near.float().mean() < 0.07 and mass > 0.35  # > 5x the share of the area within 3 sigma of a mode


def test_fce_image_model_trains_and_samples():
    torch.manual_seed(0)
    m = FlowContrastiveEBM(img_size=28, channels=1, ndf=4, flow_transforms=2, flow_hidden=16)
    t = fit(m, fixed_batch(), steps=3)
    assert t.global_step == 3
    x = m.sample(4)
    assert x.shape == (4, 1, 28, 28) and x.abs().max() <= 1
    assert m.sample(4, refine_steps=2).shape == x.shape
    assert m.log_prob(x, "flow").shape == m.log_prob(x).shape == (4,)


# ------------------------------------------------------------------------------------------ CLI recipes
@pytest.mark.parametrize("recipe,cls,overrides", [
    ("mnist_triangle", DivergenceTriangle, ["--model.ngf", "4", "--model.ndf", "4", "--model.nif", "4"]),
    ("mnist_fce", FlowContrastiveEBM, ["--model.ndf", "4", "--model.flow_hidden", "16"]),
])
def test_recipe_trains_through_the_cli_and_round_trips(recipe, cls, overrides, tmp_path, capsys, fid_weights_env):
    data = tmp_path / "mnist"
    data.mkdir()
    write_mnist(data)
    args = ["fit", "--recipe", recipe, "--data.data_dir", str(data), "--data.download", "false",
            "--data.val_size", "4", "--data.batch_size", "8", "--data.num_workers", "0",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), *overrides]
    code = main(args)
    assert code == 0, capsys.readouterr().err
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2
    model = lebm_zoo.load_pretrained(last)
    assert isinstance(model, cls) and model.sample(2).shape == (2, 1, 28, 28)


def test_toy2d_fce_recipe_plots_densities(tmp_path, capsys):
    code = main(["fit", "--recipe", "toy2d_fce", "--data.n_train", "2000", "--data.n_val", "500",
                 "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert list(tmp_path.rglob("density/final.png"))
    assert isinstance(lebm_zoo.load_pretrained(tmp_path), FlowContrastiveEBM)


def test_fce_flow_pretraining_then_balanced_start():
    torch.manual_seed(0)
    m = FlowContrastiveEBM(img_size=28, channels=1, ndf=4, flow_transforms=2, flow_hidden=16, flow_pretrain_steps=3,
                           lr_flow=1e-2)
    x = fixed_batch()
    with torch.no_grad():
        nll0 = float(-m.flow.log_prob(x).mean())
    ebm0 = [p.clone() for p in m.energy_net.parameters()]
    t = fit(m, x, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(ebm0, m.energy_net.parameters()))  # only the flow trained
    with torch.no_grad():
        assert float(-m.flow.log_prob(x).mean()) < nll0  # maximum likelihood improved the flow
    assert "train/flow_nll" in t.callback_metrics
    fit(m, x, steps=4)  # iteration 3: the game starts with c set from the batch
    assert float(m.log_z) != 1.0
    with pytest.raises(ValueError, match="flow_pretrain_steps"):
        FlowContrastiveEBM(dim=2, flow_pretrain_steps=-1)


def test_fce_flow_mle_term_is_added_to_the_flow_step():
    """Same seed and data, with and without the maximum-likelihood term: with it the flow fits the data better."""
    x = torch.randn(256, 2) * 0.3 + 2.0
    nll = {}
    for w in (0.0, 1.0):
        torch.manual_seed(0)
        m = FlowContrastiveEBM(dim=2, flow_mle_weight=w, accuracy_threshold=0.5)
        fit(m, x, steps=30)
        with torch.no_grad():
            nll[w] = float(-m.flow.log_prob(x).mean())
    assert nll[1.0] < nll[0.0]
    with pytest.raises(ValueError, match="flow_mle_weight"):
        FlowContrastiveEBM(dim=2, flow_mle_weight=-1.0)
