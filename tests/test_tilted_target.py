"""GaussianTiltedTarget: the latent priors' chains take the Gaussian reference's gradient in closed form, as the
reference, with the same states as the autograd gradient of the whole log-density; and a LatentEBMPrior iteration
dispatches no more computing operations than the plain loop with the reference's structure (what its eager speed
follows on a GPU, where the iteration is bound by kernel launches)."""
import sys
from pathlib import Path

import pytest
import torch
from _data import TINY_MODELS, uniform_images
from test_devices import training_data

from lebm_zoo import GaussianTiltedTarget, LangevinSampler, LatentEBMPrior, LatentPriorBase
from lebm_zoo.nets import EnergyMLP

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def energy_net():
    torch.manual_seed(0)
    return EnergyMLP(6, 16).double()


def run(sampler, target, x0, seed=1):
    torch.manual_seed(seed)
    return sampler(target, x0, return_trace=True)


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_tilted_chain_equals_the_chain_on_the_whole_log_density(grad_clip):
    e = energy_net()
    tilted = GaussianTiltedTarget(lambda z: e(z), sigma=1.5)
    whole = lambda z: -e(z) - z.pow(2).sum(1) / (2 * 1.5 ** 2)  # noqa: E731
    x0 = torch.randn(5, 6, dtype=torch.float64)
    sampler = LangevinSampler(7, 0.3, grad_clip=grad_clip)
    x_t, trace_t = run(sampler, tilted, x0)
    x_w, trace_w = run(sampler, whole, x0)
    torch.testing.assert_close(x_t, x_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(trace_t["log_prob"], trace_w["log_prob"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tilted(x0), whole(x0))
    x_s, lp = sampler.step(tilted, x0.clone())  # the public step returns the log-prob too
    torch.testing.assert_close(lp, whole(x0))


def test_tilted_target_errors():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        GaussianTiltedTarget(lambda z: z.sum(1), 0.0)
    bad = GaussianTiltedTarget(lambda z: z, 1.0)  # (B, d), not one value per chain
    with pytest.raises(ValueError, match=r"one value per chain, shape \(3,\); got \(3, 2\)"):
        LangevinSampler(1, 0.1)(bad, torch.zeros(3, 2))


@pytest.mark.parametrize("energy", [lambda z: z.sum(1), lambda z: torch.zeros(z.shape[0])],
                         ids=["linear (its gradient is an expanded view)", "constant"])
def test_energies_whose_gradient_is_a_view_or_none(energy):
    whole = lambda z: -energy(z) - z.pow(2).sum(1) / 2  # noqa: E731
    x0 = torch.randn(3, 2)
    sampler = LangevinSampler(3, 0.2)
    torch.testing.assert_close(run(sampler, GaussianTiltedTarget(energy, 1.0), x0)[0], run(sampler, whole, x0)[0])


@pytest.mark.parametrize("name", sorted(n for n, make in TINY_MODELS.items()
                                        if isinstance(make(), LatentPriorBase)))
def test_every_latent_prior_family_targets_its_own_densities(name):
    torch.manual_seed(0)
    m = TINY_MODELS[name]()
    batch = next(iter(training_data(name)))
    x = m.prepare_data_input(batch[0] if isinstance(batch, (list, tuple)) else batch, "test")
    z = torch.randn(m.data_batch_size(x), m.hparams.nz)
    torch.testing.assert_close(m.posterior_target(x)(z), m.log_joint(x, z))
    torch.testing.assert_close(m.prior_target()(z), m.prior_log_prob(z))


def test_a_subclass_with_its_own_likelihood_gets_it_in_the_posterior_chain():
    class Laplace(LatentEBMPrior):
        def log_likelihood(self, x, z):
            return -(x - self.generator(z)).abs().flatten(1).sum(1)

    m = Laplace(img_size=28, channels=1, nz=4, ngf=4, ndf=8)
    x, z = uniform_images(2, 1, 28), torch.randn(2, 4)
    torch.testing.assert_close(m.posterior_target(x)(z), m.log_joint(x, z))


def test_the_latent_prior_chains_use_it_and_a_subclass_override_is_kept():
    m = LatentEBMPrior(img_size=28, channels=1, nz=4, ngf=4, ndf=8)
    assert isinstance(m.prior_target(), GaussianTiltedTarget) and m.prior_target().sigma == m.hparams.prior_sigma
    x = uniform_images(2, 1, 28)
    z = torch.randn(2, 4)
    post = m.posterior_target(x)
    assert isinstance(post, GaussianTiltedTarget)
    torch.testing.assert_close(post(z), m.log_joint(x, z))
    torch.testing.assert_close(m.prior_target()(z), m.prior_log_prob(z))

    class Flat(LatentEBMPrior):
        def prior_log_prob(self, z):
            return -z.abs().sum(1)

    f = Flat(img_size=28, channels=1, nz=4, ngf=4, ndf=8)
    assert f.prior_target() == f.prior_log_prob  # the override is the target, not the energy
    assert not isinstance(f.posterior_target(x), GaussianTiltedTarget)
    torch.testing.assert_close(f.posterior_target(x)(z), f.log_joint(x, z))


def test_an_iteration_launches_no_more_kernels_than_the_plain_reference_loop():
    """Counted, not timed: the ATen operations that compute (not views) in one SVHN-recipe iteration, fp32, batch 2
    (the count does not depend on the batch or the device); benchmarks/op_count.py prints the breakdown."""
    from op_count import count_ours, count_plain, kernels

    plain, ours = kernels(count_plain(2, 1)), kernels(count_ours(2, 1))
    assert plain > 2000  # the loop ran: 80 chain steps, two updates
    assert ours <= plain, (ours, plain)
