"""Joint latent EBM prior for multi-layer generators (Cui, Wu, Han, "Learning Joint Latent Space EBM Prior Model for
Multi-layer Generator", CVPR 2023), following ``jcui1224/hierarchical-joint-ebm`` ``joint-training`` (``families.md``
§6), generalised from two latent layers to L.

Model, layers numbered from the bottom (z_1 feeds the image generator) to the top (z_L)::

    p(z_1..z_L) ∝ exp(sum_l f_l(z_l)) N(z_L; 0, I) prod_{l<L} N(z_l; mu_l(z_{l+1}), sigma_l(z_{l+1})^2)
    x = G(z_1) + eps,   eps ~ N(0, llhd_sigma^2 I)

f_l output **scores** (negative energies). Training step, in order: posterior Langevin on all layers jointly (40 steps,
s = 0.1) from N(0, I); prior Langevin on the same target without the likelihood (60 steps, s = 0.4); then the
generator update ``mean_batch sum (x - G(z_1+))^2 / (2 sigma^2)``, the conditional-prior update
``mean log p(z_l- | z_{l+1}-) - mean log p(z_l+ | z_{l+1}+)`` (contrastive) and the energy update
``mean f_l(z-) - mean f_l(z+)``, all from the same chains. Adam betas (0.9, 0.999), lr 1e-4 (generators) and 2e-5
(energies). The reference's N(z_L; 0, 1.01^2) (a +0.01 applied to the top layer's unit sigma) is not copied.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lebm_zoo.models.base import EBMModule
from lebm_zoo.samplers import LangevinSampler, as_normal_tensor
from lebm_zoo.utils import images_from_batch

__all__ = ["JointHierarchicalEBMPrior"]


def _mlp(n_in: int, hidden: int, n_hidden: int, n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_hidden):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.LeakyReLU(0.2)]
    layers.append(nn.Linear(hidden if n_hidden else n_in, n_out))
    return nn.Sequential(*layers)


class HierarchicalGenerator(nn.Module):
    """G(z_1) of the joint-training reference: ConvT(nz_1 -> 8ngf, k = img_size/4) -> ConvT k4 s2 p1 (4ngf) -> ConvT k4
    s2 p1 (2ngf) -> ConvT(-> channels, k3 s1 p1) -> Tanh, LeakyReLU(0.2) between (reference: nz_1 128, ngf 128).

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


class JointHierarchicalEBMPrior(EBMModule):
    """Multi-layer generator with an energy term on every latent layer, learned by joint short-run Langevin.

    Args:
        img_size: a multiple of 4 (28, 32, 64...).
        channels: 1 or 3.
        nz: latent sizes from the bottom layer z_1 (the generator's input) to the top z_L (reference: [128, 100]).
        ngf: generator width.
        cond_hidden, cond_layers: width and number of hidden layers of each conditional MLP z_{l+1} -> (mu, log sigma)
            of z_l (reference: 200, 4).
        energy_hidden, energy_layers: width and hidden layers of each f_l, one entry per layer (reference: (200, 100),
            (3, 2)); a single int applies to all layers.
        min_sigma: added to exp(log sigma) of the conditionals (reference: 0.01).
        llhd_sigma: sigma of the Gaussian likelihood p(x | z_1), in [-1, 1] pixel units (reference: 0.3).
        prior_steps, prior_step_size, posterior_steps, posterior_step_size: the chains (reference: 60, 0.4, 40, 0.1).
        lr_e, lr_g: Adam learning rates of the energies and of the generators (G and the conditionals).
        betas: Adam betas.
        anomaly_k: default ``k`` of :meth:`anomaly_score` (None: ``-log p(x, z)``; k: the LLR^{>k} score).

    Latents travel as a list ``[z_1, ..., z_L]`` of ``(B, nz_l)`` tensors; images ``(B, C, H, W)`` in [-1, 1].

    Raises:
        ValueError: for fewer than one layer or mismatched per-layer settings.
    """

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
        llhd_sigma: float = 0.3,
        prior_steps: int = 60,
        prior_step_size: float = 0.4,
        posterior_steps: int = 40,
        posterior_step_size: float = 0.1,
        lr_e: float = 2e-5,
        lr_g: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        anomaly_k: int | None = None,
    ):
        super().__init__()
        nz = [int(n) for n in nz]
        n_layers = len(nz)
        if n_layers < 1:
            raise ValueError("nz needs at least one latent layer")
        eh = [energy_hidden] * n_layers if isinstance(energy_hidden, int) else list(energy_hidden)
        el = [energy_layers] * n_layers if isinstance(energy_layers, int) else list(energy_layers)
        if len(eh) != n_layers or len(el) != n_layers:
            raise ValueError(f"energy_hidden and energy_layers need one entry per layer ({n_layers}), got {eh}, {el}")
        if llhd_sigma <= 0 or min_sigma < 0:
            raise ValueError(f"llhd_sigma must be > 0 and min_sigma >= 0, got {llhd_sigma}, {min_sigma}")
        self.save_hyperparameters()
        self.nz = nz
        self.generator = HierarchicalGenerator(nz[0], ngf, img_size, channels)
        # conditionals[l]: z_{l+1} -> (mu, log sigma) of z_l, for l = 0..L-2 (0-based)
        self.conditionals = nn.ModuleList(_mlp(nz[i + 1], cond_hidden, cond_layers, 2 * nz[i])
                                          for i in range(n_layers - 1))
        self.energy_nets = nn.ModuleList(_mlp(nz[i], eh[i], el[i], 1) for i in range(n_layers))  # f_l: scores
        self.samplers = {
            "prior": LangevinSampler(prior_steps, prior_step_size),
            "posterior": LangevinSampler(posterior_steps, posterior_step_size),
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
        mu, log_sigma = self.conditionals[level](z_above).float().chunk(2, dim=1)
        return mu, log_sigma.exp() + self.hparams.min_sigma

    def conditional_log_prob(self, level: int, z: Tensor, z_above: Tensor) -> Tensor:
        """log N(z; mu(z_above), sigma(z_above)^2), summed over dimensions, without the 2 pi constant: ``(B,)``."""
        mu, sigma = self.conditional(level, z_above)
        return (-0.5 * ((z - mu) / sigma).pow(2) - sigma.log()).sum(1)

    def scores(self, z) -> list[Tensor]:
        """The per-layer scores ``[f_1(z_1), ..., f_L(z_L)]`` (negative energies), each ``(B,)`` fp32."""
        return [net(zl).float().squeeze(-1) for net, zl in zip(self.energy_nets, self._as_list(z))]

    def energy(self, z) -> Tensor:
        """Total prior energy ``-sum_l f_l(z_l)`` (lower = more likely), ``(B,)``; ``z`` packed or a list."""
        return -torch.stack(self.scores(z)).sum(0)

    def prior_log_prob(self, z, levels: range | None = None) -> Tensor:
        """Unnormalised log p(z_1..z_L): energies, conditionals and the N(0, I) top, ``(B,)`` in nats.

        Args:
            z: packed ``(B, sum nz)`` or a list of layers.
            levels: only the terms of these 0-based layers (their energy and their conditional given the layer above;
                the top layer's N(0, I)); default all. Used by :meth:`resample_below`.
        """
        zs = self._as_list(z)
        top = len(zs) - 1
        levels = range(len(zs)) if levels is None else levels
        scores = self.scores(zs)
        lp = zs[0].new_zeros(zs[0].shape[0])
        for i in levels:
            lp = lp + scores[i]
            lp = lp + (-0.5 * zs[i].pow(2).sum(1) if i == top else self.conditional_log_prob(i, zs[i], zs[i + 1]))
        return lp

    def log_joint(self, x: Tensor, z) -> Tensor:
        """Unnormalised log p(x, z_1..z_L) = -||x - G(z_1)||^2 / (2 sigma^2) + log p(z), ``(B,)`` in nats.

        Args:
            x: images ``(B, C, H, W)`` in [-1, 1].
            z: packed ``(B, sum nz)`` or ``[z_1, ..., z_L]``.
        """
        zs = self._as_list(z)
        rec = (x - self.generator(zs[0]).float()).flatten(1).pow(2).sum(1)
        return -rec / (2 * self.hparams.llhd_sigma ** 2) + self.prior_log_prob(zs)

    # ------------------------------------------------------------------------------------------------ sampling
    def _noise(self, n: int) -> Tensor:
        return torch.randn(n, sum(self.nz), device=self.device)

    @torch.no_grad()
    def sample_latent(self, n: int, n_steps: int | None = None) -> list[Tensor]:
        """``n`` joint prior samples by short-run Langevin from N(0, I): ``[z_1 (n, nz_1), ..., z_L]``."""
        return self.split(self.langevin(self.prior_log_prob, self._noise(n), "prior", n_steps=n_steps))

    @torch.no_grad()
    def generate(self, z) -> Tensor:
        """G(z_1): images ``(B, C, H, W)`` in [-1, 1] from latents (packed or a list)."""
        return self.generator(self._as_list(z)[0]).float()

    @torch.no_grad()
    def sample(self, n: int, n_steps: int | None = None) -> Tensor:
        """Draw ``n`` images ``(n, C, H, W)`` in [-1, 1]: joint prior Langevin, then G(z_1)."""
        return self.generate(self.sample_latent(n, n_steps))

    @torch.no_grad()
    def infer_latent(self, x: Tensor, n_steps: int | None = None) -> list[Tensor]:
        """Joint posterior Langevin on log p(x, z) from N(0, I): images ``(B, C, H, W)`` -> ``[z_1, ..., z_L]``."""
        x = as_normal_tensor(x.to(self.device))
        z = self.langevin(lambda zz: self.log_joint(x, zz), self._noise(x.shape[0]), "posterior", n_steps=n_steps)
        return self.split(z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, n_steps: int | None = None) -> Tensor:
        """G(z_1) at the inferred posterior: images -> same shape and range."""
        return self.generate(self.infer_latent(x, n_steps))

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
            ValueError: for ``k`` outside ``0..L``.
        """
        zs = [t.to(self.device) for t in self._as_list(z)]
        n_layers = len(zs)
        if not 0 <= k <= n_layers:
            raise ValueError(f"k must be in 0..{n_layers}, got {k}")
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

        ``k=None``: ``-log p(x, z)`` at posterior z (the LEBM decision function). ``k``: the likelihood ratio
        LLR^{>k} of Cui et al. (2023, after Havtorn et al. 2021), estimated with our chains as
        ``log p(x, z) - log p(x, z~)``, where z is the joint posterior sample and z~ keeps its layers above k while
        layers 1..k are resampled from the prior given them: how much better x is explained when its low-level
        layers are fitted to it than when only its high-level layers are. The default ``k=-1`` takes the
        ``anomaly_k`` hyperparameter.
        """
        k = self.hparams.anomaly_k if k == -1 else k
        x = as_normal_tensor(x.to(self.device))
        z = self.infer_latent(x, n_steps)
        full = self.log_joint(x, z)
        if k is None:
            return -full
        return full - self.log_joint(x, self.resample_below(z, k))

    # ------------------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        hp = self.hparams
        opt_g = torch.optim.Adam([*self.generator.parameters(), *self.conditionals.parameters()], lr=hp.lr_g,
                                 betas=tuple(hp.betas))
        opt_e = torch.optim.Adam(self.energy_nets.parameters(), lr=hp.lr_e, betas=tuple(hp.betas))
        return [opt_g, opt_e]

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        x = images_from_batch(batch)
        self.check_data_shape(x, (hp.channels, hp.img_size, hp.img_size), "Set --model.channels/--model.img_size.")
        b = x.shape[0]
        opt_g, opt_e = self.optimizers()
        z_pos = self.infer_latent(x)  # [z_l+], posterior
        z_neg = self.sample_latent(b)  # [z_l-], prior

        loss_g = (self.generator(z_pos[0]).float() - x).flatten(1).pow(2).sum(1).mean() / (2 * hp.llhd_sigma ** 2)
        loss_cond = x.new_zeros(())
        for i in range(len(self.nz) - 1):  # contrastive update of each conditional prior
            loss_cond = loss_cond + (self.conditional_log_prob(i, z_neg[i], z_neg[i + 1]).mean()
                                     - self.conditional_log_prob(i, z_pos[i], z_pos[i + 1]).mean())
        s_pos, s_neg = self.scores(z_pos), self.scores(z_neg)
        loss_e = sum(sn.mean() - sp.mean() for sp, sn in zip(s_pos, s_neg))
        if not self.check_finite({"loss_g": loss_g, "loss_cond": loss_cond, "loss_e": loss_e}):
            return
        opt_g.zero_grad(set_to_none=True)
        opt_e.zero_grad(set_to_none=True)
        # disjoint parameter sets (G; conditionals; energies) and detached chains: one backward gives each its own
        self.manual_backward(loss_g + loss_cond + loss_e)
        opt_g.step()
        self.step_uncounted(opt_e)
        logs = {"loss_g": loss_g, "loss_cond": loss_cond, "loss_e": loss_e}
        for i, (sp, sn) in enumerate(zip(s_pos, s_neg)):
            logs[f"score_pos_{i + 1}"], logs[f"score_neg_{i + 1}"] = sp.mean(), sn.mean()
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=b)
        self.log_dict({"loss_g": loss_g.detach(), "gap": -loss_e.detach()}, prog_bar=True, logger=False,
                      batch_size=b)

    def validation_step(self, batch, batch_idx: int) -> None:
        """No model-side validation loss: metric callbacks evaluate."""

    def test_step(self, batch, batch_idx: int) -> None:
        """No model-side test loss: metric callbacks evaluate."""

