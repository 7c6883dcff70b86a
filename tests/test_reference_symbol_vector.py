"""SymbolVectorLEBM against the authors' update equations (bpucla/ibebm @315b645).

One training iteration of our module (through Lightning, at float64) with fixed weights and our recorded random draws
is compared with a plain-PyTorch transcription written here from the reference's equations, with its defaults:

* the semi-supervised iteration of ``semi_sup_classification.py`` (AGNews; our images take its settings): F steps
  first on ``200 * CE`` at the labelled data's latents (lines 740-754), both unlabelled chains then run with the
  updated F (766-772), G steps (775-791), and F steps again on ``en_pos - en_neg - 100 * MI`` (793-804); F's Adam has
  lr 1e-5, betas (0.9, 0.999) and weight decay 1e-3 (lines 90, 103, 115-116, 593), G's lr 1e-4, betas (0.5, 0.999);
  F is ``Linear - act - Linear - act - Linear`` (``_netE``), the prior chain 100 steps of 0.4;
* the 2-D iteration of ``synthetic_8gaussian.py``: F is ``Linear(2, 200) - GELU - Linear(200, C)`` (lines 129-133),
  the generator loss ``nn.MSELoss()`` (a mean over B x dim), F's loss ``en_pos - en_neg - 15 * MI``, F's Adam lr 1e-4,
  betas (0.9, 0.999), no weight decay (lines 376, 404).

The reference infers z with an encoder; ours with posterior Langevin (a documented deviation, ``docs/fidelity.md``),
so the transcription's latents come from the LEBM posterior chain at the same draws.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from _reference import fit_one_float64_step
from torch import nn

from lebm_zoo import SymbolVectorLEBM

K0, K1, S0, S1, SIGMA, PRIOR_SIG = 3, 2, 0.4, 0.1, 0.3, 1.0
NZ, NGF, NDF, C, B, B_L = 4, 4, 8, 3, 4, 3


def adam(params, grads, state, lr, betas, weight_decay=0.0, eps=1e-8):
    """torch.optim.Adam's update written out (L2 weight decay added to the gradient, bias-corrected moments, eps
    after the square root); ``state`` holds the step count and the moments between calls."""
    b1, b2 = betas
    t = state["t"] = state.get("t", 0) + 1
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g + weight_decay * p
        m, v = state.get(i, (torch.zeros_like(p), torch.zeros_like(p)))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        state[i] = (m, v)
        out.append(p - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps))
    return out


def mi_term(logits, eps=1e-15):
    """The reference's ``compute_mi``: H(y) from the batch-mean class probabilities (with its eps), minus H(y | z)."""
    log_p = F.log_softmax(logits, dim=-1)
    p = log_p.exp()
    log_p_y = torch.log(p.mean(0) + eps)
    return -(log_p_y.exp() * log_p_y).sum() - (-(log_p * p).sum() / logits.shape[0])


def reference_f(model, hidden_layers, act):
    """F as the reference builds it, with our model's weights copied in by position."""
    layers = [nn.Linear(model.hparams.nz, NDF), act()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(NDF, NDF), act()]
    net = nn.Sequential(*layers, nn.Linear(NDF, C)).double()
    ours = list(model.energy_net.parameters())
    assert [p.shape for p in net.parameters()] == [p.shape for p in ours]
    with torch.no_grad():
        for a, b in zip(net.parameters(), ours):
            a.copy_(b)
    return net


class Chains:
    """The LEBM chains on the marginal prior exp(logsumexp F(z)) N(0, I), as functions of explicit weights."""

    def __init__(self, gen, f):
        self.gen, self.f = gen, f

    def energy(self, z, f_params):
        return -torch.logsumexp(torch.func.functional_call(self.f, dict(zip(self._names(), f_params)), (z,)), 1)

    def _names(self):
        return [n for n, _ in self.f.named_parameters()]

    def posterior(self, x, z0, noise, f_params):
        z = z0.clone()
        for k in range(K1):
            z.requires_grad_(True)
            llhd = ((self.gen(z) - x) ** 2).sum() / (2 * SIGMA ** 2)
            (grad,) = torch.autograd.grad(llhd + self.energy(z, f_params).sum(), z)
            z = (z - 0.5 * S1 ** 2 * (grad + z / PRIOR_SIG ** 2) + S1 * noise[k]).detach()
        return z

    def prior(self, z0, noise, f_params):
        z = z0.clone()
        for k in range(K0):
            z.requires_grad_(True)
            (grad,) = torch.autograd.grad(self.energy(z, f_params).sum(), z)
            z = (z - 0.5 * S0 ** 2 * (grad + z / PRIOR_SIG ** 2) + S0 * noise[k]).detach()
        return z

    def logits(self, z, f_params):
        return torch.func.functional_call(self.f, dict(zip(self._names(), f_params)), (z,))


def split_draws(draws, sizes):
    """The recorded draws, in our order, as (init, noises) per chain of ``sizes`` steps."""
    out, i = [], 0
    for k in sizes:
        out.append((draws[i], draws[i + 1:i + 1 + k]))
        i += 1 + k
    assert i == len(draws) and all(d.dtype == torch.float64 for d in draws)
    return out


def test_semi_supervised_iteration_matches_the_agnews_script_in_float64(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = SymbolVectorLEBM(img_size=28, channels=1, nz=NZ, ngf=NGF, ndf=NDF, n_classes=C, prior_steps=K0,
                             posterior_steps=K1, llhd_sigma=SIGMA).double()
    assert model.hparams.class_weight == 200 and model.setting("mi_weight") == 100
    assert model.hparams.update_order == "reference" and model.setting("energy_layers") == 2
    assert SymbolVectorLEBM().hparams.prior_steps == 100 and SymbolVectorLEBM().hparams.prior_step_size == 0.4
    _, opt_e = model.configure_optimizers()[0]
    assert opt_e.defaults["lr"] == 1e-5 and opt_e.defaults["betas"] == (0.9, 0.999)
    assert opt_e.defaults["weight_decay"] == 1e-3
    gen = copy.deepcopy(model.generator)
    f = reference_f(model, 2, nn.GELU)
    g_params0 = [p.detach().clone() for p in model.generator.parameters()]
    f_params0 = [p.detach().clone() for p in f.parameters()]
    g_ = torch.Generator().manual_seed(1)
    x_u = (torch.rand(B, 1, 28, 28, generator=g_) * 2 - 1).double()
    x_l = (torch.rand(B_L, 1, 28, 28, generator=g_) * 2 - 1).double()
    y_l = torch.tensor([0, 2, 1])

    draws, metrics = fit_one_float64_step(model, (x_u, x_l, y_l), tmp_path, monkeypatch)
    (zl0, noise_l), (zu0, noise_u), (zn0, noise_n) = split_draws(draws, [K1, K1, K0])

    chains = Chains(gen, f)
    f_state, g_state = {}, {}
    # 1. F's classification step, at the labelled data's latents (inferred with F as it was)
    z_l = chains.posterior(x_l, zl0, noise_l, f_params0)
    f_params = [p.requires_grad_(True) for p in f_params0]
    loss_cls = F.cross_entropy(chains.logits(z_l, f_params), y_l)
    grads = torch.autograd.grad(200 * loss_cls, f_params)
    f_params = [p.detach() for p in adam(f_params, grads, f_state, 1e-5, (0.9, 0.999), 1e-3)]
    # 2. both unlabelled chains with the updated F
    z_pos = chains.posterior(x_u, zu0, noise_u, f_params)
    z_neg = chains.prior(zn0, noise_n, f_params)
    # 3. G's step
    g_params = [p.requires_grad_(True) for p in g_params0]
    names = [n for n, _ in gen.named_parameters()]
    x_hat = torch.func.functional_call(gen, dict(zip(names, g_params)), (z_pos,))
    loss_g = ((x_hat - x_u) ** 2).sum() / B
    g_new = adam(g_params, torch.autograd.grad(loss_g, g_params), g_state, 1e-4, (0.5, 0.999))
    # 4. F's unlabelled step: en_pos - en_neg - 100 MI, the second step of F's Adam
    f_params = [p.requires_grad_(True) for p in f_params]
    logits_pos = chains.logits(z_pos, f_params)
    loss_e = (-torch.logsumexp(logits_pos, 1)).mean() - chains.energy(z_neg, f_params).mean() - 100 * mi_term(
        logits_pos)
    f_new = adam(f_params, torch.autograd.grad(loss_e, f_params), f_state, 1e-5, (0.9, 0.999), 1e-3)

    assert metrics["train/loss_cls"] == pytest.approx(float(loss_cls.detach()), rel=1e-10)
    assert metrics["train/loss_g"] == pytest.approx(float(loss_g.detach()), rel=1e-10)
    assert metrics["train/loss_e"] == pytest.approx(float(loss_e.detach()), rel=1e-9, abs=1e-12)
    ours = [*model.generator.parameters(), *model.energy_net.parameters()]
    for mine, theirs, old in zip(ours, [*g_new, *f_new], [*g_params0, *f_params0]):
        assert not torch.equal(mine.detach(), old)
        assert torch.allclose(mine.detach(), theirs.detach(), rtol=1e-9, atol=1e-13), (mine - theirs).abs().max()


def test_two_d_iteration_matches_the_2d_script_in_float64(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = SymbolVectorLEBM(dim=2, nz=2, ngf=8, ndf=NDF, n_classes=C, prior_steps=K0, posterior_steps=K1,
                             llhd_sigma=SIGMA).double()
    assert model.setting("mi_weight") == 15 and model.setting("loss_g_reduction") == "mean"
    assert sum(p.numel() for p in SymbolVectorLEBM(dim=2, nz=2, ndf=200, n_classes=8).energy_net.parameters()) == 2208
    _, opt_e = model.configure_optimizers()[0]
    assert opt_e.defaults["lr"] == 1e-4 and opt_e.defaults["betas"] == (0.9, 0.999)
    assert opt_e.defaults["weight_decay"] == 0
    gen = copy.deepcopy(model.generator)
    f = reference_f(model, 1, nn.GELU)
    g_params0 = [p.detach().clone() for p in model.generator.parameters()]
    f_params0 = [p.detach().clone() for p in f.parameters()]
    x = torch.randn(B, 2, generator=torch.Generator().manual_seed(2)).float().double()

    draws, metrics = fit_one_float64_step(model, x, tmp_path, monkeypatch)
    (zu0, noise_u), (zn0, noise_n) = split_draws(draws, [K1, K0])
    chains = Chains(gen, f)
    z_pos = chains.posterior(x, zu0, noise_u, f_params0)
    z_neg = chains.prior(zn0, noise_n, f_params0)
    g_params = [p.requires_grad_(True) for p in g_params0]
    names = [n for n, _ in gen.named_parameters()]
    loss_g = nn.MSELoss()(torch.func.functional_call(gen, dict(zip(names, g_params)), (z_pos,)), x)
    g_new = adam(g_params, torch.autograd.grad(loss_g, g_params), {}, 1e-4, (0.5, 0.999))
    f_params = [p.requires_grad_(True) for p in f_params0]
    logits_pos = chains.logits(z_pos, f_params)
    loss_e = (-torch.logsumexp(logits_pos, 1)).mean() - chains.energy(z_neg, f_params).mean() - 15 * mi_term(
        logits_pos)
    f_new = adam(f_params, torch.autograd.grad(loss_e, f_params), {}, 1e-4, (0.9, 0.999))

    assert metrics["train/loss_g"] == pytest.approx(float(loss_g.detach()), rel=1e-10)
    assert metrics["train/loss_e"] == pytest.approx(float(loss_e.detach()), rel=1e-9, abs=1e-12)
    ours = [*model.generator.parameters(), *model.energy_net.parameters()]
    for mine, theirs in zip(ours, [*g_new, *f_new]):
        assert torch.allclose(mine.detach(), theirs.detach(), rtol=1e-9, atol=1e-13), (mine - theirs).abs().max()


def test_todays_choices_are_named_options():
    """The package's earlier behaviour stays reachable, each as a named option (docs/fidelity.md)."""
    m = SymbolVectorLEBM(dim=2, nz=2, ndf=16, n_classes=C, energy_layers=2, loss_g_reduction="sum", mi_weight=0.0,
                         class_weight=1.0, lr_e=2e-5, betas_e=(0.5, 0.999), weight_decay_e=0.0, update_order="joint")
    assert len([mod for mod in m.energy_net.net if isinstance(mod, nn.Linear)]) == 3
    _, opt_e = m.configure_optimizers()[0]
    assert opt_e.defaults["betas"] == (0.5, 0.999) and opt_e.defaults["lr"] == 2e-5
    x, z = torch.randn(5, 2), torch.randn(5, 2)
    assert torch.allclose(m.generator_loss(x, z), (m.generator(z) - x).pow(2).sum() / 5)
    for bad in ({"update_order": "sometimes"}, {"loss_g_reduction": "max"}, {"energy_layers": 0},
                {"weight_decay_e": -1.0}, {"mi_weight": -1.0}, {"lr_e": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SymbolVectorLEBM(**bad)
