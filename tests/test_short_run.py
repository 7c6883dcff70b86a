"""ShortRunEBM: shapes, update signs, the replay buffer in checkpoints, reconstruction, the CLI recipe."""

import pytest
import torch
from _data import fit_steps, fixed_batch, recipe_fit_args

import lebm_zoo
from lebm_zoo import CheckpointError, LatentEBMPrior, ShortRunEBM
from lebm_zoo.cli import main
from lebm_zoo.samplers import LangevinSampler


def shortrun(**kw):
    cfg = dict(img_size=28, channels=1, nf=8, n_steps=10)
    cfg.update(kw)
    return ShortRunEBM(**cfg)


# ------------------------------------------------------------------------------------------------ ShortRunEBM
def test_shortrun_defaults_are_the_reference_ones():
    m = ShortRunEBM()
    hp = m.hparams
    assert (hp.img_size, hp.channels, hp.nf, hp.n_steps, hp.noise_std, hp.data_noise, hp.lr) == \
        (32, 3, 64, 100, 0.01, 0.03, 1e-4)
    assert tuple(hp.betas) == (0.9, 0.999) and hp.init == "uniform" and hp.grad_clip is None
    convs = [mod for mod in m.score_net.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == \
        [(3, 64, 3, 1), (64, 128, 4, 2), (128, 256, 4, 2), (256, 512, 4, 2), (512, 1, 4, 1)]
    s = m.samplers["train"]  # x <- x + 1 * grad f + 0.01 eps
    assert s.n_steps == 100 and s.step_size ** 2 / 2 == pytest.approx(1.0)
    assert s.step_size * s.noise_scale == pytest.approx(0.01)
    assert m.replay_buffer.shape[0] == 0


@pytest.mark.parametrize("img_size,channels", [(28, 1), (32, 3), (64, 3)])
def test_shortrun_public_methods_shapes(img_size, channels):
    m = shortrun(img_size=img_size, channels=channels, n_steps=2).eval()
    x = m.sample(3)
    assert x.shape == (3, channels, img_size, img_size) and x.dtype == torch.float32
    assert m.energy(x).shape == (3,)
    x, trace = m.sample(3, n_steps=4, return_trace=True)
    assert trace["log_prob"].shape == (4,)


def test_shortrun_sample_follows_the_tempered_update():
    """One step from x0 equals x0 + grad f(x0) + noise_std * eps with the same eps."""
    m = shortrun()
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    torch.manual_seed(3)
    x1 = m.sample(4, n_steps=1, noise_std=0.05, x0=x0, clamp=False)  # the raw chain
    x = x0.clone().requires_grad_(True)
    grad = torch.autograd.grad(m.neg_energy(x).sum(), x)[0]
    torch.manual_seed(3)
    expected = x0 + grad + 0.05 * torch.randn_like(x0)
    assert torch.allclose(x1, expected, atol=1e-5)


def test_gaussian_reference_form_adds_the_reference_term():
    m = shortrun(form="gaussian_reference", ref_sigma=0.5)
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    expected = m.neg_energy(x) - x.flatten(1).pow(2).sum(1) / (2 * 0.25)
    assert torch.allclose(m.log_prob(x), expected) and torch.allclose(m.energy(x), -expected)
    assert m.samplers["train"].step_size == 0.002  # textbook Langevin with delta


def test_shortrun_update_sign_raises_data_scores_relative_to_samples():
    torch.manual_seed(0)
    m = shortrun()
    x = fixed_batch()
    x_q = m.sample(16)

    def gap():
        with torch.no_grad():
            return float(m.neg_energy(x).mean() - m.neg_energy(x_q).mean())

    before = gap()
    fit_steps(m, x, steps=5)
    assert gap() > before + 1e-3


def test_persistent_buffer_is_updated_and_survives_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = shortrun(init="persistent", buffer_size=20, reinit_prob=0.0)
    start = m.replay_buffer.clone()
    t = fit_steps(m, fixed_batch(), steps=2, tmp_path=tmp_path)
    assert not torch.equal(m.replay_buffer, start)  # chains were written back
    ckpt = tmp_path / "m.ckpt"
    t.save_checkpoint(ckpt)
    assert torch.equal(torch.load(ckpt, weights_only=True)["state_dict"]["replay_buffer"], m.replay_buffer)
    loaded = lebm_zoo.load_pretrained(ckpt)
    assert isinstance(loaded, ShortRunEBM) and torch.equal(loaded.replay_buffer, m.replay_buffer)
    assert loaded.sample(2).shape == (2, 1, 28, 28)
    with pytest.raises(CheckpointError, match="not a LatentEBMPrior"):
        LatentEBMPrior.load_pretrained(ckpt)


def test_data_init_starts_chains_at_the_data():
    m = shortrun(init="data")
    x = fixed_batch(4)
    x0, idx = m._chain_init(x)
    assert idx is None and torch.equal(x0, x)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="init must be one of"):
        shortrun(init="buffer")
    with pytest.raises(ValueError, match="form must be one of"):
        shortrun(form="textbook")


def test_unrolled_chain_matches_the_sampler_and_is_differentiable():
    s = LangevinSampler(5, 0.3)
    target = torch.tensor([1.0, -2.0])

    def log_prob(x):
        return -0.5 * (x - target).pow(2).sum(1)

    x0 = torch.zeros(3, 2, requires_grad=True)
    noise = torch.randn(5, 3, 2)
    xk = s.unroll(log_prob, x0, noise)
    # Gaussian target: each step is affine, x <- (1 - s^2/2) x + (s^2/2) target + s eps, so dx_K/dx0 = (1-s^2/2)^K
    (g,) = torch.autograd.grad(xk.sum(), x0)
    assert torch.allclose(g, torch.full_like(g, (1 - 0.045) ** 5))
    with pytest.raises(ValueError, match="noise must have shape"):
        s.unroll(log_prob, x0, noise[:2])


def test_reconstruction_by_optimising_the_initial_noise_beats_a_fresh_chain():
    torch.manual_seed(0)
    m = shortrun(n_steps=5)
    fit_steps(m, fixed_batch(), steps=3)
    x = fixed_batch(4, seed=1)
    rec = m.reconstruct(x, n_iters=30, lr=0.1, progress=False)
    assert rec.shape == x.shape
    fresh = m.sample(4, n_steps=5)
    assert (rec - x).pow(2).mean() < 0.5 * (fresh - x).pow(2).mean()


# ------------------------------------------------------------------------------------------------ CLI recipes
@pytest.mark.parametrize("recipe,cls,overrides", [
    ("mnist_shortrun", ShortRunEBM, ["--model.n_steps", "3"]),
])
def test_recipe_trains_through_the_cli_and_loads(recipe, cls, overrides, tmp_path, capsys, fid_weights_env,
                                                 fake_mnist_dir):
    args = recipe_fit_args(recipe, fake_mnist_dir, tmp_path, *overrides)
    # the recipe's FID callback sets up (weights: fid_weights_env) but runs at epoch ends, which 2 steps do not reach
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    (last,) = tmp_path.rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["lebm_zoo"]["recipe"] == recipe
    model = lebm_zoo.load_pretrained(tmp_path)
    assert isinstance(model, cls)
    assert model.sample(2).shape == (2, 1, 28, 28)


def test_energy_l2_penalty_keeps_scores_small():
    """The score-magnitude penalty (a stabiliser mnist_shortrun uses) bounds |f| where the plain loss lets it grow."""
    mags = {}
    for l2 in (0.0, 1.0):
        torch.manual_seed(0)
        m = shortrun(energy_l2=l2, lr=1e-2)
        fit_steps(m, fixed_batch(), steps=8)
        with torch.no_grad():
            mags[l2] = float(m.neg_energy(fixed_batch()).abs().mean())
    assert mags[1.0] < 0.5 * mags[0.0]
    with pytest.raises(ValueError, match="energy_l2"):
        shortrun(energy_l2=-1.0)
