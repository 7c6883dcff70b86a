"""Cooperative networks (Xie, Lu, Gao, Wang, Wu, "Cooperative Training of Descriptor and Generator Networks",
TPAMI 2018; AAAI 2018), following the official TF code (jianwen-xie/CoopNets ``main.py``, ``model/model.py``).

A descriptor (the Generative ConvNet, an EBM with score f(Y) and Gaussian reference N(0, sigma_d^2 I)) and a
generator g(z) learn together by MCMC teaching. Training step (``families.md`` §3, in order):

1. z ~ N(0, I) for ``n_chains`` chains, draft X = g(z);
2. descriptor Langevin from X, T steps: ``Y <- Y - (delta^2/2) (Y / sigma_d^2 - grad f(Y)) + delta eps``;
3. (optional, off by default) Langevin on z to explain Y under the generator;
4. descriptor update: minimise ``mean f(Y) - mean f(X_obs)``;
5. generator update: minimise ``mean_batch sum_pixels ||Y - g(z)||^2 / (2 sigma_g^2)`` with the same z, Y as data.

The PyTorch port's deviations (LeakyReLU 0.01, a batch-summed generator loss, per-image min-max scaling in BGR,
noise off by default) are not copied.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lebm_zoo.models.base import EBMModule
from lebm_zoo.nets import CoopDescriptor, CoopGenerator
from lebm_zoo.samplers import LangevinSampler
from lebm_zoo.utils import images_from_batch

__all__ = ["CoopNets"]


class CoopNets(EBMModule):
    """Descriptor (EBM) plus generator trained cooperatively by MCMC teaching (Xie et al. 2018).

    Defaults are the official TF recipe (TPAMI column of ``families.md`` §3): ``nz=100``, 144 synthesised chains
    per observed batch, descriptor Langevin T=15, delta=0.002, sigma_d=0.016 with noise, generator inference off
    (0 steps; delta=0.1 when on), sigma_g=0.3, Adam lr 0.007 (descriptor) and 1e-4 (generator), beta1 0.5.

    Args:
        img_size: 28, 32 or 64 (pixels).
        channels: 1 or 3.
        nz: latent size of the generator.
        ngf: generator width (:class:`~lebm_zoo.nets.CoopGenerator`).
        ndf: descriptor width (:class:`~lebm_zoo.nets.CoopDescriptor`).
        n_out: outputs summed into the descriptor score (reference: 100).
        n_chains: synthesised chains per iteration (reference: 144; the observed batch is the datamodule's).
        descriptor_steps, descriptor_step_size, descriptor_sigma: T, delta and sigma_d of the descriptor Langevin.
        descriptor_noise: inject the Langevin noise (reference TF: on).
        generator_steps, generator_step_size: Langevin inference of z for the generator (reference: 0 = off, 0.1).
        generator_sigma: sigma_g of the generator's Gaussian likelihood, in [-1, 1] pixel units.
        lr_d, lr_g: Adam learning rates of the descriptor and the generator.
        betas: Adam betas of both.
        grad_clip_d, grad_clip_g: optional max gradient norms (reference: off).

    Images are ``(B, channels, img_size, img_size)`` in [-1, 1]; latents ``(B, nz)``.
    """

    def __init__(
        self,
        img_size: int = 32,
        channels: int = 3,
        nz: int = 100,
        ngf: int = 64,
        ndf: int = 64,
        n_out: int = 100,
        n_chains: int = 144,
        descriptor_steps: int = 15,
        descriptor_step_size: float = 0.002,
        descriptor_sigma: float = 0.016,
        descriptor_noise: bool = True,
        generator_steps: int = 0,
        generator_step_size: float = 0.1,
        generator_sigma: float = 0.3,
        lr_d: float = 0.007,
        lr_g: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        grad_clip_d: float | None = None,
        grad_clip_g: float | None = None,
    ):
        super().__init__()
        if n_chains < 1:
            raise ValueError(f"n_chains must be >= 1, got {n_chains}")
        if descriptor_sigma <= 0 or generator_sigma <= 0:
            raise ValueError(f"descriptor_sigma and generator_sigma must be > 0, got {descriptor_sigma}, "
                             f"{generator_sigma}")
        self.save_hyperparameters()
        self.descriptor = CoopDescriptor(channels=channels, img_size=img_size, ndf=ndf, n_out=n_out)
        self.generator = CoopGenerator(nz=nz, ngf=ngf, img_size=img_size, channels=channels)
        self.samplers = {
            "descriptor": LangevinSampler(descriptor_steps, descriptor_step_size,
                                          noise_scale=1.0 if descriptor_noise else 0.0),
            "generator": LangevinSampler(generator_steps, generator_step_size),
        }

    # ------------------------------------------------------------------------------------------------ densities
    def score(self, x: Tensor) -> Tensor:
        """Descriptor score f(Y) (higher = more likely): ``(B, C, H, W)`` in [-1, 1] -> ``(B,)`` fp32."""
        return self.descriptor(x).float()

    def log_prob(self, x: Tensor) -> Tensor:
        """Descriptor's unnormalised log-density ``f(Y) - ||Y||^2 / (2 sigma_d^2)``, ``(B,)`` in nats."""
        return self.score(x) - x.flatten(1).float().pow(2).sum(1) / (2 * self.hparams.descriptor_sigma ** 2)

    def energy(self, x: Tensor) -> Tensor:
        """Descriptor energy ``-log_prob(x)`` (lower = more likely), ``(B,)``, up to the log-normaliser."""
        return -self.log_prob(x)

    def generator_log_joint(self, y: Tensor, z: Tensor) -> Tensor:
        """``log p(Y, z) = -||Y - g(z)||^2 / (2 sigma_g^2) - ||z||^2 / 2`` up to constants, ``(B,)``."""
        rec = (y - self.generator(z).float()).flatten(1).pow(2).sum(1)
        return -rec / (2 * self.hparams.generator_sigma ** 2) - z.pow(2).sum(1) / 2

    # ------------------------------------------------------------------------------------------------ sampling
    def revise(self, x: Tensor, n_steps: int | None = None) -> Tensor:
        """Descriptor Langevin revision of images ``(B, C, H, W)`` (T steps by default) -> same shape."""
        return self.langevin(self.log_prob, x.float(), "descriptor", n_steps=n_steps)

    @torch.no_grad()
    def sample(self, n: int, refine: bool = True, n_steps: int | None = None) -> Tensor:
        """Draw ``n`` images: the generator's draft g(z), z ~ N(0, I), revised by descriptor Langevin if ``refine``.

        The generator's BatchNorm uses the statistics of the batch being drawn (as the reference), so draw in
        batches of tens of images or more.

        Args:
            n: number of images.
            refine: revise the drafts by ``n_steps`` descriptor Langevin steps (the model's samples); False returns
                the generator's drafts.
            n_steps: revision length (default: ``descriptor_steps``, as in training).

        Returns:
            ``(n, C, H, W)`` images on the model's device (revised images are not clamped to [-1, 1]).
        """
        z = torch.randn(n, self.hparams.nz, device=self.device)
        draft = self.generator(z).float()
        return self.revise(draft, n_steps) if refine else draft

    # ------------------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        hp = self.hparams
        opt_d = torch.optim.Adam(self.descriptor.parameters(), lr=hp.lr_d, betas=tuple(hp.betas))
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp.lr_g, betas=tuple(hp.betas))
        return [opt_d, opt_g]

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        x_obs = images_from_batch(batch)  # (B, C, H, W) in [-1, 1]
        self.check_data_shape(x_obs, (hp.channels, hp.img_size, hp.img_size),
                              "Set --model.channels/--model.img_size.")
        b = x_obs.shape[0]
        opt_d, opt_g = self.optimizers()

        z = torch.randn(hp.n_chains, hp.nz, device=self.device)  # (N, nz)
        x_draft = self.generator(z)  # (N, C, H, W); its graph serves the generator loss below
        y = self.revise(x_draft.detach())  # (N, C, H, W) descriptor revisions, T Langevin steps
        if hp.generator_steps > 0:  # optional inference of z for the revisions (off in the reference)
            z = self.langevin(lambda zz: self.generator_log_joint(y, zz), z, "generator")
            x_draft = self.generator(z)

        f_pos, f_neg = self.score(x_obs), self.score(y)  # (B,), (N,)
        loss_d = f_neg.mean() - f_pos.mean()  # descriptor: data up, revisions down
        loss_g = (y - x_draft.float()).flatten(1).pow(2).sum(1).mean() / (2 * hp.generator_sigma ** 2)
        if not self.check_finite({"loss_d": loss_d, "loss_g": loss_g}):
            return
        # f depends only on the descriptor and Y is detached; g(z) depends only on the generator: one backward of the
        # sum gives each network exactly its own loss's gradient.
        opt_d.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_d + loss_g)
        logs = {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "score_pos": f_pos.mean().detach(),
                "score_neg": f_neg.mean().detach(),
                "grad_norm_d": self.grad_norm_and_clip(self.descriptor.parameters(), hp.grad_clip_d),
                "grad_norm_g": self.grad_norm_and_clip(self.generator.parameters(), hp.grad_clip_g),
                # how far the descriptor moved the drafts: per-pixel RMS of Y - g(z)
                "revision_rms": (y - x_draft.detach().float()).pow(2).mean().sqrt()}
        opt_d.step()  # descriptor first, then generator (reference order)
        self.step_uncounted(opt_g)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=b)
        self.log_dict({"loss_g": logs["loss_g"], "gap": -logs["loss_d"]}, prog_bar=True, logger=False, batch_size=b)

    def validation_step(self, batch, batch_idx: int) -> None:
        """No model-side validation loss: metric callbacks (FID, SampleGrid) do the evaluation."""

    def test_step(self, batch, batch_idx: int) -> None:
        """No model-side test loss: metric callbacks compute the paper's test metrics."""
