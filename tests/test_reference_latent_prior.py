"""LatentEBMPrior against the reference's update equations (bpucla/latent-space-EBM-prior ``train_svhn.py`` @a530d0f).

One training iteration of our module (through Lightning, at float64) on a fixed batch with fixed weights and the same
random draws is compared with a plain-PyTorch transcription of the reference's iteration written here from its
equations: networks built as the reference builds them, both Langevin chains, the generator and energy losses and
two Adam updates done by hand. Also the reference's learning-rate schedule and early stop.
"""
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _reference import fit_one_float64_step
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lebm_zoo import LatentEBMPrior

NZ, NGF, NDF, B = 6, 4, 8, 4
K0, S0, K1, S1, SIGMA, PRIOR_SIG = 3, 0.4, 2, 0.1, 0.3, 1.0
LR_G, LR_E, BETAS, EPS = 1e-3, 5e-4, (0.5, 0.999), 1e-8


def reference_nets(model):
    """The reference's _netG (32 px, no batch norm, LeakyReLU 0.2, Tanh) and _netE (Linear-GELU x2-Linear), with our
    model's weights copied in by position."""
    g = nn.Sequential(nn.ConvTranspose2d(NZ, NGF * 8, 4, 1, 0), nn.LeakyReLU(0.2),
                      nn.ConvTranspose2d(NGF * 8, NGF * 4, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.ConvTranspose2d(NGF * 4, NGF * 2, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.ConvTranspose2d(NGF * 2, 3, 4, 2, 1), nn.Tanh()).double()
    e = nn.Sequential(nn.Linear(NZ, NDF), nn.GELU(), nn.Linear(NDF, NDF), nn.GELU(), nn.Linear(NDF, 1)).double()
    ours_g = [p for p in model.generator.parameters()]
    ours_e = [p for p in model.energy_net.parameters()]
    assert [p.shape for p in g.parameters()] == [p.shape for p in ours_g]
    assert [p.shape for p in e.parameters()] == [p.shape for p in ours_e]
    with torch.no_grad():
        for a, b in zip(g.parameters(), ours_g):
            a.copy_(b)
        for a, b in zip(e.parameters(), ours_e):
            a.copy_(b)
    return g, e


def adam_step(params, grads, state, lr, betas, eps, t):
    """torch.optim.Adam's update (the reference optimiser), written out: bias-corrected moments, eps after sqrt."""
    b1, b2 = betas
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state.get(i, (torch.zeros_like(p), torch.zeros_like(p)))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        state[i] = (m, v)
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        out.append(p - lr * m_hat / (v_hat.sqrt() + eps))
    return out


def reference_iteration(g, e, x, z_g_0, z_e_0, post_noise, prior_noise):
    """One iteration of train_svhn.py's loop (float64): posterior chain, prior chain, G update, E update."""

    def energy(z):
        return e(z.view(z.shape[0], -1)).squeeze(-1)

    def gen(z):
        return g(z.view(z.shape[0], NZ, 1, 1))

    z = z_g_0.clone()
    for k in range(K1):  # posterior: grad of mse_sum / (2 sigma^2) + sum E + z / sigma_p^2
        z.requires_grad_(True)
        llhd = ((gen(z) - x) ** 2).sum() / (2 * SIGMA ** 2)
        (gz_g,) = torch.autograd.grad(llhd, z)
        (gz_e,) = torch.autograd.grad(energy(z).sum(), z)
        z = (z - 0.5 * S1 ** 2 * (gz_g + gz_e + z / PRIOR_SIG ** 2) + S1 * post_noise[k]).detach()
    z_pos = z
    z = z_e_0.clone()
    for k in range(K0):  # prior: grad of sum E + z / sigma_p^2
        z.requires_grad_(True)
        (gz,) = torch.autograd.grad(energy(z).sum(), z)
        z = (z - 0.5 * S0 ** 2 * (gz + z / PRIOR_SIG ** 2) + S0 * prior_noise[k]).detach()
    z_neg = z
    loss_g = ((gen(z_pos) - x) ** 2).sum() / x.shape[0]
    grads_g = torch.autograd.grad(loss_g, list(g.parameters()))
    loss_e = energy(z_pos).mean() - energy(z_neg).mean()
    grads_e = torch.autograd.grad(loss_e, list(e.parameters()))
    new_g = adam_step(list(g.parameters()), grads_g, {}, LR_G, BETAS, EPS, 1)
    new_e = adam_step(list(e.parameters()), grads_e, {}, LR_E, BETAS, EPS, 1)
    return {"loss_g": loss_g, "loss_e": loss_e, "z_pos": z_pos, "z_neg": z_neg, "g": new_g, "e": new_e}


def test_one_iteration_matches_the_reference_equations_in_float64(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = LatentEBMPrior(img_size=32, channels=3, nz=NZ, ngf=NGF, ndf=NDF, prior_steps=K0, prior_step_size=S0,
                           posterior_steps=K1, posterior_step_size=S1, llhd_sigma=SIGMA, lr_g=LR_G, lr_e=LR_E,
                           betas=BETAS).double()
    x = (torch.rand(B, 3, 32, 32) * 2 - 1).double()  # exactly representable in float32: the loader may cast
    g_ref, e_ref = reference_nets(model)
    before = [p.detach().clone() for p in model.parameters()]
    draws, metrics = fit_one_float64_step(model, x, tmp_path, monkeypatch)

    # our draws, in our order: posterior init, K1 noises, prior init, K0 noises
    d = draws
    assert len(d) == 2 + K0 + K1 and all(v.dtype == torch.float64 for v in d)
    z_g_0, post_noise = d[0], d[1:1 + K1]
    z_e_0, prior_noise = d[1 + K1], d[2 + K1:]
    ref = reference_iteration(g_ref, e_ref, x, z_g_0, z_e_0, post_noise, prior_noise)

    assert metrics["train/loss_g"] == pytest.approx(float(ref["loss_g"]), rel=1e-12)
    assert metrics["train/energy_gap"] == pytest.approx(float(ref["loss_e"]), rel=1e-10, abs=1e-14)
    params = [*model.generator.parameters(), *model.energy_net.parameters()]
    for i, (ours, theirs, old) in enumerate(zip(params, [*ref["g"], *ref["e"]], before)):
        # every tensor was updated, but E's output bias: d(mean E(z+) - mean E(z-))/d bias = 1 - 1 = 0
        assert torch.equal(ours.detach(), old) == (i == len(params) - 1)
        assert torch.allclose(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-14), (ours - theirs).abs().max()


def small_run(tmp_path, epochs, **kw):
    torch.manual_seed(0)
    model = LatentEBMPrior(img_size=28, channels=1, nz=4, ngf=2, ndf=8, prior_steps=1, posterior_steps=1,
                           lr_g=1e-3, lr_e=1e-3, lr_decay=0.5, **kw)
    lrs = []

    class LR(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append([o.param_groups[0]["lr"] for o in trainer.optimizers])

    t = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, callbacks=[LR()], default_root_dir=tmp_path)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    t.fit(model, DataLoader(TensorDataset(x), batch_size=4))
    return model, t, lrs


def test_reference_schedule_trains_epochs_0_1_2_3_at_1_1_gamma_gamma2(tmp_path):
    _, _, lrs = small_run(tmp_path, 4)
    assert [r[0] / 1e-3 for r in lrs] == pytest.approx([1, 1, 0.5, 0.25])
    assert [r[1] / 1e-3 for r in lrs] == pytest.approx([1, 1, 0.5, 0.25])
    _, _, lrs = small_run(tmp_path, 4, lr_schedule="exponential")  # the option: one epoch ahead
    assert [r[0] / 1e-3 for r in lrs] == pytest.approx([1, 0.5, 0.25, 0.125])
    with pytest.raises(ValueError, match="lr_schedule"):
        LatentEBMPrior(lr_schedule="cosine")


def test_reference_early_stop_at_the_end_of_an_epoch_after_the_update(tmp_path):
    # limit 0 after epoch 0: epoch 1 is the first checked one; the reference finishes it (both batches updated)
    model, t, _ = small_run(tmp_path, 5, loss_g_limit=0.0, loss_g_limit_after_epoch=0)
    assert t.global_step == 4 and t.current_epoch == 2  # epochs 0 and 1 trained in full, then the stop
    assert "the reference's early stop" in model.divergence and "end of epoch 1" in model.divergence
    # the stricter option stops at the first batch of epoch 1, before its update
    model, t, _ = small_run(tmp_path, 5, loss_g_limit=0.0, loss_g_limit_after_epoch=0, loss_g_limit_check="per_batch")
    assert t.global_step == 2 and "diverged at epoch 1" in model.divergence
    # a healthy run: the default limit (300 after epoch 10) never fires
    model, t, _ = small_run(tmp_path, 2)
    assert model.divergence is None and t.global_step == 4
    assert math.isclose(model.hparams.loss_g_limit, 300.0) and model.hparams.loss_g_limit_check == "epoch_end"
    with pytest.raises(ValueError, match="loss_g_limit_check"):
        LatentEBMPrior(loss_g_limit_check="sometimes")


def test_reference_generator_is_our_generator_function():
    """Our ConvGenerator (first layer as a GEMM) computes the reference's netG at float64 precision."""
    torch.manual_seed(1)
    model = LatentEBMPrior(img_size=32, channels=3, nz=NZ, ngf=NGF, ndf=NDF).double()
    g, e = reference_nets(model)
    z = torch.randn(3, NZ, dtype=torch.float64)
    assert torch.allclose(model.generator(z), g(z.view(3, NZ, 1, 1)), rtol=1e-12, atol=1e-14)
    assert torch.allclose(model.energy(z), e(z).squeeze(-1), rtol=1e-12, atol=1e-14)
    assert F.gelu is not None  # the reference's GELU is the exact (erf) one, nn.GELU's default
