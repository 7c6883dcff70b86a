"""Joint latent EBM prior for multi-layer generators (Cui, Wu, Han, "Learning Joint Latent Space EBM Prior Model for
Multi-layer Generator", CVPR 2023), following the authors' joint-training code: ``jcui1224/hierarchical-joint-ebm``
at commit 26aeb1f, files ``joint-training/train_cifar10.py`` (the training loop, chains, losses, optimisers and
defaults) and ``joint-training/nets.py`` (the networks), generalised from their two latent layers to L.

Model, layers numbered from the bottom (z_1 feeds the image generator) to the top (z_L)::

    p(z_1..z_L) ∝ exp(sum_l f_l(z_l)) N(z_L; 0, top_prior_sigma^2 I) prod_{l<L} N(z_l; mu_l(z_{l+1}), sigma_l^2)
    sigma_l = exp(log_sigma_l(z_{l+1})) + min_sigma
    x = G(z_1) + eps,   eps ~ N(0, llhd_sigma^2 I)

The f_l output **scores** (log-density terms, negative energies), as the reference's energy nets do: its chains
ascend ``sum f_l`` and its energy losses are ``mean f(z-) - mean f(z+)``.

One training iteration, as the reference's ``train_step`` does it:

1. posterior Langevin on all layers jointly, from fresh N(0, I) noise (40 steps, s = 0.1) on log p(x, z):
   ``z <- z + (s^2/2) grad_z [log p(x | z_1) + log p(z) + sum_l f_l(z_l)] + s eps``, the gradients of the
   batch-summed terms (so per-chain gradients);
2. prior Langevin from fresh N(0, I) noise on the same target without the likelihood (60 steps, s = 0.4);
3. with both chains (detached, run with the parameters from before the updates): the generator loss
   ``mean_batch sum_pixels (x - G(z_1+))^2 / (2 llhd_sigma^2)``; for each conditional the contrastive loss
   ``mean log p(z_l- | z_{l+1}-) - mean log p(z_l+ | z_{l+1}+)``; for each layer the energy loss
   ``mean f_l(z_l-) - mean f_l(z_l+)``; one Adam step each.

The reference steps four Adams in turn (G, the conditional, f_1, f_2), each on its own loss; every loss depends only
on its own network's parameters, so one backward of their sum followed by our two Adams (parameter groups: G and each
conditional; each f_l) gives the same gradients and the same per-parameter updates.

Identical to the reference (2 layers, CIFAR-10 defaults; checked one iteration at float64 in
``tests/test_reference_hierarchical.py``):

* the networks: G is ConvT(nz_1 -> 1024, k8) - ConvT k4 s2 p1 (512) - ConvT k4 s2 p1 (256) - ConvT(-> 3, k3 s1 p1)
  - Tanh with LeakyReLU(0.2) between (our ``ngf=128`` with widths 8/4/2 ngf is the reference's hard-coded 64 with
  16/8/4); each conditional an MLP of ``cond_layers`` Linear(200)-LeakyReLU(0.2) blocks and a Linear to
  (mu, log sigma) (chunked in that order); f_1 and f_2 MLPs of 3 x 200 and 2 x 100 Linear-LeakyReLU(0.2) blocks and
  a Linear to 1; every layer with bias and PyTorch's default init;
* the top prior N(0, 1.01^2): the reference evaluates log p(z_2) with the same Gaussian class as its conditionals,
  whose sigma is ``exp(log_sigma) + 0.01``, at log_sigma = 0, so sigma = 1.01 (``top_prior_sigma``; 1.0, an
  option, gives N(0, I));
* the chains (initial noise, step sizes, lengths, injected noise, per-chain gradients) and their order;
* the losses and their reductions, and the update order (all updates from the same chains);
* Adam with PyTorch's defaults (betas (0.9, 0.999), eps 1e-8, no weight decay), learning rates 1e-4 (G and the
  conditional) and 2e-5 (each f_l), no schedule, no gradient clipping; the CIFAR-10 recipe's seed 1224, batch 100
  and 101 epochs.

Deviations:

* ``top_prior_sigma=1.0`` (option; default 1.01 as the reference);
* L != 2 layers, image sizes other than 32 px (the first kernel is img_size / 4) and 1-channel images: the
  reference's G is 32 x 32 x 3 only; these are generalisations, and the 2-layer 32 x 32 x 3 model is the reference's;
* the divergence guard (all families): a non-finite loss, or one above 1e8 in magnitude, stops training *before*
  its update (the last weights stay finite); the reference checks only f_1's scores for NaN, after the updates;
* the random streams: our chains draw the initial states and each step's noise for all layers in one
  ``(B, sum nz)`` tensor, the reference one per layer (same distribution; the test feeds both the same draws).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lebm_zoo.models.base import EBMModule
from lebm_zoo.models.latent_prior import LatentImagesMixin
from lebm_zoo.models.registry import register_family
from lebm_zoo.samplers import LangevinSampler
from lebm_zoo.utils import check_count, check_latents, full_precision

__all__ = ["JointHierarchicalEBMPrior"]


def _mlp(n_in: int, hidden: int, n_hidden: int, n_out: int) -> nn.Sequential:
    """``n_hidden`` blocks Linear(hidden)-LeakyReLU(0.2), then Linear(n_out): the reference's energy and conditional
    MLPs (PyTorch's default init)."""
    layers: list[nn.Module] = []
    for i in range(n_hidden):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.LeakyReLU(0.2)]
    layers.append(nn.Linear(hidden if n_hidden else n_in, n_out))
    return nn.Sequential(*layers)


def _per_layer(value, n: int, name: str, what: str) -> list[float]:
    """A float for every one of ``n`` entries, or a sequence of exactly ``n`` floats, as a list."""
    values = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} needs one entry per {what} ({n}), got {list(value)}")
    return values


class HierarchicalGenerator(nn.Module):
    """G(z_1) of the joint-training reference: ConvT(nz_1 -> 8ngf, k = img_size/4) -> ConvT k4 s2 p1 (4ngf) -> ConvT k4
    s2 p1 (2ngf) -> ConvT(-> channels, k3 s1 p1) -> Tanh, LeakyReLU(0.2) between, biases, PyTorch's default init
    (reference: nz_1 128, ngf 128, i.e. widths 1024/512/256, which its code writes as 16/8/4 x 64; 32 px only).

    Shapes: ``(B, nz_1)`` -> ``(B, channels, img_size, img_size)`` in [-1, 1].
    """

    def __init__(self, nz: int = 128, ngf: int = 128, img_size: int = 32, channels: int = 3):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size must be a multiple of 4, got {img_size}")
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, 8 * ngf, img_size // 4), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(8 * ngf, 4 * ngf, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(4 * ngf, 2 * ngf, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(2 * ngf, channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


@register_family(tiny={
    "JointHierarchicalEBMPrior": dict(img_size=28, channels=1, nz=(4, 3), ngf=4, cond_hidden=8, cond_layers=1,
        energy_hidden=8, energy_layers=1, prior_steps=2, posterior_steps=2),
})
class JointHierarchicalEBMPrior(LatentImagesMixin, EBMModule):
    """Multi-layer generator with an energy term on every latent layer, learned by joint short-run Langevin.

    Args:
        img_size: a multiple of 4 (28, 32, 64...).
        channels: 1 or 3.
        nz: latent sizes from the bottom layer z_1 (the generator's input) to the top z_L (reference: [128, 100]).
        ngf: generator width: G's layers have 8, 4 and 2 x ngf channels (reference: 128, i.e. 1024/512/256).
        cond_hidden, cond_layers: width and number of hidden layers of each conditional MLP z_{l+1} -> (mu, log sigma)
            of z_l (reference: 200, 4).
        energy_hidden, energy_layers: width and hidden layers of each f_l, one entry per layer (reference: (200, 100),
            (3, 2)); a single int applies to all layers.
        min_sigma: added to exp(log sigma) of the conditionals (reference: 0.01).
        top_prior_sigma: sigma of the top layer's Gaussian N(0, top_prior_sigma^2 I). Reference: 1.01, because it
            evaluates that Gaussian with its conditionals' class at log sigma = 0 (exp(0) + 0.01); 1.0 (an option)
            gives N(0, I).
        llhd_sigma: sigma of the Gaussian likelihood p(x | z_1), in [-1, 1] pixel units (reference: 0.3).
        prior_steps, prior_step_size, posterior_steps, posterior_step_size: the chains (reference: 60, 0.4, 40, 0.1).
        lr_e: Adam learning rate of each f_l, one entry per layer, bottom first (reference: e1_lr = e2_lr = 2e-5); a
            single float applies to all layers.
        lr_g: Adam learning rate of the image generator G (reference: g1_lr = 1e-4).
        lr_cond: Adam learning rate of each conditional p(z_l | z_{l+1}), one entry per conditional, bottom first
            (reference: g2_lr = 1e-4); a single float applies to all.
        betas: Adam betas of every group (reference: PyTorch's defaults (0.9, 0.999)).
        anomaly_k: default ``k`` of :meth:`anomaly_score` (None: ``-log p(x, z)``; k: the LLR^{>k} score).
        compile_chains, compile_scope: run the Langevin chains through ``torch.compile`` (default None: eager), each
            step or each whole chain as one compiled region, as :class:`~lebm_zoo.LatentEBMPrior`'s (same chains up to
            float rounding; see :class:`~lebm_zoo.samplers.LangevinSampler`).
        capture_step: on a GPU, each training step's chains, losses and backward as one CUDA graph, the updates eager
            (default False), as :class:`~lebm_zoo.LatentEBMPrior`'s (:meth:`EBMModule.forward_backward`).

    Latents travel as a list ``[z_1, ..., z_L]`` of ``(B, nz_l)`` tensors; images ``(B, C, H, W)`` in [-1, 1].

    Raises:
        ValueError: for fewer than one layer, mismatched per-layer settings or non-positive sigmas.
    """

    #: layer sizes, each an integer >= 1 (checked when the hyperparameters are saved)
    size_hparams = ("nz", "ngf", "energy_hidden")
    #: hyperparameters a resumed run may change (the others come from the checkpoint)
    resume_hparams = (
        "prior_steps", "prior_step_size", "posterior_steps", "posterior_step_size", "lr_e", "lr_g", "lr_cond", "betas",
        "compile_chains", "compile_scope", "capture_step")

    def __init__(
        self,
        img_size: int = 32,
        channels: int = 3,
        nz: tuple[int, ...] = (128, 100),
        ngf: int = 128,
        cond_hidden: int = 200,
        cond_layers: int = 4,
        energy_hidden: int | tuple[int, ...] = (200, 100),
        energy_layers: int | tuple[int, ...] = (3, 2),
        min_sigma: float = 0.01,
        top_prior_sigma: float = 1.01,
        llhd_sigma: float = 0.3,
        prior_steps: int = 60,
        prior_step_size: float = 0.4,
        posterior_steps: int = 40,
        posterior_step_size: float = 0.1,
        lr_e: float | tuple[float, ...] = 2e-5,
        lr_g: float = 1e-4,
        lr_cond: float | tuple[float, ...] = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        anomaly_k: int | None = None,
        compile_chains: bool | str | None = None,
        compile_scope: str = "step",
        capture_step: bool = False,
    ):
        super().__init__()
        self.check_capture_args(capture_step, compile_chains)
        nz = [int(n) for n in nz]
        n_layers = len(nz)
        if n_layers < 1:
            raise ValueError("nz needs at least one latent layer")
        eh = [energy_hidden] * n_layers if isinstance(energy_hidden, int) else list(energy_hidden)
        el = [energy_layers] * n_layers if isinstance(energy_layers, int) else list(energy_layers)
        if len(eh) != n_layers or len(el) != n_layers:
            raise ValueError(f"energy_hidden and energy_layers need one entry per layer ({n_layers}), got {eh}, {el}")
        if llhd_sigma <= 0 or min_sigma < 0 or top_prior_sigma <= 0:
            raise ValueError(f"llhd_sigma and top_prior_sigma must be > 0 and min_sigma >= 0, got {llhd_sigma}, "
                             f"{top_prior_sigma}, {min_sigma}")
        self.lr_e = _per_layer(lr_e, n_layers, "lr_e", "layer")
        self.lr_cond = _per_layer(lr_cond, n_layers - 1, "lr_cond", "conditional")
        self.save_hyperparameters()
        self.nz = nz
        self.generator = HierarchicalGenerator(nz[0], ngf, img_size, channels)
        # conditionals[l]: z_{l+1} -> (mu, log sigma) of z_l, for l = 0..L-2 (0-based)
        self.conditionals = nn.ModuleList(_mlp(nz[i + 1], cond_hidden, cond_layers, 2 * nz[i])
                                          for i in range(n_layers - 1))
        self.energy_nets = nn.ModuleList(_mlp(nz[i], eh[i], el[i], 1) for i in range(n_layers))  # f_l: scores
        self.samplers = {
            "prior": LangevinSampler(prior_steps, prior_step_size, **self.chain_compile_kwargs()),
            "posterior": LangevinSampler(posterior_steps, posterior_step_size, **self.chain_compile_kwargs()),
        }

    # ------------------------------------------------------------------------------------------------ packing
    def split(self, z: Tensor) -> list[Tensor]:
        """Packed latents ``(B, sum nz)`` -> ``[z_1, ..., z_L]``."""
        return list(z.split(self.nz, dim=1))

    @staticmethod
    def pack(zs: list[Tensor]) -> Tensor:
        """``[z_1, ..., z_L]`` -> packed ``(B, sum nz)``."""
        return torch.cat(list(zs), dim=1)

    def _as_list(self, z) -> list[Tensor]:
        return self.split(z) if isinstance(z, Tensor) else list(z)

    # ------------------------------------------------------------------------------------------------ densities
    def conditional(self, level: int, z_above: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and sigma of p(z_level | z_{level+1}) (0-based ``level`` < L-1), each ``(B, nz_level)``."""
        mu, log_sigma = full_precision(self.conditionals[level](z_above)).chunk(2, dim=1)
        return mu, log_sigma.exp() + self.hparams.min_sigma

    def conditional_log_prob(self, level: int, z: Tensor, z_above: Tensor) -> Tensor:
        """log N(z; mu(z_above), sigma(z_above)^2), summed over dimensions, without the 2 pi constant: ``(B,)``."""
        mu, sigma = self.conditional(level, z_above)
        return (-0.5 * ((z - mu) / sigma).pow(2) - sigma.log()).sum(1)

    def neg_energies(self, z) -> list[Tensor]:
        """The per-layer negative energies ``[f_1(z_1), ..., f_L(z_L)]`` (the reference's scores), each ``(B,)``, at
        least fp32.

        Raises:
            DataShapeError: for latents that are neither ``(B, sum nz)`` nor a list of ``(B, nz_l)`` finite floats.
        """
        if self.called_by_user():
            check_latents(z, self.nz, where=f"{type(self).__name__}.neg_energies")
        return self._neg_energies(z)

    def _neg_energies(self, z) -> list[Tensor]:
        return [full_precision(net(zl)).squeeze(-1) for net, zl in zip(self.energy_nets, self._as_list(z))]

    def energy(self, z) -> Tensor:
        """Total prior energy ``-sum_l f_l(z_l)`` (lower = more likely), ``(B,)``; ``z`` packed or a list.

        Raises:
            DataShapeError: as :meth:`neg_energies`.
        """
        if self.called_by_user():
            check_latents(z, self.nz, where=f"{type(self).__name__}.energy")
        return -torch.stack(self._neg_energies(z)).sum(0)

    def prior_log_prob(self, z, levels: range | None = None) -> Tensor:
        """Unnormalised log p(z_1..z_L): scores, conditionals and the N(0, top_prior_sigma^2 I) top, ``(B,)`` in nats
        (without the Gaussians' 2 pi and the top's log sigma constants).

        Args:
            z: packed ``(B, sum nz)`` or a list of layers.
            levels: only the terms of these 0-based layers (their energy and their conditional given the layer above;
                the top layer's Gaussian); default all. Used by :meth:`resample_below`.

        Raises:
            DataShapeError: for latents that are neither ``(B, sum nz)`` nor a list of ``(B, nz_l)`` finite floats.
        """
        if self.called_by_user():
            check_latents(z, self.nz, where=f"{type(self).__name__}.prior_log_prob")
        zs = self._as_list(z)
        top = len(zs) - 1
        levels = range(len(zs)) if levels is None else levels
        s_top = self.hparams.top_prior_sigma
        scores = self._neg_energies(zs)
        lp = zs[0].new_zeros(zs[0].shape[0])
        for i in levels:
            lp = lp + scores[i]
            if i == top:
                lp = lp - 0.5 * (zs[i] / s_top).pow(2).sum(1)
            else:
                lp = lp + self.conditional_log_prob(i, zs[i], zs[i + 1])
        return lp

    def log_joint(self, x: Tensor, z) -> Tensor:
        """Unnormalised log p(x, z_1..z_L) = -||x - G(z_1)||^2 / (2 sigma^2) + log p(z), ``(B,)`` in nats.

        Args:
            x: images ``(B, C, H, W)`` in [-1, 1].
            z: packed ``(B, sum nz)`` or ``[z_1, ..., z_L]``.

        Raises:
            DataShapeError: for bad images (as :meth:`infer_latent`) or latents of another shape or batch size.
        """
        if self.called_by_user():
            where = f"{type(self).__name__}.log_joint"
            x = self.prepare_data_input(x, where)
            check_latents(z, self.nz, batch=x.shape[0], where=where)
        zs = self._as_list(z)
        rec = (x - full_precision(self.generator(zs[0]))).flatten(1).pow(2).sum(1)
        return -rec / (2 * self.hparams.llhd_sigma ** 2) + self.prior_log_prob(zs)

    # ------------------------------------------------------------------------------------------------ sampling
    def _noise(self, n: int) -> Tensor:
        return torch.randn(n, sum(self.nz), device=self.device)

    @torch.no_grad()
    def sample_latent(self, n: int, n_steps: int | None = None) -> list[Tensor]:
        """``n`` joint prior samples by short-run Langevin from N(0, I): ``[z_1 (n, nz_1), ..., z_L]``.

        Raises:
            ValueError: for ``n`` < 1 or not an integer.
        """
        n = check_count(n, where=f"{type(self).__name__}.sample_latent")
        return self.split(self.langevin(self.prior_log_prob, self._noise(n), "prior", n_steps=n_steps))

    @torch.no_grad()
    def generate(self, z) -> Tensor:
        """G(z_1): images ``(B, C, H, W)`` in [-1, 1] from latents (packed ``(B, sum nz)`` or a list).

        Raises:
            DataShapeError: for latents of other shapes, or not finite floats.
        """
        return self._generate(check_latents(z, self.nz, where=f"{type(self).__name__}.generate"))

    def _generate(self, z) -> Tensor:
        """:meth:`generate` of latents the model made (unchecked)."""
        return full_precision(self.generator(self._as_list(z)[0]))

    @torch.no_grad()
    def infer_latent(self, x: Tensor, n_steps: int | None = None) -> list[Tensor]:
        """Joint posterior Langevin on log p(x, z) from N(0, I): images ``(B, C, H, W)`` -> ``[z_1, ..., z_L]``.

        Raises:
            DataShapeError: for bad images (see :meth:`prepare_data_input`).
        """
        return self._infer_latent(self.prepare_data_input(x, f"{type(self).__name__}.infer_latent"), n_steps)

    def _infer_latent(self, x: Tensor, n_steps: int | None = None) -> list[Tensor]:
        """:meth:`infer_latent` of images :meth:`prepare_data_input` has checked and moved."""
        z = self.langevin(lambda zz: self.log_joint(x, zz), self._noise(x.shape[0]), "posterior", n_steps=n_steps)
        return self.split(z)

    @torch.no_grad()
    def resample_below(self, z, k: int, n_steps: int | None = None) -> list[Tensor]:
        """Hierarchical sampling: keep layers above ``k`` and resample layers ``1..k`` from the prior given them.

        Langevin (the prior chain's step size) from N(0, I) on the lower layers' terms of the prior, with
        ``z_{k+1}, ..., z_L`` held fixed.

        Args:
            z: latents (packed or a list), e.g. from :meth:`infer_latent`.
            k: number of bottom layers to resample, 0 <= k <= L (k = L is a fresh prior sample).
            n_steps: chain length (default: ``prior_steps``).

        Returns:
            ``[z_1, ..., z_L]`` with layers ``> k`` unchanged.

        Raises:
            ValueError: for ``k`` outside ``0..L``. DataShapeError: for latents of other shapes, or not finite floats.
        """
        n_layers = len(self.nz)
        if not 0 <= k <= n_layers:
            raise ValueError(f"k must be in 0..{n_layers}, got {k}")
        return self._resample_below(check_latents(z, self.nz, where=f"{type(self).__name__}.resample_below"), k,
                                    n_steps)

    def _resample_below(self, z, k: int, n_steps: int | None = None) -> list[Tensor]:
        """:meth:`resample_below` of latents the model made (unchecked), ``0 <= k <= L``."""
        zs = [t.to(self.device) for t in self._as_list(z)]
        if k == 0:
            return zs
        upper = zs[k:]

        def target(low: Tensor) -> Tensor:  # (B, nz_1 + ... + nz_k) -> (B,), the upper layers held fixed
            return self.prior_log_prob(list(low.split(self.nz[:k], 1)) + upper, levels=range(k))

        low0 = torch.randn(zs[0].shape[0], sum(self.nz[:k]), device=self.device)
        low = self.langevin(target, low0, "prior", n_steps=n_steps)
        return list(low.split(self.nz[:k], 1)) + upper

    @torch.no_grad()
    def anomaly_score(self, x: Tensor, k: int | None = -1, n_steps: int | None = None) -> Tensor:
        """Anomaly score of images (higher = more anomalous), ``(B,)``.

        ``k=None``: ``-L^{>0}``, minus the un-normalised log-posterior ``L^{>0} = log p(x | z_1) + sum_l
        log p(z_l | z_{l+1}) + sum_l f_l(z_l)`` (:meth:`log_joint`) at the joint posterior sample z: the decision
        function of Cui et al. (2023) for MNIST anomaly detection, and the LEBM one. ``k``: the likelihood ratio
        LLR^{>k} of Cui et al. (2023, after Havtorn et al. 2021), estimated with our chains as
        ``log p(x, z) - log p(x, z~)``, where z is the joint posterior sample and z~ keeps its layers above k while
        layers 1..k are resampled from the prior given them: how much better x is explained when its low-level
        layers are fitted to it than when only its high-level layers are. The default ``k=-1`` takes the
        ``anomaly_k`` hyperparameter.
        """
        k = self.hparams.anomaly_k if k == -1 else k
        if k is not None and not 0 <= k <= len(self.nz):
            raise ValueError(f"k must be in 0..{len(self.nz)}, got {k}")
        x = self.prepare_data_input(x, f"{type(self).__name__}.anomaly_score")
        z = self._infer_latent(x, n_steps)
        full = self.log_joint(x, z)
        if k is None:
            return -full
        return full - self.log_joint(x, self._resample_below(z, k))

    # ------------------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        """Two Adams, one parameter group per reference optimiser: G (``lr_g``) and each conditional (``lr_cond``);
        each f_l (``lr_e``). Adam is per-parameter, so this is the reference's four Adams."""
        hp = self.hparams
        groups_g = [{"params": list(self.generator.parameters()), "lr": hp.lr_g}]
        groups_g += [{"params": list(net.parameters()), "lr": lr} for net, lr in zip(self.conditionals, self.lr_cond)]
        groups_e = [{"params": list(net.parameters()), "lr": lr} for net, lr in zip(self.energy_nets, self.lr_e)]
        return [self.adam(groups_g, hp.lr_g), self.adam(groups_e, self.lr_e[0])]

    def training_step(self, batch, batch_idx: int) -> None:
        x = self.data_from_batch(batch)  # (B, C, H, W) in [-1, 1]
        opt_g, opt_e = self.optimizers()
        logs = self.forward_backward(x)  # with capture_step on a GPU: one CUDA graph replay
        if not self.check_finite({k: logs[k] for k in ("loss_g", "loss_cond", "loss_e")}):
            return
        opt_g.step()
        self.step_uncounted(opt_e)
        self.log_train(logs, {"loss_g": logs["loss_g"], "gap": -logs["loss_e"]}, batch_size=x.shape[0])

    def _forward_backward(self, x: Tensor, backward) -> dict[str, Tensor]:
        """The training step but its two parameter updates: both chains, every loss, one backward into ``.grad``.

        Args:
            x: images ``(B, C, H, W)`` in [-1, 1], checked.
            backward: ``loss -> None`` (``self.manual_backward`` or ``Tensor.backward``).

        Returns:
            detached 0-d tensors: ``loss_g``, ``loss_cond``, ``loss_e`` and per layer ``loss_cond_l``, ``loss_e_l``,
            ``score_pos_l``, ``score_neg_l``. No host reads: with ``capture_step`` on a GPU, one CUDA graph.
        """
        hp = self.hparams
        z_pos = self.infer_latent(x)  # [z_l+], posterior
        z_neg = self.sample_latent(x.shape[0])  # [z_l-], prior
        rec = (full_precision(self.generator(z_pos[0])) - x).flatten(1).pow(2).sum(1)  # (B,)
        loss_g = rec.mean() / (2 * hp.llhd_sigma ** 2)
        # contrastive update of each conditional prior; the energy update of each layer
        loss_conds = [self.conditional_log_prob(i, z_neg[i], z_neg[i + 1]).mean()
                      - self.conditional_log_prob(i, z_pos[i], z_pos[i + 1]).mean() for i in range(len(self.nz) - 1)]
        s_pos, s_neg = self.neg_energies(z_pos), self.neg_energies(z_neg)
        loss_es = [sn.mean() - sp.mean() for sp, sn in zip(s_pos, s_neg)]
        loss_cond = sum(loss_conds, x.new_zeros(()))
        loss_e = sum(loss_es[1:], loss_es[0])
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        # disjoint parameter sets (G; each conditional; each f_l) and detached chains: one backward of the sum gives
        # each network the gradient of its own loss, as the reference's separate backward passes do
        backward(loss_g + loss_cond + loss_e)
        logs = {"loss_g": loss_g, "loss_cond": loss_cond, "loss_e": loss_e}
        for i, lc in enumerate(loss_conds):
            logs[f"loss_cond_{i + 1}"] = lc
        for i, (le, sp, sn) in enumerate(zip(loss_es, s_pos, s_neg)):
            logs[f"loss_e_{i + 1}"], logs[f"score_pos_{i + 1}"], logs[f"score_neg_{i + 1}"] = le, sp.mean(), sn.mean()
        return {k: v.detach() for k, v in logs.items()}
