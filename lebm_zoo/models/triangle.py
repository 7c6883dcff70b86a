"""Divergence triangle (Han, Nijkamp, Fang, Hill, Zhu, Wu, "Divergence Triangle for Joint Training of Generator
Model, Energy-Based Model, and Inferential Model", CVPR 2019).

Reference: the authors' code, repository ``enijkamp/triangle``, file ``train_cifar10.py`` at commit ``0a23e34``
(written for PyTorch 1.1). Line numbers below are that file's.

Three networks are learned jointly without MCMC: a generator G(z), an energy E(x) on images (lower = more likely)
and an inference network I(x) = (mu, log sigma^2) of a diagonal Gaussian q(z | x). One training iteration, on a batch
x of B images and z ~ N(0, I_nz), in this order (lines 293-373), each network with its own Adam and its gradient
clipped to L2 norm 100 before its step:

1. E: ``loss_E = mean_b E(x_b) - mean_b E(G(z)_b)``, G(z) detached (G's samples are the EBM's negatives).
2. I: ``loss_I = vae_weight * (recon + kl_weight * KL) + latent_weight * latent`` with
   ``recon = sum_{b,c,h,w} (G(z_x) - x)^2 / B`` at the reparameterised ``z_x = mu(x) + eps * exp(logvar(x) / 2)``,
   ``KL = -1/2 * mean over the B x nz entries of (1 + logvar - mu^2 - exp(logvar))`` (a mean over entries, not a
   per-sample sum, as line 333) and ``latent = mean_b sum_j [logvar_j / 2 + (z_j - mu_j)^2 / (2 (exp(logvar_j) +
   1e-6))]`` with (mu, logvar) = I(G(z)) and G(z) detached: the negative log-density of z under q(z | G(z)),
   summed over the nz dimensions and averaged over the batch, without the constant (nz / 2) log 2 pi (lines 232-238,
   337).
3. G, with the E and I just updated: ``loss_G = vae_weight * recon' + mean_b E(G(z)_b) + latent_weight * latent'``,
   recon' from a fresh reparameterisation draw and G(z) not detached (the same G(z) as in steps 1-2; lines 353-373).
   The gradients this leaves on E and I are cleared before their next backward.

Identical to the reference at its CIFAR-10 settings (32 px RGB, nz 100, widths 64): the three networks, layer by
layer (see :class:`TriangleGenerator`, :class:`ConvEnergy`, :class:`TriangleEncoder`; 13,743,820 parameters),
their initialisation (every conv / transposed-conv weight N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0,
the biases of the final convs left at PyTorch's default, lines 122-128), the three losses and their reductions, the
update order, Adam with lr 1e-4 (E), 3e-4 (G, I), betas (0.5, 0.999), eps 1e-8, L2 weight decay 5e-4 on G only,
gradient-norm clipping at 100 after the backward and before the step, and ExponentialLR(0.998) stepped once before
every epoch, so epoch e (from 0) trains at ``lr * 0.998^(e + 1)`` (lines 281-288). The energy is the raw output of E
(the reference's default ``energy_form='identity'``).

Options beyond the reference (defaults reproduce it): ``kl_weight`` (an extra factor on KL only; the reference has
none), ``refine_steps`` (Langevin refinement of samples in :meth:`DivergenceTriangle.sample`, off by default; not
used in training), ``img_size`` 28 or 64 and ``channels`` 1 (the reference is 32 px RGB only, see the networks),
and ``grad_clip=None`` (no clipping, the reference's ``--is_grad_clamp* False``). The reference's per-network
clip norms and gammas (all 100 and 0.998 by default) are one ``grad_clip`` and one ``lr_decay`` here. Naming: the
reference builds its G with ``--ndf`` and its E with ``--ngf`` (lines 200, 205; both 64); here ``ngf`` is G's
width and ``ndf`` E's. Not replicated: PyTorch 1.1's Adam added eps to sqrt(v) before the bias correction (an
effective eps of ``1e-8 / sqrt(1 - 0.999^t)`` at step t); this uses the installed ``torch.optim.Adam``.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lebm_zoo.models.base import EBMModule
from lebm_zoo.models.registry import register_family
from lebm_zoo.nets import ConvEnergy, _check_size, down_trunk, normal_init
from lebm_zoo.samplers import LangevinSampler, as_normal_tensor
from lebm_zoo.utils import check_count, check_images, full_precision

__all__ = ["DivergenceTriangle", "TriangleEncoder", "TriangleGenerator", "diag_normal_nll"]

#: added to the variance in the latent negative log-density (reference line 237)
NLL_VAR_EPS = 1e-6



def diag_normal_nll(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Per-sample -log N(z; mu, diag(exp(logvar) + 1e-6)) without the constant (nz / 2) log 2 pi, in nats.

    ``sum_j [logvar_j / 2 + (z_j - mu_j)^2 / (2 (exp(logvar_j) + 1e-6))]``, the reference's latent term: the 1e-6
    enters the quadratic term only. ``(B, nz)`` each -> ``(B,)``.
    """
    quad = (z - mu).pow(2) / (NLL_VAR_EPS + torch.exp(logvar))
    return 0.5 * logvar.sum(1) + 0.5 * quad.sum(1)


# ------------------------------------------------------------------------------------------------------ networks
class TriangleGenerator(nn.Module):
    """Divergence-triangle generator G(z) (reference lines 135-159).

    ConvT(nz -> 8ngf, k4 s1 p0), then ConvT k4 s2 p1 to 8ngf, 4ngf, 2ngf (1 -> 4 -> 8 -> 16 -> 32 px), each without
    bias and followed by BatchNorm (PyTorch defaults: eps 1e-5, momentum 0.1, affine) and ReLU, then
    ConvT(2ngf -> channels, k3 s1 p1, with bias) and Tanh. Init: see :func:`normal_init`. Extensions beyond the
    reference (32 px): at 28 px the second ConvT is k3 (4 -> 7 -> 14 -> 28); at 64 px one more ConvT k4 s2 p1 to ngf
    (with BN and ReLU) precedes the output layer.

    Shapes: ``z`` ``(B, nz)`` -> ``(B, channels, img_size, img_size)`` in [-1, 1].
    """

    def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 32, channels: int = 3):
        super().__init__()
        _check_size(img_size)
        widths = [8 * ngf, 8 * ngf, 4 * ngf, 2 * ngf] + ([ngf] if img_size == 64 else [])
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False), nn.BatchNorm2d(widths[0]),
                                   nn.ReLU()]
        for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
            k = 3 if (img_size == 28 and i == 0) else 4
            layers += [nn.ConvTranspose2d(cin, cout, k, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.nz = nz
        normal_init(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


class TriangleEncoder(nn.Module):
    """Divergence-triangle inference network I(x) = (mu, log sigma^2) of a diagonal Gaussian q(z | x) (reference
    lines 179-198).

    Conv(channels -> nf, k3 s1 p1), Conv k4 s2 p1 to 2nf, 4nf, 8nf, all without bias and each followed by
    LeakyReLU(0.2), then two heads Conv(8nf -> nz, with bias) over the remaining map for mu and log sigma^2 (the
    reference's ``log_sigma`` is a log-variance: it is halved for the standard deviation). Init: see
    :func:`normal_init`. Extensions as :class:`~lebm_zoo.nets.ConvEnergy` (at 64 px the extra conv is 8nf -> 8nf).

    Shapes: ``x`` ``(B, channels, img_size, img_size)`` -> ``(mu, logvar)``, each ``(B, nz)``.
    """

    def __init__(self, channels: int = 3, img_size: int = 32, nz: int = 100, nf: int = 64):
        super().__init__()
        _check_size(img_size)
        widths = [nf, 2 * nf, 4 * nf, 8 * nf] + ([8 * nf] if img_size == 64 else [])
        self.trunk, size = down_trunk(channels, img_size, widths, bias=False)
        self.mu = nn.Conv2d(widths[-1], nz, size, 1, 0)
        self.logvar = nn.Conv2d(widths[-1], nz, size, 1, 0)
        normal_init(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.mu(h).flatten(1), self.logvar(h).flatten(1)


# ------------------------------------------------------------------------------------------------------ model
@register_family(tiny={"DivergenceTriangle": dict(img_size=28, channels=1, nz=8, ngf=4, ndf=4, nif=4)})
class DivergenceTriangle(EBMModule):
    """Generator, image energy and inference network trained by the divergence triangle (Han et al. 2019).

    The training step is the reference's (``enijkamp/triangle`` ``train_cifar10.py`` @0a23e34; the module docstring
    lists the equations, what is identical and the options that go beyond it). Defaults are its CIFAR-10 recipe:
    ``nz=100``, widths 64, Adam lr 1e-4 (E), 3e-4 (G, I) with betas (0.5, 0.999), weight decay 5e-4 on G only,
    gradient-norm clipping at 100 for all three, ExponentialLR 0.998 stepped before each epoch, latent-loss weight 0.1,
    vae_weight 1.

    Args:
        img_size: 28, 32 or 64 (pixels; the reference is 32).
        channels: 1 or 3.
        nz: latent size.
        ngf, ndf, nif: widths of G, E and I.
        lr_e, lr_g, lr_i: Adam learning rates.
        betas: Adam betas of all three.
        weight_decay_g: Adam (L2) weight decay of G; E and I have none.
        grad_clip: gradient-norm clip of each network (None: off).
        lr_decay: ExponentialLR gamma of all three, stepped at the start of every epoch (as the reference), so that
            epoch e (from 0) trains at ``lr * lr_decay^(e + 1)``.
        latent_weight: weight of the latent negative log-density term in the I and G losses (reference: 0.1).
        vae_weight: the reference's ``vfactor``: the factor on ``recon + KL`` in the I loss and on ``recon`` in the G
            loss (reference: 1).
        kl_weight: an extra factor on the KL term alone (not in the reference; 1 reproduces it).
        refine_steps: default number of Langevin steps on E that :meth:`sample` applies to G's samples (0: none, as
            the paper's sampler).
        refine_step_size: step size of that refinement (textbook Langevin on -E(x)).

    Images are ``(B, channels, img_size, img_size)`` in [-1, 1]; latents ``(B, nz)``.
    """

    #: layer sizes, each an integer >= 1 (checked when the hyperparameters are saved)
    size_hparams = ("nz", "ngf", "ndf", "nif")
    #: hyperparameters a resumed run may change (the others come from the checkpoint)
    resume_hparams = (
        "lr_e", "lr_g", "lr_i", "betas", "weight_decay_g", "grad_clip", "lr_decay", "latent_weight", "vae_weight",
        "kl_weight", "refine_steps", "refine_step_size")

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
        vae_weight: float = 1.0,
        kl_weight: float = 1.0,
        refine_steps: int = 0,
        refine_step_size: float = 0.01,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.generator = TriangleGenerator(nz=nz, ngf=ngf, img_size=img_size, channels=channels)
        self.energy_net = ConvEnergy(channels=channels, img_size=img_size, nf=ndf)
        self.encoder = TriangleEncoder(channels=channels, img_size=img_size, nz=nz, nf=nif)
        self.samplers = {"refine": LangevinSampler(refine_steps, refine_step_size)}

    # ------------------------------------------------------------------------------------------------ public API
    def energy(self, x: Tensor) -> Tensor:
        """E(x) (lower = more likely): images ``(B, C, H, W)`` in [-1, 1] -> ``(B,)`` in at least fp32, up to log Z.

        Raises:
            DataShapeError: for images of another shape, an integer dtype or non-finite values.
        """
        if self.called_by_user():
            check_images(x, self.hparams.channels, self.hparams.img_size, where=f"{type(self).__name__}.energy",
                         value_range=None)
        return full_precision(self.energy_net(x))

    @torch.no_grad()
    def infer_latent(self, x: Tensor) -> Tensor:
        """The mean of q(z | x) given by I: images ``(B, C, H, W)`` in [-1, 1] -> latents ``(B, nz)``.

        Raises:
            DataShapeError: for images of another shape, an integer dtype, values outside [-1, 1] or non-finite ones.
        """
        return self._infer_latent(x, f"{type(self).__name__}.infer_latent")

    def _infer_latent(self, x: Tensor, where: str) -> Tensor:
        check_images(x, self.hparams.channels, self.hparams.img_size, where=where)
        return full_precision(self.encoder(as_normal_tensor(x.to(self.device)))[0])

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """G(mean of q(z | x)): images ``(B, C, H, W)`` in [-1, 1] -> same shape and range.

        Raises:
            DataShapeError: for bad images, as :meth:`infer_latent`.
        """
        return full_precision(self.generator(self._infer_latent(x, f"{type(self).__name__}.reconstruct")))

    @torch.no_grad()
    def sample(self, n: int, refine_steps: int | None = None, refine_step_size: float | None = None,
               clamp: bool = True) -> Tensor:
        """Draw ``n`` images G(z), z ~ N(0, I), optionally refined by Langevin on the energy.

        Args:
            n: number of images.
            refine_steps: Langevin steps on ``-E(x)`` after G (default: the ``refine_steps`` hyperparameter, 0).
            refine_step_size: their step size (default: the ``refine_step_size`` hyperparameter).
            clamp: clip the images to [-1, 1], the data range every image family's ``sample`` returns; False returns
                the raw chain states.

        Returns:
            ``(n, C, H, W)`` images on the model's device in [-1, 1] (G's outputs are; refined ones are clipped unless
            ``clamp=False``).

        Raises:
            ValueError: for ``n`` < 1 or not an integer, a negative ``refine_steps`` or a non-positive
                ``refine_step_size`` (see :meth:`~lebm_zoo.models.base.EBMModule.refine`).
        """
        n = check_count(n, where=f"{type(self).__name__}.sample")
        x = full_precision(self.generator(self._prior_noise(n)))
        x = self.refine(x, refine_steps, refine_step_size)
        return x.clamp(-1, 1) if clamp else x

    # ------------------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        hp = self.hparams
        opt_e = self.adam(self.energy_net.parameters(), hp.lr_e)
        opt_i = self.adam(self.encoder.parameters(), hp.lr_i)
        opt_g = self.adam(self.generator.parameters(), hp.lr_g, weight_decay=hp.weight_decay_g)
        scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=hp.lr_decay) for o in (opt_e, opt_i, opt_g)]
        return [opt_e, opt_i, opt_g], scheds

    def _prior_noise(self, n: int) -> Tensor:
        """z ~ N(0, I), ``(n, nz)``, in the generator's parameter dtype."""
        p = next(self.generator.parameters())
        return torch.randn(n, self.hparams.nz, device=p.device, dtype=p.dtype)

    def _recon_and_kl(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``sum (G(z_x) - x)^2 / B`` at a reparameterised z_x ~ q(z | x), and the KL to N(0, I) averaged over all
        B x nz entries (reference lines 329-333)."""
        mu, logvar = self.encoder(x)
        mu, logvar = full_precision(mu), full_precision(logvar)
        z_x = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = (full_precision(self.generator(z_x)) - x).pow(2).sum() / x.shape[0]
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()
        return recon, kl

    def _latent_nll(self, x_gen: Tensor, z: Tensor) -> Tensor:
        """``mean_b -log q(z_b | x_gen_b)`` up to a constant, summed over the nz dimensions (reference line 337)."""
        mu, logvar = self.encoder(x_gen)
        return diag_normal_nll(z, full_precision(mu), full_precision(logvar)).mean()

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        x = self.data_from_batch(batch)  # (B, C, H, W) in [-1, 1]
        b = x.shape[0]
        opt_e, opt_i, opt_g = self.optimizers()
        z = self._prior_noise(b)  # (B, nz)
        x_gen = self.generator(z)  # (B, C, H, W)

        # 1. E: data energy down, generated energy up
        en_pos, en_neg = self.energy(x), self.energy(x_gen.detach())
        loss_e = en_pos.mean() - en_neg.mean()
        # 2. I: recon + KL + latent NLL of z under q(z | G(z)); I's loss does not depend on E
        recon, kl = self._recon_and_kl(x)
        latent = self._latent_nll(x_gen.detach(), z)
        loss_i = hp.vae_weight * (recon + hp.kl_weight * kl) + hp.latent_weight * latent
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

        # 3. G, with the updated E and I: recon (fresh draw) + E(G(z)) + latent NLL, G(z) not detached
        recon_g, _ = self._recon_and_kl(x)
        en_gen = self.energy(x_gen)
        latent_g = self._latent_nll(x_gen, z)
        loss_g = hp.vae_weight * recon_g + en_gen.mean() + hp.latent_weight * latent_g
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
        self.log_train(logs, {"recon": recon, "gap": -loss_e}, batch_size=b)

    def on_train_epoch_start(self) -> None:
        """Bring every scheduler to ``last_epoch = current_epoch + 1`` (the reference steps them before each epoch).

        Stepping up to a target rather than once per call keeps the per-epoch lr right when a run resumes from a
        mid-epoch checkpoint (whose schedulers were already stepped for that epoch).
        """
        super().on_train_epoch_start()  # the resume bookkeeping of EBMModule (RNG states)
        scheds = self.lr_schedulers()
        if scheds is None or self.divergence:
            return
        with warnings.catch_warnings():  # stepping before the first optimiser step is the reference's order
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            for s in scheds if isinstance(scheds, list) else [scheds]:
                while s.last_epoch < self.current_epoch + 1:
                    s.step()
