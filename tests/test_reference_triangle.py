"""DivergenceTriangle against its authors' code, ``enijkamp/triangle`` ``train_cifar10.py`` @0a23e34.

* Two training iterations of the real ``training_step`` (a Lightning ``fit`` at float64 on one fixed batch, so the
  iterations fall in epochs 0 and 1 and see the learning rates ``lr * 0.998`` and ``lr * 0.998^2``), with fixed
  weights and pre-drawn noise, against an independent functional transcription of the reference's equations written
  here: the networks as explicit ops on the parameter tensors, the three losses, gradient-norm clipping and Adam from
  its formulas. Losses, clipped gradients, learning rates and updated parameters of E, I and G agree to 1e-10
  relative, max-norm per tensor (measured: losses 2e-16, gradients 1e-14, updated parameters 7e-13). Run with the
  reference's clip norm 100 (at these sizes it clips G's gradient, norm about 2,300, and not E's or I's) and with
  1e-2 (it clips all three).
* The networks layer by layer at the CIFAR-10 settings (kernels, strides, paddings, biases, BatchNorm settings,
  activations), the parameter counts and the initialisation.
* The per-epoch learning-rate schedule.
"""
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lebm_zoo import DivergenceTriangle
from lebm_zoo.nets import count_parameters

B, NZ, WIDTH, IMG, C = 4, 8, 8, 32, 3
RTOL = 1e-10
BETAS, ADAM_EPS = (0.5, 0.999), 1e-8
LR = {"e": 1e-4, "i": 3e-4, "g": 3e-4}
WEIGHT_DECAY = {"e": 0.0, "i": 0.0, "g": 5e-4}
GAMMA = 0.998
PREFIX = {"e": "energy_net.", "i": "encoder.", "g": "generator."}


# ------------------------------------------------------------------------------- the reference, transcribed
def _bn_train(h, w, b, eps=1e-5):
    """BatchNorm2d in training mode: batch mean and biased batch variance over (B, H, W)."""
    mean = h.mean((0, 2, 3), keepdim=True)
    var = (h - mean).pow(2).mean((0, 2, 3), keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def ref_G(p, z):
    """_netG: four bias-free ConvT (k4; s1 p0, then s2 p1) with BN + ReLU, ConvT(k3 s1 p1, bias), tanh."""
    h = z.view(z.shape[0], -1, 1, 1)
    for i, (s, pad) in zip((0, 3, 6, 9), ((1, 0), (2, 1), (2, 1), (2, 1))):
        h = F.conv_transpose2d(h, p[f"generator.net.{i}.weight"], None, s, pad)
        h = F.relu(_bn_train(h, p[f"generator.net.{i + 1}.weight"], p[f"generator.net.{i + 1}.bias"]))
    return torch.tanh(F.conv_transpose2d(h, p["generator.net.12.weight"], p["generator.net.12.bias"], 1, 1))


def _trunk(p, prefix, x):
    """conv1 (k3 s1 p1) and conv2-4 (k4 s2 p1), no bias, LeakyReLU(0.2) after each."""
    h = x
    for i, (s, pad) in zip((0, 2, 4, 6), ((1, 1), (2, 1), (2, 1), (2, 1))):
        h = F.leaky_relu(F.conv2d(h, p[f"{prefix}{i}.weight"], None, s, pad), 0.2)
    return h


def ref_E(p, x):
    """_netE with energy_form 'identity': conv5 (k4 s1 p0, bias) of the trunk, squeezed to (B,)."""
    h = _trunk(p, "energy_net.net.", x)
    return F.conv2d(h, p["energy_net.net.8.weight"], p["energy_net.net.8.bias"]).view(-1)


def ref_I(p, x):
    """_netI: the trunk (to 8 nif), then conv51 (mu) and conv52 (log variance), k4 s1 p0 with bias."""
    h = _trunk(p, "encoder.trunk.", x)
    mu = F.conv2d(h, p["encoder.mu.weight"], p["encoder.mu.bias"]).flatten(1)
    logvar = F.conv2d(h, p["encoder.logvar.weight"], p["encoder.logvar.bias"]).flatten(1)
    return mu, logvar


def ref_latent_nll(z, mu, logvar):
    """diag_normal_NLL: per sample, 0.5 sum log_sigma + 0.5 sum (z - mu)^2 / (1e-6 + exp(log_sigma))."""
    per_sample = 0.5 * logvar.sum(1) + 0.5 * ((z - mu) ** 2 / (1e-6 + logvar.exp())).sum(1)
    return per_sample.mean()


def ref_recon(pg, pi, x, eps):
    mu, logvar = ref_I(pi, x)
    x_rec = ref_G(pg, eps * torch.exp(0.5 * logvar) + mu)
    return ((x_rec - x) ** 2).sum() / x.shape[0], mu, logvar


def clip(grads, max_norm):
    total = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    return {k: g * coef for k, g in grads.items()} if coef < 1 else grads


def adam(params, grads, state, lr, wd):
    """One Adam step (L2 weight decay added to the gradient) from its formulas; updates ``state`` in place."""
    b1, b2 = BETAS
    state["t"] = state.get("t", 0) + 1
    t, out = state["t"], {}
    for k, p in params.items():
        g = grads[k] + wd * p
        m = b1 * state.get(("m", k), torch.zeros_like(p)) + (1 - b1) * g
        v = b2 * state.get(("v", k), torch.zeros_like(p)) + (1 - b2) * g * g
        state["m", k], state["v", k] = m, v
        out[k] = p - lr * (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + ADAM_EPS)
    return out


def net(params, key):
    return {k: v for k, v in params.items() if k.startswith(PREFIX[key])}


def grad(loss, params):
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def ref_iteration(params, x, noise, states, epoch, max_norm):
    """One reference iteration (lines 293-373). Returns the new parameters and, per net, loss, clipped gradients,
    lr and updated parameters."""
    z, eps_i, eps_g = noise
    pe, pi, pg = (net(params, k) for k in "eig")
    pe, pi, pg = ({k: v.detach().requires_grad_() for k, v in d.items()} for d in (pe, pi, pg))
    lr = {k: LR[k] * GAMMA ** (epoch + 1) for k in LR}  # the schedulers are stepped before each epoch
    out = {}
    samples = ref_G(pg, z)
    # E
    loss_e = ref_E(pe, x).mean() - ref_E(pe, samples.detach()).mean()
    g_e = clip(grad(loss_e, pe), max_norm)
    new_e = adam(pe, g_e, states["e"], lr["e"], WEIGHT_DECAY["e"])
    out["e"] = (loss_e, g_e, lr["e"], new_e)
    # I
    recon, mu, logvar = ref_recon(pg, pi, x, eps_i)
    kld = -0.5 * torch.mean(1 + logvar - mu ** 2 - logvar.exp())
    latent = 0.1 * ref_latent_nll(z, *ref_I(pi, samples.detach()))
    loss_i = 1.0 * (recon + kld) + latent
    g_i = clip(grad(loss_i, pi), max_norm)
    new_i = adam(pi, g_i, states["i"], lr["i"], WEIGHT_DECAY["i"])
    out["i"] = (loss_i, g_i, lr["i"], new_i)
    # G, with the updated E and I
    pe2 = {k: v.detach() for k, v in new_e.items()}
    pi2 = {k: v.detach() for k, v in new_i.items()}
    recon_g, _, _ = ref_recon(pg, pi2, x, eps_g)
    e_f = ref_E(pe2, samples).mean()
    latent_g = 0.1 * ref_latent_nll(z, *ref_I(pi2, samples))
    loss_g = 1.0 * recon_g + e_f + latent_g
    g_g = clip(grad(loss_g, pg), max_norm)
    new_g = adam(pg, g_g, states["g"], lr["g"], WEIGHT_DECAY["g"])
    out["g"] = (loss_g, g_g, lr["g"], new_g)
    new_params = {k: v.detach() for d in (new_e, new_i, new_g) for k, v in d.items()}
    return new_params, out


# ------------------------------------------------------------------------------- our code, instrumented
class _Record(pl.Callback):
    """Per optimiser step: the clipped gradients and lr before it, the parameters after it."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_train_start(self, trainer, pl_module):
        names = {id(p): n for n, p in self.model.named_parameters()}
        for key, opt in zip("eig", trainer.optimizers):
            def pre(o, args, kwargs, key=key):
                ps = [p for g in o.param_groups for p in g["params"]]
                self.steps.append({"net": key, "lr": o.param_groups[0]["lr"],
                                   "grads": {names[id(p)]: p.grad.detach().clone() for p in ps}})

            def post(o, args, kwargs):
                ps = [p for g in o.param_groups for p in g["params"]]
                self.steps[-1]["params"] = {names[id(p)]: p.detach().clone() for p in ps}

            opt.register_step_pre_hook(pre)
            opt.register_step_post_hook(post)


def rel(a, b):
    """Max-norm relative difference of two tensors (or numbers)."""
    a, b = (torch.as_tensor(t, dtype=torch.float64).detach() for t in (a, b))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("max_norm", [100.0, 1e-2], ids=["reference_clip", "clipping_active"])
def test_two_iterations_match_the_reference_transcription(max_norm, monkeypatch):
    torch.manual_seed(0)
    m = DivergenceTriangle(img_size=IMG, channels=C, nz=NZ, ngf=WIDTH, ndf=WIDTH, nif=WIDTH, grad_clip=max_norm)
    m = m.double()
    params0 = {k: v.detach().clone() for k, v in m.named_parameters()}
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, C, IMG, IMG, generator=g, dtype=torch.float64) * 2 - 1
    noise = [torch.randn(B, NZ, generator=g, dtype=torch.float64) for _ in range(6)]  # z, eps_I, eps_G per iteration

    queue = list(noise)

    def fake_randn(*size, **kw):
        size = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        assert size == (B, NZ) and queue, f"unexpected draw of shape {size}"
        return queue.pop(0).to(kw.get("dtype") or torch.float64)

    def fake_randn_like(t, **kw):
        assert t.shape == (B, NZ) and queue, f"unexpected draw of shape {tuple(t.shape)}"
        return queue.pop(0).to(t.dtype)

    losses = []
    backward = m.manual_backward
    monkeypatch.setattr(m, "manual_backward", lambda loss, *a, **k: (losses.append(loss.detach()),
                                                                      backward(loss, *a, **k))[1])
    monkeypatch.setattr(torch, "randn", fake_randn)
    monkeypatch.setattr(torch, "randn_like", fake_randn_like)
    rec = _Record(m)
    trainer = pl.Trainer(accelerator="cpu", precision="64-true", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[rec])
    trainer.fit(m, DataLoader(TensorDataset(x), batch_size=B))  # one batch per epoch: iterations in epochs 0 and 1
    monkeypatch.undo()
    assert trainer.global_step == 2 and not queue and len(losses) == 6 and len(rec.steps) == 6

    params, states, worst = params0, {k: {} for k in "eig"}, {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for it in range(2):
        params, ref = ref_iteration(params, x, noise[3 * it: 3 * it + 3], states, epoch=it, max_norm=max_norm)
        for j, key in enumerate("eig"):
            ours, loss = rec.steps[3 * it + j], losses[3 * it + j]
            ref_loss, ref_grads, ref_lr, ref_params = ref[key]
            assert ours["net"] == key and loss.dtype == torch.float64
            assert ours["lr"] == pytest.approx(ref_lr, rel=1e-15)
            assert set(ours["grads"]) == set(ref_grads) == set(ours["params"])
            errs = {"loss": rel(loss, ref_loss), "grad": max(rel(ours["grads"][k], ref_grads[k]) for k in ref_grads),
                    "param": max(rel(ours["params"][k], ref_params[k]) for k in ref_params)}
            assert max(errs.values()) < RTOL, (it, key, errs)
            worst = {k: max(v, errs[k]) for k, v in worst.items()}
        if max_norm < 1:  # the clipping branch really ran: every clipped gradient has norm max_norm
            for key in "eig":
                total = math.sqrt(sum(float((gr ** 2).sum()) for gr in ref[key][1].values()))
                assert total == pytest.approx(max_norm, rel=1e-4)
    # the model's own parameters are the reference's after both iterations
    assert max(rel(p, params[k]) for k, p in m.named_parameters()) < RTOL
    print("worst relative differences:", {k: f"{v:.1e}" for k, v in worst.items()})


# ------------------------------------------------------------------------------- networks, counts, init
# the reference's layers at its CIFAR-10 settings (nz 100, nc 3, widths 64): (in, out, kernel, stride, padding, bias)
REF_G = [(100, 512, 4, 1, 0, False), (512, 512, 4, 2, 1, False), (512, 256, 4, 2, 1, False),
         (256, 128, 4, 2, 1, False), (128, 3, 3, 1, 1, True)]
REF_E = [(3, 64, 3, 1, 1, False), (64, 128, 4, 2, 1, False), (128, 256, 4, 2, 1, False), (256, 256, 4, 2, 1, False),
         (256, 1, 4, 1, 0, True)]
REF_I = [(3, 64, 3, 1, 1, False), (64, 128, 4, 2, 1, False), (128, 256, 4, 2, 1, False), (256, 512, 4, 2, 1, False),
         (512, 100, 4, 1, 0, True), (512, 100, 4, 1, 0, True)]


def _spec(module, cls):
    return [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0], c.bias is not None)
            for c in module.modules() if type(c) is cls]


def _count(layers, bn_widths=()):
    return sum(i * o * k * k + (o if b else 0) for i, o, k, _, _, b in layers) + sum(2 * w for w in bn_widths)


def test_networks_are_the_reference_layers_with_its_parameter_count():
    m = DivergenceTriangle()  # the CIFAR-10 recipe's settings
    assert _spec(m.generator, nn.ConvTranspose2d) == REF_G
    assert _spec(m.energy_net, nn.Conv2d) == REF_E
    assert _spec(m.encoder, nn.Conv2d) == REF_I
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [512, 512, 256, 128]  # G only; E and I have no normalisation
    assert all(b.eps == 1e-5 and b.momentum == 0.1 and b.affine and b.track_running_stats for b in bns)
    acts = [type(a) for a in m.generator.net if not isinstance(a, (nn.ConvTranspose2d, nn.BatchNorm2d))]
    assert acts == [nn.ReLU] * 4 + [nn.Tanh]
    for trunk in (m.energy_net.net, m.encoder.trunk):
        leaky = [a for a in trunk if isinstance(a, nn.LeakyReLU)]
        assert len(leaky) == 4 and all(a.negative_slope == 0.2 for a in leaky)
    assert isinstance(m.energy_net.net[-1], nn.Conv2d)  # no activation after the energy's last conv
    no_bias = [c for c in m.modules() if isinstance(c, (nn.Conv2d, nn.ConvTranspose2d)) and c.bias is None]
    assert len(no_bias) == 12
    n_g, n_e, n_i = _count(REF_G, [512, 512, 256, 128]), _count(REF_E), _count(REF_I)
    assert (n_g, n_e, n_i) == (7_641_219, 1_709_761, 4_392_840)
    assert (count_parameters(m.generator), count_parameters(m.energy_net), count_parameters(m.encoder)) == \
        (n_g, n_e, n_i)
    assert count_parameters(m) == 13_743_820


def test_initialisation_is_the_reference_weights_init():
    torch.manual_seed(0)
    m = DivergenceTriangle()
    for c in m.modules():
        if isinstance(c, (nn.Conv2d, nn.ConvTranspose2d)) and c.weight.numel() > 10_000:
            assert abs(float(c.weight.std()) - 0.02) < 0.002 and abs(float(c.weight.mean())) < 0.002
    for b in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
        assert abs(float(b.weight.mean()) - 1) < 0.01 and 0.015 < float(b.weight.std()) < 0.025
        assert torch.equal(b.bias, torch.zeros_like(b.bias))
    # the final layers' biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)): not zeroed
    finals = [m.generator.net[-2], m.energy_net.net[-1], m.encoder.mu, m.encoder.logvar]
    for c in finals:
        fan_in = c.weight.shape[1] * c.weight[0, 0].numel()  # torch's fan_in for Conv2d and ConvTranspose2d
        bound = 1 / math.sqrt(fan_in)
        assert c.bias is not None and bool((c.bias != 0).all()) and float(c.bias.abs().max()) <= bound
    assert float(m.encoder.mu.bias.std()) > 0.3 * bound  # spread over the interval, not a constant


def test_learning_rate_of_epoch_e_is_the_base_times_gamma_to_e_plus_one():
    torch.manual_seed(0)
    m = DivergenceTriangle(img_size=28, channels=1, nz=4, ngf=2, ndf=2, nif=2, lr_decay=0.5)
    seen = []

    class LR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, [o.param_groups[0]["lr"] for o in trainer.optimizers]))

    t = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, callbacks=[LR()])
    t.fit(m, DataLoader(TensorDataset(torch.rand(8, 1, 28, 28) * 2 - 1), batch_size=4))  # two batches per epoch
    assert [e for e, _ in seen] == [0, 0, 1, 1, 2, 2]
    for e, lrs in seen:
        assert lrs == pytest.approx([1e-4 * 0.5 ** (e + 1), 3e-4 * 0.5 ** (e + 1), 3e-4 * 0.5 ** (e + 1)], rel=1e-12)
    m.on_train_epoch_start()  # brings the schedulers to epoch current_epoch + 1
    assert all(s.last_epoch == t.current_epoch + 1 for s in m.lr_schedulers())
    lrs = [o.param_groups[0]["lr"] for o in t.optimizers]
    m.on_train_epoch_start()  # again for the same epoch (as after a mid-epoch resume): no further step
    assert [o.param_groups[0]["lr"] for o in t.optimizers] == lrs
