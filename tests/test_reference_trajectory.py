"""TrajectoryLEBM against the reference's iteration (bpucla/lbebm, ``lbebm_eth.py``: ``LBEBM.forward``, ``train``,
``calculate_loss``, ``sample_langevin_prior_z``; and ``test`` for the evaluation).

One training iteration of our module (reference settings, smaller nets and a shorter chain), through Lightning at
float64 on a fixed batch of windows, is compared with a plain-PyTorch transcription of the reference's equations
written here: relative scaled coordinates, the past encoder, the prior chain ``z <- z - s^2/2 (dE/dz + z / sig^2) +
s eps`` from ``e_init_sig * N(0, I)``, the inference net and reparameterisation, decoder, plan encoder and predictor,
the loss ``2 MSE(plan) + MSE(future) + kld KL_sum + (mean E(z+) - mean E(z-)) + MSE(plan_hat, future_hat[sub-goals])``
with the condition detached inside the EBM, and one Adam step (lr 1e-4, betas (0.9, 0.999), eps 1e-8) done by hand.
"""
import pytest
import torch
from _reference import Recorder, fit_one_float64_step
from torch import nn

from lebm_zoo import TrajectoryLEBM

B, FDIM, ZDIM, K, STEP, SIG, SCALE, KLD = 5, 6, 4, 3, 0.4, 2.0, 60.0, 0.5
SUB = [2, 5, 8, 11]
LR, BETAS, EPS = 1e-4, (0.9, 0.999), 1e-8


def make_model():
    return TrajectoryLEBM(fdim=FDIM, zdim=ZDIM, enc_past_size=[7, 5], enc_dest_size=[6], enc_latent_size=[5, 7],
                          dec_size=[9, 6, 8], predictor_size=[8, 7, 6], non_local_theta_size=[4],
                          non_local_phi_size=[4], non_local_g_size=[4], non_local_dim=4, ebm_hidden=9, e_l_steps=K,
                          e_l_steps_pcd=K, memory_size=1000, kld_coeff=KLD)


def windows(seed=0):
    """Walks of 20 steps in metres, exactly representable in float32 (the loader may cast)."""
    g = torch.Generator().manual_seed(seed)
    steps = 0.4 * torch.randn(B, 20, 2, generator=g, dtype=torch.float64) + torch.tensor([0.5, 0.1]).double()
    return (torch.randn(B, 1, 2, generator=g, dtype=torch.float64) * 5 + steps.cumsum(1)).float().double()


def mlp(sizes):
    """The reference's MLP: Linear, ReLU, ..., Linear."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def reference_nets(model):
    """The reference's networks with our weights copied in by position (every Linear, in creation order)."""
    nets = {"past": mlp([16, 7, 5, FDIM]), "dest": mlp([8, 6, FDIM]), "latent": mlp([2 * FDIM, 5, 7, 2 * ZDIM]),
            "dec": mlp([FDIM + ZDIM, 9, 6, 8, 8]), "pred": mlp([2 * FDIM, 8, 7, 6, 24]),
            "ebm": nn.Sequential(nn.Linear(ZDIM + FDIM, 9), nn.GELU(), nn.Linear(9, 9), nn.GELU(),
                                 nn.Linear(9, 1)).double()}
    ours = {"past": model.encoder_past, "dest": model.encoder_dest, "latent": model.encoder_latent,
            "dec": model.decoder, "pred": model.predictor, "ebm": model.EBM}
    with torch.no_grad():
        for k, net in nets.items():
            mine = list(ours[k].parameters())
            assert [p.shape for p in net.parameters()] == [p.shape for p in mine], k
            for a, b in zip(net.parameters(), mine):
                a.copy_(b.double())
    return nets


def reference_iteration(nets, w, z0, noise, eps, sign=1.0):
    """The reference's train() body for one batch; returns (loss terms, grads by net, new params by net).
    ``sign=-1`` flips the sign of the contrastive term: a broken transcription, for the check that the test can fail."""
    src, trg = w[:, :8], w[:, 8:]
    x = ((src - src[:, -1:]) * SCALE).reshape(B, -1)
    y = (trg - src[:, -1:]) * SCALE
    dest = y[:, SUB].reshape(B, -1)
    future = y.reshape(B, -1)

    def ebm(z, cond):  # energy = -logsumexp of the outputs, condition detached
        return -nets["ebm"](torch.cat([z, cond.detach()], 1)).logsumexp(1)

    ftraj = nets["past"](x)
    z = z0.double().clone()
    for n in noise:
        z.requires_grad_(True)
        grad = torch.autograd.grad(ebm(z, ftraj).sum(), z)[0]
        z = (z - 0.5 * STEP * STEP * (grad + z / (SIG * SIG)) + STEP * n).detach()
    latent = nets["latent"](torch.cat([ftraj, nets["dest"](dest)], 1))
    mu, logvar = latent[:, :ZDIM], latent[:, ZDIM:]
    z_g = eps * logvar.mul(0.5).exp() + mu
    dest_recon = nets["dec"](torch.cat([ftraj, z_g], 1))
    pred = nets["pred"](torch.cat([ftraj, nets["dest"](dest_recon)], 1))
    cd = ebm(z_g, ftraj).mean() - ebm(z, ftraj).mean()
    mse = nn.MSELoss()
    dest_loss, future_loss = mse(dest, dest_recon), mse(future, pred)
    subgoal = mse(dest_recon, pred.view(B, 12, 2)[:, SUB].reshape(B, -1))
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    loss = 2 * dest_loss + future_loss + KLD * kl + sign * cd + subgoal
    params = [p for net in nets.values() for p in net.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    new = []
    for p, g in zip(params, grads):  # Adam's first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected
        if g is None:
            new.append(p.detach().clone())
            continue
        m_hat, v_hat = g, g * g
        new.append((p - LR * m_hat / (v_hat.sqrt() + EPS)).detach())
    return {"loss": loss, "dest_loss": dest_loss, "future_loss": future_loss, "kld": kl, "cd": cd,
            "subgoal_reg": subgoal}, z, new


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_iteration_equals_the_reference(sign, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = make_model().double()
    nets = reference_nets(model)
    w = windows()
    draws, metrics = fit_one_float64_step(model, w, tmp_path, monkeypatch)

    # our draws, in the reference's order: the chain's initial states (float32, as there), K step noises, the
    # reparameterisation noise
    assert len(draws) == 2 + K, [d.shape for d in draws]
    assert draws[0].dtype == torch.float32 and draws[0].shape == (B, ZDIM)
    z0 = 2.0 * draws[0].double()
    losses, z_neg, new = reference_iteration(nets, w, z0, draws[1:1 + K], draws[1 + K], sign)

    ours = [p for net in (model.encoder_past, model.encoder_dest, model.encoder_latent, model.decoder,
                          model.predictor, model.EBM) for p in net.parameters()]
    close = all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(ours, new))
    same_losses = all(abs(metrics[f"train/{k}"] - float(v.detach())) <= 1e-9 * max(1.0, abs(float(v.detach())))
                      for k, v in losses.items())
    if sign == 1.0:
        assert same_losses, {k: (metrics[f"train/{k}"], float(v)) for k, v in losses.items()}
        assert close
        assert torch.allclose(model.memory[:B], z_neg) and model.memory_count == B  # the chain's end states
    else:  # the broken transcription must be told apart
        assert not (same_losses and close)


def test_evaluation_is_the_reference_best_of_k(monkeypatch):
    """ADE/FDE of the reference's test(): best plan by L2 distance to the true plan, FDE from its last point, ADE from
    the predictor's future for it, in metres."""
    torch.manual_seed(1)
    model = make_model().double().eval()
    nets = reference_nets(model)
    w = windows(seed=3)
    rec = Recorder(monkeypatch)
    ade, fde = model.best_of_k_errors(w, k=4)
    monkeypatch.undo()
    src, trg = w[:, :8], w[:, 8:]
    x = ((src - src[:, -1:]) * SCALE).reshape(B, -1)
    y = (trg - src[:, -1:]) * SCALE
    plan = y[:, SUB].reshape(B, -1)
    ftraj = nets["past"](x)
    draws = iter(rec.draws)
    plans = []
    for _ in range(4):  # each sample: its own chain from fresh noise, then the decoder
        z = 2.0 * next(draws).double()
        for _ in range(K):
            z.requires_grad_(True)
            e = -nets["ebm"](torch.cat([z, ftraj.detach()], 1)).logsumexp(1)
            g = torch.autograd.grad(e.sum(), z)[0]
            z = (z - 0.5 * STEP * STEP * (g + z / (SIG * SIG)) + STEP * next(draws)).detach()
        plans.append(nets["dec"](torch.cat([ftraj, z], 1)).detach())
    plans = torch.stack(plans)
    best = plans[(plans - plan).norm(dim=-1).argmin(0), torch.arange(B)]
    ref_fde = (best[:, -2:] - plan[:, -2:]).norm(dim=1) / SCALE
    fut = nets["pred"](torch.cat([ftraj, nets["dest"](best)], 1)).detach().view(B, 12, 2)
    ref_ade = (y - fut).norm(dim=-1).mean(-1) / SCALE
    assert torch.allclose(fde, ref_fde, rtol=1e-9) and torch.allclose(ade, ref_ade, rtol=1e-9)
