"""Divergence triangle (Han, Nijkamp, Fang, Hill, Zhu, Wu, "Divergence Triangle for Joint Training of Generator
Model, Energy-Based Model, and Inferential Model", CVPR 2019), following ``enijkamp/triangle`` ``train_cifar10.py``.

Three networks learned jointly without MCMC: a generator G(z), an energy E(x) on images and an inference network
I(x) = q(z | x). Training step (``families.md`` §4, in this order, each with its own Adam and gradient-norm clip 100):

1. E: ``loss_E = mean E(x) - mean E(G(z).detach())``, z ~ N(0, I) (the generator's samples are the EBM's negatives);
2. I: ``loss_I = recon + KL + 0.1 * latent``, with ``recon = sum (G(z_x) - x)^2 / B`` at z_x ~ q(z | x)
   (reparameterised), ``KL`` the Gaussian KL to N(0, I) **averaged over all batch x nz entries**, and ``latent`` the
   mean negative log-density of z under q(z | G(z).detach());
3. G (with the updated I): ``loss_G = recon + mean E(G(z)) + 0.1 * latent`` (G(z) not detached).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from lebm_zoo.models.base import EBMModule
from lebm_zoo.nets import TriangleEncoder, TriangleEnergy, TriangleGenerator
from lebm_zoo.samplers import LangevinSampler, as_normal_tensor
from lebm_zoo.utils import images_from_batch

__all__ = ["DivergenceTriangle"]

_LOG_2PI = math.log(2 * math.pi)


def gaussian_nll(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise -log N(z; mu, exp(logvar)), same shape as ``z``, in nats."""
    return 0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + _LOG_2PI)


class DivergenceTriangle(EBMModule):
    """Generator, image energy and inference network trained by the divergence triangle (Han et al. 2019).

    Defaults are the reference CIFAR-10 recipe: ``nz=100``, widths 64, Adam lr 1e-4 (E), 3e-4 (G, I) with betas
    (0.5, 0.999), weight decay 5e-4 on G only, gradient-norm clipping at 100 for all three, ExponentialLR 0.998 stepped
    before each epoch, latent-loss weight 0.1, KL weight 1.

    Args:
        img_size: 28, 32 or 64 (pixels).
        channels: 1 or 3.
        nz: latent size.
        ngf, ndf, nif: widths of G, E and I.
        lr_e, lr_g, lr_i: Adam learning rates.
        betas: Adam betas of all three.
        weight_decay_g: Adam weight decay of G.
        grad_clip: gradient-norm clip of each network (None: off).
        lr_decay: ExponentialLR gamma, stepped at the start of every epoch (as the reference).
        latent_weight: weight of the latent NLL term in the I and G losses.
        kl_weight: weight of the KL term in the I loss (the reference's vfactor).
        refine_steps: default number of Langevin steps on E that :meth:`sample` applies to G's samples (0: none, as
            the paper's sampler).
        refine_step_size: step size of that refinement (textbook Langevin on -E(x)).

    Images are ``(B, channels, img_size, img_size)`` in [-1, 1]; latents ``(B, nz)``.
    """

    def __init__(
        self,
        img_size: int = 32,
        channels: int = 3,
        nz: int = 100,
        ngf: int = 64,
        ndf: int = 64,
        nif: int = 64,
        lr_e: float = 1e-4,
        lr_g: float = 3e-4,
        lr_i: float = 3e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay_g: float = 5e-4,
        grad_clip: float | None = 100.0,
        lr_decay: float = 0.998,
        latent_weight: float = 0.1,
        kl_weight: float = 1.0,
        refine_steps: int = 0,
        refine_step_size: float = 0.01,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.generator = TriangleGenerator(nz=nz, ngf=ngf, img_size=img_size, channels=channels)
        self.energy_net = TriangleEnergy(channels=channels, img_size=img_size, nf=ndf)
        self.encoder = TriangleEncoder(channels=channels, img_size=img_size, nz=nz, nf=nif)
        self.samplers = {"refine": LangevinSampler(refine_steps, refine_step_size)}

    # ------------------------------------------------------------------------------------------------ public API
    def energy(self, x: Tensor) -> Tensor:
        """E(x) (lower = more likely): images ``(B, C, H, W)`` in [-1, 1] -> ``(B,)`` fp32, up to log Z."""
        return self.energy_net(x).float()

    @torch.no_grad()
    def infer_latent(self, x: Tensor) -> Tensor:
        """The mean of q(z | x) given by I: images ``(B, C, H, W)`` in [-1, 1] -> latents ``(B, nz)``."""
        return self.encoder(as_normal_tensor(x.to(self.device)))[0].float()

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """G(mean of q(z | x)): images ``(B, C, H, W)`` in [-1, 1] -> same shape and range."""
        return self.generator(self.infer_latent(x)).float()

    @torch.no_grad()
    def sample(self, n: int, refine_steps: int | None = None, refine_step_size: float | None = None) -> Tensor:
        """Draw ``n`` images G(z), z ~ N(0, I), optionally refined by Langevin on the energy.

        Args:
            n: number of images.
            refine_steps: Langevin steps on ``-E(x)`` after G (default: the ``refine_steps`` hyperparameter, 0).
            refine_step_size: their step size (default: the ``refine_step_size`` hyperparameter).

        Returns:
            ``(n, C, H, W)`` images on the model's device; G's outputs are in [-1, 1], refined ones are not clamped.
        """
        x = self.generator(torch.randn(n, self.hparams.nz, device=self.device)).float()
        hp = self.hparams
        k = hp.refine_steps if refine_steps is None else int(refine_steps)
        if k == 0:
            return x
        sampler = LangevinSampler(k, hp.refine_step_size if refine_step_size is None else refine_step_size)
        return self.langevin(lambda xx: -self.energy(xx), x, sampler)

    # ------------------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        hp = self.hparams
        opt_e = torch.optim.Adam(self.energy_net.parameters(), lr=hp.lr_e, betas=tuple(hp.betas))
        opt_i = torch.optim.Adam(self.encoder.parameters(), lr=hp.lr_i, betas=tuple(hp.betas))
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp.lr_g, betas=tuple(hp.betas),
                                 weight_decay=hp.weight_decay_g)
        scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=hp.lr_decay) for o in (opt_e, opt_i, opt_g)]
        return [opt_e, opt_i, opt_g], scheds

    def _recon_and_kl(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x)
        mu, logvar = mu.float(), logvar.float()
        z_x = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterised q(z | x) sample
        recon = (self.generator(z_x).float() - x).pow(2).sum() / x.shape[0]
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()  # mean over all B x nz entries (reference)
        return recon, kl

    def _latent_nll(self, x_gen: Tensor, z: Tensor) -> Tensor:
        mu, logvar = self.encoder(x_gen)
        return gaussian_nll(z, mu.float(), logvar.float()).mean()

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        x = images_from_batch(batch)  # (B, C, H, W) in [-1, 1]
        self.check_data_shape(x, (hp.channels, hp.img_size, hp.img_size), "Set --model.channels/--model.img_size.")
        b = x.shape[0]
        opt_e, opt_i, opt_g = self.optimizers()
        z = torch.randn(b, hp.nz, device=self.device)  # (B, nz)
        x_gen = self.generator(z)  # (B, C, H, W)

        # 1. E: data energy down, generated energy up
        en_pos, en_neg = self.energy(x), self.energy(x_gen.detach())
        loss_e = en_pos.mean() - en_neg.mean()
        # 2. I: recon + KL + latent NLL of z under q(z | G(z))
        recon, kl = self._recon_and_kl(x)
        latent = self._latent_nll(x_gen.detach(), z)
        loss_i = recon + hp.kl_weight * kl + hp.latent_weight * latent
        if not self.check_finite({"loss_e": loss_e, "loss_i": loss_i}):
            return
        opt_e.zero_grad(set_to_none=True)
        self.manual_backward(loss_e)
        gn_e = self.grad_norm_and_clip(self.energy_net.parameters(), hp.grad_clip)
        opt_e.step()
        opt_i.zero_grad(set_to_none=True)
        self.manual_backward(loss_i)
        gn_i = self.grad_norm_and_clip(self.encoder.parameters(), hp.grad_clip)
        self.step_uncounted(opt_i)

        # 3. G, with the updated I and E: recon + E(G(z)) + latent NLL, G(z) not detached
        recon_g, _ = self._recon_and_kl(x)
        en_gen = self.energy(x_gen)
        loss_g = recon_g + en_gen.mean() + hp.latent_weight * self._latent_nll(x_gen, z)
        if not self.check_finite({"loss_g": loss_g}):
            return
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        gn_g = self.grad_norm_and_clip(self.generator.parameters(), hp.grad_clip)
        self.step_uncounted(opt_g)
        # gradients the G loss left on E and I are cleared by their zero_grad at the next iteration

        logs = {"loss_e": loss_e, "loss_i": loss_i, "loss_g": loss_g, "recon": recon, "kl": kl, "latent_nll": latent,
                "energy_pos": en_pos.mean(), "energy_neg": en_neg.mean(), "grad_norm_e": gn_e, "grad_norm_i": gn_i,
                "grad_norm_g": gn_g}
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=b)
        self.log_dict({"recon": recon.detach(), "gap": -loss_e.detach()}, prog_bar=True, logger=False, batch_size=b)

    def on_train_epoch_start(self) -> None:
        with warnings.catch_warnings():  # stepping before the first optimiser step is the reference's order
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            self.step_schedulers()  # the reference steps its schedulers before each epoch

    def validation_step(self, batch, batch_idx: int) -> None:
        """No model-side validation loss: metric callbacks (FID, ReconstructionMSE, SampleGrid) evaluate."""

    def test_step(self, batch, batch_idx: int) -> None:
        """No model-side test loss: metric callbacks compute the paper's test metrics."""
