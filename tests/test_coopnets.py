"""CoopNets: defaults, shapes, the descriptor's Langevin, update signs, generator inference, the CLI recipe."""

import pytest
import torch
from _data import fit_steps, fixed_batch, recipe_fit_args

import lebm_zoo
from lebm_zoo import CoopNets
from lebm_zoo.cli import main


def coop(**kw):
    cfg = dict(img_size=28, channels=1, nz=8, ngf=4, ndf=8, n_out=10, n_chains=12, descriptor_steps=3)
    cfg.update(kw)
    return CoopNets(**cfg)


# ------------------------------------------------------------------------------------------------ CoopNets
def test_coopnets_defaults_are_the_official_tf_ones():
    m = CoopNets()
    hp = m.hparams
    assert (hp.nz, hp.n_chains, hp.descriptor_steps, hp.descriptor_step_size, hp.descriptor_sigma) == \
        (100, 144, 15, 0.002, 0.016)
    assert (hp.generator_steps, hp.generator_sigma, hp.lr_d, hp.lr_g, tuple(hp.betas)) == \
        (0, 0.3, 0.007, 1e-4, (0.5, 0.999))
    assert hp.descriptor_noise and m.samplers["descriptor"].noise_scale == 1.0
    assert (hp.adam, hp.generator_langevin_grad, hp.data_scaling) == ("tf", "batch_mean", "reference")
    assert m.descriptor.net[-1].out_features == 100


@pytest.mark.parametrize("img_size,channels", [(28, 1), (32, 3), (64, 3)])
def test_coopnets_sample_draft_and_refined(img_size, channels):
    m = coop(img_size=img_size, channels=channels).eval()
    torch.manual_seed(0)
    draft = m.sample(6, refine=False)
    torch.manual_seed(0)
    refined = m.sample(6, refine=True)
    assert draft.shape == refined.shape == (6, channels, img_size, img_size)
    assert draft.abs().max() <= 1 and not torch.equal(draft, refined)


def test_coopnets_descriptor_langevin_is_the_reference_update():
    """Y <- Y - (delta^2/2)(Y/sigma_d^2 - grad f(Y)) + delta eps."""
    m = coop(descriptor_steps=1)
    y0 = torch.rand(4, 1, 28, 28) * 2 - 1
    torch.manual_seed(5)
    y1 = m.revise(y0)
    y = y0.clone().requires_grad_(True)
    grad_f = torch.autograd.grad(m.neg_energy(y).sum(), y)[0]
    torch.manual_seed(5)
    d, sd = 0.002, 0.016
    expected = y0 - d ** 2 / 2 * (y0 / sd ** 2 - grad_f) + d * torch.randn_like(y0)
    assert torch.allclose(y1, expected, atol=1e-6)


def test_coopnets_updates_raise_data_scores_and_pull_the_generator_to_the_revisions():
    torch.manual_seed(0)
    m = coop(lr_g=1e-2)
    x = fixed_batch()
    z = torch.randn(12, 8)

    def state():
        with torch.no_grad():
            y = m.revise(m.generator(z))
            return float(m.neg_energy(x).mean() - m.neg_energy(y).mean()), float((y - m.generator(z)).pow(2).mean())

    gap0, _ = state()
    t = fit_steps(m, x, steps=5)
    gap1, _ = state()
    assert gap1 > gap0  # descriptor: observed data up relative to revised samples
    assert t.global_step == 5  # one step per iteration although two optimisers step
    assert {"train/loss_d", "train/loss_g", "train/revision_rms"} <= set(t.callback_metrics)


def test_coopnets_generator_inference_option_runs_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    m = coop(generator_steps=2)
    t = fit_steps(m, fixed_batch(), steps=2, tmp_path=tmp_path)
    t.save_checkpoint(tmp_path / "c.ckpt")
    loaded = lebm_zoo.load_pretrained(tmp_path / "c.ckpt")
    assert isinstance(loaded, CoopNets) and loaded.hparams.generator_steps == 2
    assert loaded.sample(3).shape == (3, 1, 28, 28)


# ------------------------------------------------------------------------------------------------ CLI recipe
def test_recipe_trains_through_the_cli_and_loads(tmp_path, capsys, fid_weights_env, fake_mnist_dir):
    args = recipe_fit_args("mnist_coopnets", fake_mnist_dir, tmp_path, "--model.n_chains", "10",
                           "--model.descriptor_steps", "2")
    # the recipe's FID callback sets up (weights: fid_weights_env) but runs at epoch ends, which 2 steps do not reach
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["lebm_zoo"]["recipe"] == "mnist_coopnets"
    model = lebm_zoo.load_pretrained(tmp_path)
    assert isinstance(model, CoopNets)
    assert model.sample(2).shape == (2, 1, 28, 28)
