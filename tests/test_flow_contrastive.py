"""FlowContrastiveEBM: the FCE value by hand, the toy density it learns, the image model, the Glow flow, flow
pretraining and its maximum-likelihood term, CLI recipes."""
import math

import pytest
import torch
from _data import fit_recipe_and_load, fit_steps, fixed_batch

import lebm_zoo
from datamodules import EightGaussiansDataModule
from datamodules.toy import eight_gaussian_centers
from lebm_zoo import FlowContrastiveEBM
from lebm_zoo.callbacks import DensityPlot2D
from lebm_zoo.callbacks.density import grid_log_density
from lebm_zoo.cli import main
from lebm_zoo.flows import Flow


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
    t = fit_steps(m, dm, steps=1200, tmp_path=tmp_path, callbacks=[DensityPlot2D(n=60, every_n_epochs=0)],
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
    t = fit_steps(m, fixed_batch(), steps=3)
    assert t.global_step == 3
    x = m.sample(4)
    assert x.shape == (4, 1, 28, 28) and x.abs().max() <= 1
    assert m.sample(4, refine_steps=2).shape == x.shape
    assert m.log_prob(x, "flow").shape == m.log_prob(x).shape == (4,)


def test_glow_flow_is_exact_and_round_trips():
    """The multiscale Glow: log q of its own samples equals the density it sampled them with, its actnorm's
    data-dependent initialisation travels in the state dict, and shapes it cannot factor are refused."""
    torch.manual_seed(0)
    flow = Flow((1, 28, 28), kind="glow", transforms=2, hidden=8)
    assert len(flow.flow.q0) == 2  # 28 = 7 * 2**2: two levels
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    lp = flow.log_prob(x)  # the first call initialises actnorm from this batch
    assert lp.shape == (16,) and torch.isfinite(lp).all()
    with torch.no_grad():
        u, log_q = flow.flow.sample(8)  # normflows' own density of its draws, in [0, 1] pixel units
    x_s = u * 2 - 1
    assert x_s.shape == (8, 1, 28, 28) and torch.isfinite(x_s).all() and x_s.abs().max() < 1.12  # the logit's range
    torch.testing.assert_close(flow.log_prob(x_s), log_q - 784 * math.log(2.0), atol=1e-3, rtol=1e-4)
    sample = flow.rsample(4)
    sample.pow(2).mean().backward()  # reparameterised: gradients reach the flow's parameters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    again = Flow((1, 28, 28), kind="glow", transforms=2, hidden=8)
    again.load_state_dict(flow.state_dict())
    torch.testing.assert_close(again.log_prob(x[:4]), lp[:4])  # no re-initialisation on a new first batch
    with pytest.raises(ValueError, match="divisible"):
        Flow((1, 28, 28), kind="glow", levels=3)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        Flow((10,), kind="glow")
    with pytest.raises(ValueError, match="kind must be one of"):
        Flow((1, 28, 28), kind="nice")


# ------------------------------------------------------------------------------------------ CLI recipes
@pytest.mark.parametrize("recipe,cls,overrides", [
    ("mnist_fce", FlowContrastiveEBM, ["--model.ndf", "4", "--model.flow_hidden", "16"]),
    ("mnist_fce_glow", FlowContrastiveEBM, ["--model.ndf", "4", "--model.flow_hidden", "8",
                                            "--model.flow_transforms", "1"]),
])
def test_recipe_trains_through_the_cli_and_round_trips(recipe, cls, overrides, tmp_path, capsys, fid_weights_env,
                                                       fake_mnist_dir):
    model = fit_recipe_and_load(recipe, fake_mnist_dir, tmp_path, capsys, *overrides)
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
    t = fit_steps(m, x, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(ebm0, m.energy_net.parameters()))  # only the flow trained
    with torch.no_grad():
        assert float(-m.flow.log_prob(x).mean()) < nll0  # maximum likelihood improved the flow
    assert "train/flow_nll" in t.callback_metrics
    fit_steps(m, x, steps=4)  # iteration 3: the game starts with c set from the batch
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
        fit_steps(m, x, steps=30)
        with torch.no_grad():
            nll[w] = float(-m.flow.log_prob(x).mean())
    assert nll[1.0] < nll[0.0]
    with pytest.raises(ValueError, match="flow_mle_weight"):
        FlowContrastiveEBM(dim=2, flow_mle_weight=-1.0)
