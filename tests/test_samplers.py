"""Samplers against targets with known moments, and the contract of DESIGN.md."""
import math

import pytest
import torch
from torch import nn

from lebm_zoo.samplers import HMCSampler, LangevinSampler, SamplerMixin

MU = torch.tensor([1.0, -1.0])
COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]])
PREC = torch.linalg.inv(COV)


def gaussian_log_prob(x):
    d = x - MU
    return -0.5 * ((d @ PREC) * d).sum(1)


def mixture_log_prob(x, w=0.3, m=1.5, s=1.0):
    """0.3 N(-1.5, 1) + 0.7 N(1.5, 1), x of shape (B, 1)."""
    x = x[:, 0]
    a = math.log(w) - 0.5 * ((x + m) / s) ** 2
    b = math.log(1 - w) - 0.5 * ((x - m) / s) ** 2
    return torch.logaddexp(a, b)


def test_langevin_matches_correlated_gaussian_moments():
    torch.manual_seed(0)
    sampler = LangevinSampler(n_steps=1000, step_size=0.2)
    x = sampler(gaussian_log_prob, torch.randn(4000, 2) * 3)
    assert x.shape == (4000, 2)
    assert torch.allclose(x.mean(0), MU, atol=0.07)
    # ULA: stationary variance sigma^2 / (1 - s^2 / (4 sigma^2)) per eigendirection: +0.01 on the 0.2 one here;
    # the slow direction (variance 1.8) contracts by exp(-1000 s^2 / 3.6) = e^-11; 4000 chains: SE ~0.02
    assert torch.allclose(torch.cov(x.T), COV, atol=0.08)


def test_hmc_matches_two_component_mixture_and_reports_acceptance():
    torch.manual_seed(0)
    sampler = HMCSampler(n_steps=300, n_leapfrog=8, step_size=0.3)
    x, trace = sampler(mixture_log_prob, torch.randn(3000, 1) * 2, return_trace=True)
    mean = 0.3 * -1.5 + 0.7 * 1.5  # 0.6
    var = 1.0 + 0.3 * 0.7 * 3.0 ** 2  # 2.89
    assert abs(x.mean().item() - mean) < 0.1
    assert abs(x.var().item() - var) < 0.2
    assert abs((x > 0).float().mean().item() - 0.7) < 0.04  # mass of the right mode (0.7, up to overlap)
    assert trace["log_prob"].shape == (300,) and trace["acceptance_rate"].shape == (300,)
    acc = trace["acceptance_rate"].mean().item()
    assert 0.5 < acc <= 1.0


def test_hmc_rejects_everything_when_steps_are_absurd():
    torch.manual_seed(0)
    sampler = HMCSampler(n_steps=5, n_leapfrog=5, step_size=50.0)
    x0 = torch.zeros(200, 1)
    x, trace = sampler(lambda x: -0.5 * x[:, 0] ** 2 * 100, x0, return_trace=True)
    assert trace["acceptance_rate"].max() < 0.05
    assert (x == 0).float().mean() > 0.95


def test_tempered_update_is_the_short_run_form():
    """x <- x + grad f(x) + sigma * eps (Nijkamp et al. 2019)."""
    s = LangevinSampler.tempered(n_steps=1, noise_std=0.0)
    x0 = torch.tensor([[2.0], [-4.0]])
    x = s(lambda x: -0.25 * x[:, 0] ** 2, x0)  # grad f = -x/2: x + grad f = x/2
    assert torch.allclose(x, x0 / 2)
    torch.manual_seed(0)
    s = LangevinSampler.tempered(n_steps=1, noise_std=0.01)
    x = s(lambda x: x.sum(1) * 0, torch.zeros(20000, 1))
    assert abs(x.std().item() - 0.01) < 5e-4


def test_langevin_update_and_trace_with_no_noise():
    s = LangevinSampler(n_steps=3, step_size=0.5, noise_scale=0.0)
    # log p = -x^2/2: x <- x - (s^2/2) x = (1 - 0.125) x
    x, trace = s(lambda x: -0.5 * (x ** 2).sum(1), torch.ones(4, 2), return_trace=True)
    assert torch.allclose(x, torch.full((4, 2), 0.875 ** 3))
    expected = torch.tensor([-1.0, -(0.875 ** 2), -(0.875 ** 4)])  # mean log-prob at the start of each step
    assert torch.allclose(trace["log_prob"], expected)


def test_grad_clip_bounds_each_chains_step():
    s = LangevinSampler(n_steps=1, step_size=1.0, noise_scale=0.0, grad_clip=1.0)
    x0 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    x = s(lambda x: (x * torch.tensor([[100.0, 0.0], [0.1, 0.0]])).sum(1), x0)
    assert torch.allclose(x, torch.tensor([[0.5, 0.0], [0.05, 0.0]]))  # (s^2/2) * clipped grad


class Target(SamplerMixin, nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.drop = nn.Dropout(0.5)
        self.samplers = {"langevin": LangevinSampler(5, 0.1), "hmc": HMCSampler(3, 2, 0.1)}
        self.seen_training = []

    def log_prob(self, x):
        self.seen_training.append(self.training)
        assert not any(p.requires_grad for p in self.parameters())
        return self.lin(x).squeeze(-1) - 0.5 * (x ** 2).sum(1)


def test_chains_leave_parameter_grads_untouched_and_run_under_no_grad():
    torch.manual_seed(0)
    t = Target().train()
    t.lin.weight.grad = torch.full_like(t.lin.weight, 7.0)
    x0 = torch.randn(16, 3)
    with torch.no_grad():
        x = t.langevin(t.log_prob, x0)
        y, trace = t.hmc(t.log_prob, x0, return_trace=True)
    assert torch.equal(t.lin.weight.grad, torch.full_like(t.lin.weight, 7.0))
    assert t.lin.bias.grad is None
    assert not x.requires_grad and x.shape == x0.shape and not torch.equal(x, x0)
    assert y.shape == x0.shape and trace["acceptance_rate"].shape == (3,)
    # parameters trainable again, module back in train mode; it ran in eval mode
    assert all(p.requires_grad for p in t.parameters()) and t.training
    assert set(t.seen_training) == {False}


def test_mixin_restores_state_after_an_error_and_rejects_wrong_sampler_kind():
    t = Target().train()

    def bad(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        t.langevin(bad, torch.zeros(2, 3))
    assert all(p.requires_grad for p in t.parameters()) and t.training
    with pytest.raises(TypeError, match="HMCSampler"):
        t.langevin(t.log_prob, torch.zeros(2, 3), sampler="hmc")


def test_bad_arguments_and_bad_targets_are_reported():
    with pytest.raises(ValueError, match="step_size"):
        LangevinSampler(10, 0.0)
    with pytest.raises(ValueError):
        HMCSampler(10, 0, 0.1)
    with pytest.raises(ValueError, match="one value per chain"):
        LangevinSampler(1, 0.1)(lambda x: x.sum(), torch.zeros(4, 2))


def test_dtype_device_and_shape_follow_x0():
    s = LangevinSampler(2, 0.1)
    x0 = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    x = s(lambda x: -(x ** 2).flatten(1).sum(1), x0)
    assert x.dtype == torch.float64 and x.shape == x0.shape
    assert torch.equal(x0, torch.zeros_like(x0))  # x0 not modified


def test_chains_run_under_inference_mode_as_lightning_uses_in_test():
    s = LangevinSampler(3, 0.5, noise_scale=0.0)
    with torch.inference_mode():
        x0 = torch.ones(4, 2)
        x = s(lambda x: -0.5 * (x ** 2).sum(1), x0)
        y = HMCSampler(2, 2, 0.1)(lambda x: -0.5 * (x ** 2).sum(1), x0)
    assert torch.allclose(x, torch.full((4, 2), 0.875 ** 3)) and y.shape == x0.shape


def test_clamp_keeps_chains_in_the_box_and_rejects_bad_bounds():
    # a target pulling far outside [-1, 1]: unclamped chains leave the box, clamped ones stay on its edge
    def log_prob(x):
        return -0.5 * (x - 5.0).pow(2).sum(1)

    x0 = torch.zeros(64, 3)
    free = LangevinSampler(50, 0.5)(log_prob, x0)
    boxed = LangevinSampler(50, 0.5, clamp=(-1.0, 1.0))(log_prob, x0)
    assert free.max() > 2 and boxed.min() >= -1 and boxed.max() <= 1
    assert boxed.mean() > 0.9  # pushed against the upper edge
    unrolled = LangevinSampler(5, 0.5, clamp=(-1.0, 1.0)).unroll(log_prob, x0.clone().requires_grad_(True))
    assert unrolled.max() <= 1
    with pytest.raises(ValueError, match="clamp"):
        LangevinSampler(5, 0.1, clamp=(1.0, -1.0))
