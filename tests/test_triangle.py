"""DivergenceTriangle: the reference defaults and architecture, shapes, the latent NLL, loss signs, checkpoints, the
CLI recipe."""
import math

import pytest
import torch
from _data import fit_recipe_and_load, fit_steps, fixed_batch

import lebm_zoo
from lebm_zoo import CheckpointError, DivergenceTriangle, ShortRunEBM
from lebm_zoo.models.triangle import diag_normal_nll


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
    t = fit_steps(m, x, steps=15)
    gap1, rec1 = state()
    assert gap1 < gap0  # data energy falls relative to generated
    assert rec1 < rec0  # inference + generation reconstruct better
    assert t.global_step == 15  # one count per iteration with three optimisers
    mets = t.callback_metrics
    assert float(mets["train/kl"]) >= 0 and float(mets["train/recon"]) > 0


def test_triangle_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = triangle()
    t = fit_steps(m, fixed_batch(), steps=2, tmp_path=tmp_path)
    t.save_checkpoint(tmp_path / "t.ckpt")
    loaded = lebm_zoo.load_pretrained(tmp_path / "t.ckpt")
    assert isinstance(loaded, DivergenceTriangle)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(CheckpointError, match="not a ShortRunEBM"):
        ShortRunEBM.load_pretrained(tmp_path / "t.ckpt")


# ------------------------------------------------------------------------------------------ CLI recipes
@pytest.mark.parametrize("recipe,cls,overrides", [
    ("mnist_triangle", DivergenceTriangle, ["--model.ngf", "4", "--model.ndf", "4", "--model.nif", "4"]),
])
def test_recipe_trains_through_the_cli_and_round_trips(recipe, cls, overrides, tmp_path, capsys, fid_weights_env,
                                                       fake_mnist_dir):
    model = fit_recipe_and_load(recipe, fake_mnist_dir, tmp_path, capsys, *overrides)
    assert isinstance(model, cls) and model.sample(2).shape == (2, 1, 28, 28)
