"""ShortRunEBM against the reference's iteration (enijkamp/short_run @d779e9a, ``train_cifar10_minimal.py``).

One training iteration of our module with its default (reference) settings but shorter chains, through Lightning at
float64, on a fixed batch with fixed weights and the same random draws, is compared with a plain-PyTorch
transcription of the reference's loop written here from its equations: the data noise ``x + 0.03 eps``, chains from
U[-1, 1] run for K steps of ``x <- x + (grad_x sum f(x) + 0.01 eps)`` (the reference's K = 100, here 10), the loss
``-(mean f(x_data) - mean f(x_q))`` and one Adam step (lr 1e-4, betas (0.9, 0.999), eps 1e-8) done by hand.
"""
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lebm_zoo import ShortRunEBM

NF, B = 4, 4
SIGMA, NOISE, LR, BETAS, EPS = 3e-2, 1e-2, 1e-4, (0.9, 0.999), 1e-8  # the reference's values
K = 10  # the reference's chains have 100 steps (our default); 10 keep this float64 test fast, with the same update


class Recorder:
    """Wraps torch.randn_like / torch.rand: records every draw our step makes, in order, with its kind."""

    def __init__(self, monkeypatch):
        self.draws = []
        randn_like, rand = torch.randn_like, torch.rand

        def rec_like(x, *a, **k):
            t = randn_like(x, *a, **k)
            self.draws.append(("normal", t.detach().clone()))
            return t

        def rec_rand(*a, **k):
            t = rand(*a, **k)
            self.draws.append(("uniform", t.detach().clone()))
            return t

        monkeypatch.setattr(torch, "randn_like", rec_like)
        monkeypatch.setattr(torch, "rand", rec_rand)


def reference_net(model):
    """The reference's F (32 px, width NF), our weights copied in by position."""
    f = nn.Sequential(nn.Conv2d(3, NF, 3, 1, 1), nn.LeakyReLU(0.2),
                      nn.Conv2d(NF, NF * 2, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.Conv2d(NF * 2, NF * 4, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.Conv2d(NF * 4, NF * 8, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.Conv2d(NF * 8, 1, 4, 1, 0)).double()
    ours = list(model.score_net.parameters())
    assert [p.shape for p in f.parameters()] == [p.shape for p in ours]
    with torch.no_grad():
        for a, b in zip(f.parameters(), ours):
            a.copy_(b)
    return lambda x: f(x).squeeze(), f


def reference_iteration(f, net, x, data_eps, u, chain_eps, sign=1.0):
    """One iteration of the reference's loop (float64); ``sign=-1`` is a broken transcription, for the check."""
    x_p_d = (x + SIGMA * data_eps).detach()  # sample_p_d: noise(x)
    x_k = u * 2 - 1  # sample_p_0: the same uniform draws mapped to U[-1, 1]
    for k in range(K):  # sample_q
        x_k = x_k.detach().requires_grad_(True)
        (f_prime,) = torch.autograd.grad(f(x_k).sum(), [x_k])
        x_k = x_k.detach() + (f_prime + NOISE * chain_eps[k])
    x_q = x_k.detach()
    f_pos, f_neg = f(x_p_d).mean(), f(x_q).mean()
    big_l = f_pos - f_neg
    params = list(net.parameters())
    grads = torch.autograd.grad(-sign * big_l, params)
    b1, b2 = BETAS
    deltas = []
    for g in grads:  # Adam's first step, written out
        m, v = (1 - b1) * g, (1 - b2) * g * g
        deltas.append(-LR * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + EPS))
    return {"loss": -big_l, "score_pos": f_pos, "score_neg": f_neg, "grads": grads, "deltas": deltas, "x_q": x_q}


class KeepMetrics(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


def run_ours(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = ShortRunEBM(nf=NF, n_steps=K).double()  # every other setting is the default, i.e. the reference's
    x = (torch.rand(B, 3, 32, 32) * 2 - 1).double()  # exactly representable in float32: the loader may cast
    f, net = reference_net(model)
    before = [p.detach().clone() for p in model.parameters()]
    rec = Recorder(monkeypatch)
    keep = KeepMetrics()
    t = pl.Trainer(accelerator="cpu", precision="64-true", max_steps=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, callbacks=[keep],
                   default_root_dir=tmp_path)
    t.fit(model, DataLoader(TensorDataset(x.float()), batch_size=B))
    monkeypatch.undo()
    # our draws, in our order (the reference's): data noise, the chains' uniform init, one noise per step
    kinds = [k for k, _ in rec.draws]
    assert kinds == ["normal", "uniform"] + ["normal"] * K
    d = [v for _, v in rec.draws]
    assert all(v.dtype == torch.float64 and v.shape == (B, 3, 32, 32) for v in d)
    return model, keep.metrics, before, (f, net, x, d[0], d[1], d[2:])


def matches(model, before, ref):
    """Per parameter: are our gradient (left in .grad by the manual step) and our Adam update the reference's?"""
    return [torch.allclose(p.grad, g, rtol=1e-10, atol=1e-12 * float(g.abs().max()))
            and torch.allclose(p.detach() - old, delta, rtol=1e-10, atol=1e-16)
            for p, old, g, delta in zip(model.parameters(), before, ref["grads"], ref["deltas"])]


def test_one_iteration_matches_the_reference_equations_in_float64(monkeypatch, tmp_path):
    model, m, before, args = run_ours(monkeypatch, tmp_path)
    ref = reference_iteration(*args)
    assert m["train/loss"] == pytest.approx(float(ref["loss"].detach()), rel=1e-10, abs=1e-14)
    assert m["train/score_pos"] == pytest.approx(float(ref["score_pos"].detach()), rel=1e-10, abs=1e-14)
    assert m["train/score_neg"] == pytest.approx(float(ref["score_neg"].detach()), rel=1e-10, abs=1e-14)
    ok = matches(model, before, ref)
    assert all(ok), ok
    # the comparison sees a sign error: the transcription with the loss's sign flipped matches no parameter but the
    # output bias, whose gradient d(mean f(x+) - mean f(x-))/d bias = 1 - 1 is 0 either way
    assert matches(model, before, reference_iteration(*args, sign=-1.0)) == [False] * (len(ok) - 1) + [True]
    assert float(ref["grads"][-1].abs().max()) == 0.0


def test_reference_chain_is_our_sampler():
    """Our tempered sampler is the reference's ``x += grad f(x) + 0.01 eps`` at float64."""
    torch.manual_seed(2)
    model = ShortRunEBM(nf=NF, n_steps=K).double()
    f, _ = reference_net(model)
    x0 = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 2 - 1
    torch.manual_seed(5)
    ours = model.sample(3, x0=x0, clamp=False)  # the raw chain
    torch.manual_seed(5)
    eps = [torch.randn_like(x0) for _ in range(K)]
    x = x0
    for k in range(K):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(x).sum(), [x])
        x = x.detach() + (g + NOISE * eps[k])
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, x, rtol=1e-12, atol=1e-13)
