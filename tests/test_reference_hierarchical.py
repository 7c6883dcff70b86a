"""JointHierarchicalEBMPrior against the reference's joint-training iteration (jcui1224/hierarchical-joint-ebm @26aeb1f,
``joint-training/train_cifar10.py`` and ``joint-training/nets.py``).

One training iteration of our module (through Lightning, at float64) on a fixed batch with fixed weights and the same
random draws is compared with a plain-PyTorch transcription of the reference's iteration, written here from its
equations: its two-layer networks (32 px, tiny widths, the reference's numbers of layers), its Gaussian with
``sigma = exp(log_sigma) + 0.01`` (also for the top layer, at log_sigma = 0), the joint posterior and prior Langevin
updates (each layer's gradient of the batch-summed log-density and of the summed scores, added, then the noise), the
generator loss, the conditional's contrastive loss, the two energy losses, and four Adam steps done by hand.
"""
import math

import pytest
import torch
from _reference import fit_one_float64_step
from torch import nn

from lebm_zoo import JointHierarchicalEBMPrior

NZ1, NZ2, NGF, B = 6, 4, 2, 4  # our ngf 2 = the reference's "ngf" 1: widths 16, 8, 4 (its 16/8/4 x ngf)
COND_H, COND_L = 8, 4  # the reference's 4 hidden layers
E_H, E_L = (8, 5), (3, 2)  # the reference's 3 and 2 hidden layers
K_POST, S_POST, K_PRIOR, S_PRIOR, SIGMA = 3, 0.1, 2, 0.4, 0.3
LR_G, LR_COND, LR_E = 1e-3, 2e-3, (3e-3, 4e-3)  # distinct, to check which rate each network gets
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the reference uses


class RefNormal:
    """The reference's Gaussian: sigma = exp(log_sigma) + 1e-2; log-density per dimension, with its constants."""

    def __init__(self, mu, log_sigma):
        self.mu, self.sigma = mu, torch.exp(log_sigma) + 1e-2

    def log_prob(self, z):
        u = (z - self.mu) / self.sigma
        return -0.5 * u * u - 0.5 * math.log(2 * math.pi) - torch.log(self.sigma)


def mlp(n_in, hidden, n_layers, n_out):
    layers = []
    for i in range(n_layers):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Linear(hidden, n_out)).double()


def reference_nets(model):
    """The reference's _Cifar10_netG (with its width 64 as 1), _netGzi_mlp and two _netEzi, our weights copied in."""
    w = NGF // 2
    g = nn.Sequential(nn.ConvTranspose2d(NZ1, w * 16, 8, 1, 0), nn.LeakyReLU(0.2),
                      nn.ConvTranspose2d(w * 16, w * 8, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.ConvTranspose2d(w * 8, w * 4, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.ConvTranspose2d(w * 4, 3, 3, 1, 1), nn.Tanh()).double()
    cond = mlp(NZ2, COND_H, COND_L, 2 * NZ1)
    e1, e2 = mlp(NZ1, E_H[0], E_L[0], 1), mlp(NZ2, E_H[1], E_L[1], 1)
    pairs = [(g, model.generator), (cond, model.conditionals[0]), (e1, model.energy_nets[0]),
             (e2, model.energy_nets[1])]
    with torch.no_grad():
        for ref, ours in pairs:
            assert [p.shape for p in ref.parameters()] == [p.shape for p in ours.parameters()]
            for a, b in zip(ref.parameters(), ours.parameters()):
                a.copy_(b)
    return g, cond, e1, e2


def adam_step(params, grads, lr):
    """torch.optim.Adam's first step (t = 1) with the reference's defaults, written out."""
    b1, b2 = BETAS
    out = []
    for p, g in zip(params, grads):
        m, v = (1 - b1) * g, (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1), v / (1 - b2)
        out.append(p - lr * m_hat / (v_hat.sqrt() + EPS))
    return out


def reference_iteration(nets, x, zg0, post_noise, ze0, prior_noise, top_sigma):
    """One iteration of the reference's train_step on x (float64): its equations, in its order."""
    g, cond, e1, e2 = nets

    def gen(z1):
        return g(z1.view(-1, NZ1, 1, 1))

    def cond_dist(z2):
        mu, log_sig = cond(z2).chunk(2, dim=1)
        return RefNormal(mu, log_sig)

    def log_p_top(z2):
        if top_sigma is None:  # the reference: Normal(zeros, zeros), i.e. sigma = exp(0) + 0.01
            return RefNormal(torch.zeros_like(z2), torch.zeros_like(z2)).log_prob(z2)
        return -0.5 * (z2 / top_sigma) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(top_sigma)  # the option

    def log_pz(zs):  # compute_log_pz: batch sums
        return cond_dist(zs[1]).log_prob(zs[0]).sum(1).sum() + log_p_top(zs[1]).sum(1).sum()

    def log_px(zs):  # compute_log_px
        recon = ((gen(zs[0]) - x) ** 2).sum(dim=[1, 2, 3]).sum()
        return -1.0 / (2.0 * SIGMA ** 2) * recon + log_pz(zs)

    def en(zs):  # compute_energy: sum over the batch of each layer's score
        return e1(zs[0]).squeeze(1).sum() + e2(zs[1]).squeeze(1).sum()

    def langevin(zs, target, steps, s, noise):
        for k in range(steps):
            zs = [z.detach().requires_grad_(True) for z in zs]
            pz_grad = torch.autograd.grad(target(zs), zs)
            en_grad = torch.autograd.grad(en(zs), zs)
            zs = [z.detach() + 0.5 * s * s * (ge + gp) for z, ge, gp in zip(zs, en_grad, pz_grad)]
            zs = [z + s * n for z, n in zip(zs, noise[k])]
        return [z.detach() for z in zs]

    z_g = langevin(zg0, log_px, K_POST, S_POST, post_noise)
    z_e = langevin(ze0, log_pz, K_PRIOR, S_PRIOR, prior_noise)

    pxgz1 = ((gen(z_g[0]) - x) ** 2).sum(dim=[1, 2, 3]).mean()  # netG[0].loss
    loss_g = (1.0 / (2.0 * SIGMA ** 2)) * pxgz1
    pz1gz2_t = cond_dist(z_g[1]).log_prob(z_g[0]).sum(1).mean()  # netG[1].loss
    pz1gz2_f = cond_dist(z_e[1]).log_prob(z_e[0]).sum(1).mean()
    loss_cond = pz1gz2_f - pz1gz2_t
    e1_t, e1_f = e1(z_g[0]).squeeze(1).mean(), e1(z_e[0]).squeeze(1).mean()
    e2_t, e2_f = e2(z_g[1]).squeeze(1).mean(), e2(z_e[1]).squeeze(1).mean()
    losses = {"loss_g": loss_g, "loss_cond": loss_cond, "loss_e_1": e1_f - e1_t, "loss_e_2": e2_f - e2_t,
              "score_pos_1": e1_t, "score_neg_1": e1_f, "score_pos_2": e2_t, "score_neg_2": e2_f}
    grads, new = [], []
    for net, loss, lr in [(g, loss_g, LR_G), (cond, loss_cond, LR_COND), (e1, e1_f - e1_t, LR_E[0]),
                          (e2, e2_f - e2_t, LR_E[1])]:
        gr = torch.autograd.grad(loss, list(net.parameters()))
        grads += gr
        new += adam_step(list(net.parameters()), gr, lr)
    return losses, grads, new, z_g, z_e


@pytest.mark.parametrize("top_sigma", [None, 1.0], ids=["reference_top_1.01", "option_top_1.0"])
def test_one_iteration_matches_the_reference_equations_in_float64(monkeypatch, tmp_path, top_sigma):
    torch.manual_seed(0)
    kw = {} if top_sigma is None else {"top_prior_sigma": top_sigma}
    model = JointHierarchicalEBMPrior(
        img_size=32, channels=3, nz=(NZ1, NZ2), ngf=NGF, cond_hidden=COND_H, cond_layers=COND_L, energy_hidden=E_H,
        energy_layers=E_L, llhd_sigma=SIGMA, prior_steps=K_PRIOR, prior_step_size=S_PRIOR, posterior_steps=K_POST,
        posterior_step_size=S_POST, lr_g=LR_G, lr_cond=LR_COND, lr_e=LR_E, **kw).double()
    x = (torch.rand(B, 3, 32, 32) * 2 - 1).double()  # exactly representable in float32: the loader may cast
    nets = reference_nets(model)
    before = [p.detach().clone() for p in model.parameters()]
    draws, metrics = fit_one_float64_step(model, x, tmp_path, monkeypatch)

    # our draws, in our order: posterior init, K_POST step noises, prior init, K_PRIOR step noises, each (B, nz1+nz2)
    d = draws
    assert len(d) == 2 + K_POST + K_PRIOR and all(v.dtype == torch.float64 and v.shape == (B, NZ1 + NZ2) for v in d)

    def layers(v):  # the reference draws one tensor per layer: hand it the same numbers
        return [v[:, :NZ1], v[:, NZ1:]]

    zg0, post_noise = layers(d[0]), [layers(v) for v in d[1:1 + K_POST]]
    ze0, prior_noise = layers(d[1 + K_POST]), [layers(v) for v in d[2 + K_POST:]]
    losses, grads, new, z_g, z_e = reference_iteration(nets, x, zg0, post_noise, ze0, prior_noise, top_sigma)

    m = metrics
    for name, value in losses.items():
        assert m[f"train/{name}"] == pytest.approx(float(value.detach()), rel=1e-10, abs=1e-13), name
    assert m["train/loss_e"] == pytest.approx(float(losses["loss_e_1"] + losses["loss_e_2"]), rel=1e-10, abs=1e-13)

    params = list(model.parameters())
    assert len(params) == len(grads) == len(new) == len(before)
    for i, (p, g_ref, p_ref, old) in enumerate(zip(params, grads, new, before)):
        # our gradients (left in .grad by the manual step) are the reference's, hence so are the Adam updates
        assert torch.allclose(p.grad, g_ref, rtol=1e-10, atol=1e-12 * float(g_ref.abs().max())), i
        assert torch.allclose(p.detach(), p_ref, rtol=1e-10, atol=1e-14), (i, float((p - p_ref).abs().max()))
        if float(g_ref.abs().max()) > 0:
            assert not torch.equal(p.detach(), old), i
    # each network got its own learning rate: the first Adam step moves every weight by about lr
    steps = [(p.detach() - old).abs().max().item() for p, old in zip(params, before)]
    n_g, n_c = len(list(model.generator.parameters())), len(list(model.conditionals.parameters()))
    n_e1 = len(list(model.energy_nets[0].parameters()))
    assert steps[0] == pytest.approx(LR_G, rel=1e-3) and steps[n_g] == pytest.approx(LR_COND, rel=1e-3)
    assert steps[n_g + n_c] == pytest.approx(LR_E[0], rel=1e-3)
    assert steps[n_g + n_c + n_e1] == pytest.approx(LR_E[1], rel=1e-3)


def test_reference_generator_and_prior_are_our_functions():
    """Our nets compute the reference's, and our prior log-density has the reference's z-gradient (top 1.01)."""
    torch.manual_seed(1)
    model = JointHierarchicalEBMPrior(img_size=32, channels=3, nz=(NZ1, NZ2), ngf=NGF, cond_hidden=COND_H,
                                      cond_layers=COND_L, energy_hidden=E_H, energy_layers=E_L).double()
    g, cond, e1, e2 = reference_nets(model)
    z1 = torch.randn(3, NZ1, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, NZ2, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(model.generator(z1), g(z1.view(3, NZ1, 1, 1)), rtol=1e-12, atol=1e-14)
    mu, log_sig = cond(z2).chunk(2, dim=1)
    ref = (RefNormal(mu, log_sig).log_prob(z1).sum(1)
           + RefNormal(torch.zeros_like(z2), torch.zeros_like(z2)).log_prob(z2).sum(1)
           + e1(z1).squeeze(1) + e2(z2).squeeze(1))
    ours = model.prior_log_prob([z1, z2])
    # equal up to the constants we drop (2 pi and the top's log 1.01), so equal gradients
    const = -(NZ1 + NZ2) * 0.5 * math.log(2 * math.pi) - NZ2 * math.log(1.01)
    assert torch.allclose(ours + const, ref, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(ours.sum(), [z1, z2])
    gb = torch.autograd.grad(ref.sum(), [z1, z2])
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(ga, gb))
