"""JointHierarchicalEBMPrior: shapes, the joint density by hand, hierarchical resampling, training, checkpoints."""
import math

import pytest
import torch
from _data import fit_steps, fixed_batch, recipe_fit_args

import lebm_zoo
from lebm_zoo import JointHierarchicalEBMPrior
from lebm_zoo.cli import main


def tiny(**kw):
    cfg = dict(img_size=28, channels=1, nz=(6, 4), ngf=4, cond_hidden=8, cond_layers=1, energy_hidden=8,
               energy_layers=1, prior_steps=3, posterior_steps=3)
    cfg.update(kw)
    return JointHierarchicalEBMPrior(**cfg)


def test_defaults_are_the_reference_joint_training_ones():
    m = JointHierarchicalEBMPrior()
    hp = m.hparams
    assert tuple(hp.nz) == (128, 100) and hp.llhd_sigma == 0.3
    assert (hp.prior_steps, hp.prior_step_size, hp.posterior_steps, hp.posterior_step_size) == (60, 0.4, 40, 0.1)
    assert (hp.lr_e, hp.lr_g, hp.lr_cond, tuple(hp.betas)) == (2e-5, 1e-4, 1e-4, (0.9, 0.999))
    assert hp.top_prior_sigma == 1.01 and hp.min_sigma == 0.01  # the reference's N(0, (exp(0) + 0.01)^2) top
    opt_g, opt_e = m.configure_optimizers()  # the reference's four Adams as parameter groups
    assert [g["lr"] for g in opt_g.param_groups] == [1e-4, 1e-4] and [g["lr"] for g in opt_e.param_groups] == [2e-5] * 2
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and g["weight_decay"] == 0
               for g in opt_g.param_groups + opt_e.param_groups)
    assert [len(g["params"]) for g in opt_g.param_groups] == [8, 10]
    assert [len(g["params"]) for g in opt_e.param_groups] == [8, 6]
    cond = [mod for mod in m.conditionals[0] if isinstance(mod, torch.nn.Linear)]
    assert [(c.in_features, c.out_features) for c in cond] == [(100, 200)] + [(200, 200)] * 3 + [(200, 256)]
    f1 = [mod.out_features for mod in m.energy_nets[0] if isinstance(mod, torch.nn.Linear)]
    f2 = [mod.out_features for mod in m.energy_nets[1] if isinstance(mod, torch.nn.Linear)]
    assert f1 == [200, 200, 200, 1] and f2 == [100, 100, 1]
    g = [mod for mod in m.generator.modules() if isinstance(mod, torch.nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in g] == \
        [(128, 1024, 8), (1024, 512, 4), (512, 256, 4), (256, 3, 3)]


@pytest.mark.parametrize("nz", [(6,), (6, 4), (6, 4, 3)])
def test_public_methods_shapes_for_one_to_three_layers(nz):
    m = tiny(nz=nz).eval()
    x = m.sample(5)
    assert x.shape == (5, 1, 28, 28) and x.abs().max() <= 1
    zs = m.infer_latent(x)
    assert [z.shape for z in zs] == [(5, n) for n in nz]
    assert m.log_joint(x, zs).shape == (5,) and m.energy(zs).shape == (5,)
    assert m.reconstruct(x).shape == x.shape


def test_log_joint_matches_a_hand_computation():
    torch.manual_seed(0)
    m = tiny()
    x = fixed_batch(3)
    z1, z2 = torch.randn(3, 6), torch.randn(3, 4)
    with torch.no_grad():
        mu, log_sigma = m.conditionals[0](z2).chunk(2, 1)
        sigma = log_sigma.exp() + 0.01
        f = m.energy_nets[0](z1).squeeze(-1) + m.energy_nets[1](z2).squeeze(-1)
        expected = (-(x - m.generator(z1)).flatten(1).pow(2).sum(1) / (2 * 0.09) + f
                    - 0.5 * (z2 / 1.01).pow(2).sum(1) + (-0.5 * ((z1 - mu) / sigma).pow(2) - sigma.log()).sum(1))
        got = m.log_joint(x, [z1, z2])
        packed = m.log_joint(x, torch.cat([z1, z2], 1))
    assert torch.allclose(got, expected, atol=1e-4) and torch.allclose(got, packed)
    assert math.isfinite(float(got.sum()))


def test_per_layer_learning_rates_and_top_sigma_option():
    m = tiny(nz=(6, 4, 3), lr_e=(1e-3, 2e-3, 3e-3), lr_g=4e-3, lr_cond=(5e-3, 6e-3))
    opt_g, opt_e = m.configure_optimizers()
    assert [g["lr"] for g in opt_g.param_groups] == [4e-3, 5e-3, 6e-3]
    assert [g["lr"] for g in opt_e.param_groups] == [1e-3, 2e-3, 3e-3]
    groups = [{id(p) for p in g["params"]} for g in opt_g.param_groups + opt_e.param_groups]
    nets = [m.generator, *m.conditionals, *m.energy_nets]
    assert groups == [{id(p) for p in net.parameters()} for net in nets]
    with pytest.raises(ValueError, match="lr_e needs one entry per layer"):
        tiny(lr_e=(1e-3,))
    with pytest.raises(ValueError, match="lr_cond needs one entry per conditional"):
        tiny(lr_cond=(1e-3, 1e-3))
    with pytest.raises(ValueError, match="top_prior_sigma"):
        tiny(top_prior_sigma=0.0)
    z = [torch.randn(2, 6), torch.randn(2, 4)]
    unit, ref = tiny(top_prior_sigma=1.0), tiny()
    ref.load_state_dict(unit.state_dict())
    with torch.no_grad():  # only the top layer's Gaussian term differs
        diff = ref.prior_log_prob(z) - unit.prior_log_prob(z)
    assert torch.allclose(diff, 0.5 * z[1].pow(2).sum(1) * (1 - 1 / 1.01 ** 2), atol=1e-5)


def test_resample_below_keeps_the_layers_above():
    torch.manual_seed(0)
    m = tiny(nz=(6, 4, 3)).eval()
    zs = m.infer_latent(fixed_batch(4))
    out = m.resample_below(zs, 1)
    assert torch.equal(out[1], zs[1]) and torch.equal(out[2], zs[2]) and not torch.equal(out[0], zs[0])
    out = m.resample_below(zs, 2)
    assert torch.equal(out[2], zs[2]) and not torch.equal(out[1], zs[1])
    assert all(torch.equal(a, b) for a, b in zip(m.resample_below(zs, 0), zs))
    with pytest.raises(ValueError, match="k must be in 0..3"):
        m.resample_below(zs, 4)


def test_anomaly_scores_full_and_llr():
    torch.manual_seed(0)
    m = tiny().eval()
    x = fixed_batch(4)
    torch.manual_seed(1)
    s = m.anomaly_score(x)
    torch.manual_seed(1)
    z = m.infer_latent(x)
    assert s.shape == (4,) and torch.allclose(s, -m.log_joint(x, z))
    assert m.anomaly_score(x, k=1).shape == (4,)


def test_training_updates_signs_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = tiny(lr_e=1e-2)
    x = fixed_batch()
    t = fit_steps(m, x, 4, tmp_path, shuffle=False)
    assert t.global_step == 4
    mets = t.callback_metrics
    assert {"train/loss_g", "train/loss_cond", "train/loss_e", "train/score_pos_1", "train/score_neg_2"} <= set(mets)
    t.save_checkpoint(tmp_path / "h.ckpt")
    loaded = lebm_zoo.load_pretrained(tmp_path / "h.ckpt")
    assert isinstance(loaded, JointHierarchicalEBMPrior) and loaded.nz == [6, 4]
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))


def test_mnist_hierarchical_recipe_trains_through_the_cli(tmp_path, capsys, fid_weights_env, fake_mnist_dir):
    code = main(recipe_fit_args("mnist_hierarchical", fake_mnist_dir, tmp_path,
                                "--model.ngf", "4", "--model.prior_steps", "2", "--model.posterior_steps", "2"))
    assert code == 0, capsys.readouterr().err
    assert isinstance(lebm_zoo.load_pretrained(tmp_path), JointHierarchicalEBMPrior)
