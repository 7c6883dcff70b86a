"""Latent-space EBM prior (Pang, Han, Nijkamp, Zhu, Wu, "Learning Latent Space Energy-Based Prior Model",
NeurIPS 2020), following the authors' ``train_svhn.py`` (bpucla/latent-space-EBM-prior @a530d0f).

Model::

    z ~ p_a(z) = exp(-E_a(z)) N(z; 0, sigma_p^2 I) / Z(a)        latent EBM prior (eq. 2)
    x = G_b(z) + eps,  eps ~ N(0, llhd_sigma^2 I)                generator (eq. 1)

Training step (``docs/fidelity.md``, LatentEBMPrior; in this order): posterior Langevin from fresh N(0, I) noise
(K1 steps, step s1) on log p(x, z); prior Langevin from fresh N(0, I) noise (K0 steps, step s0) on log p_a(z);
generator update on ``sum((G(z+) - x)^2) / B``; energy update on ``mean E(z+) - mean E(z-)`` (eq. 9-11). Both
updates use chains run with the parameters from before the updates. ``prior="gaussian"`` drops the energy term: the
same generator learned by alternating back-propagation (Han et al., 2017), the ablation LEBM is measured against.

:class:`LatentPriorBase` holds the prior, both chains and the training step; :class:`LatentEBMPrior` (images, here)
and :class:`~lebm_zoo.SequenceLatentEBMPrior` (token sequences, :mod:`lebm_zoo.models.latent_sequence`) each add their
generator and data.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from lebm_zoo.models.base import EBMModule, epoch_completed
from lebm_zoo.models.registry import register_family
from lebm_zoo.nets import ConvGenerator, EnergyMLP
from lebm_zoo.samplers import GaussianTiltedTarget, LangevinSampler, as_normal_tensor
from lebm_zoo.utils import check_count, check_images, check_latents, full_precision, images_from_batch, in_training_loop

__all__ = ["LatentEBMPrior", "LatentImagesMixin", "LatentPriorBase"]


class LatentPriorBase(EBMModule):
    """The latent-space EBM prior and its two short-run chains, shared by the image model (:class:`LatentEBMPrior`)
    and the sequence model (:class:`~lebm_zoo.SequenceLatentEBMPrior`), which each build their own generator.

    It holds the prior ``p_a(z) = exp(-E_a(z)) N(z; 0, sigma_p^2 I) / Z(a)`` (the energy MLP ``energy_net``, None for
    ``prior="gaussian"``), the prior and posterior Langevin samplers, the densities built on them, latent sampling and
    posterior inference, the training step (posterior chain, prior chain, generator update, energy update; see the
    module docstring), its optimisers and schedules, and the early stop on the generator loss.

    A subclass declares its hyperparameters in its own ``__init__`` (with its own defaults), calls
    :meth:`_check_prior_args`, ``self.save_hyperparameters()`` and :meth:`_build_prior` and builds ``self.generator``
    (in its own order: the order in which the networks are built fixes their initial weights); and implements the data
    hooks: :meth:`prepare_data_input`, :meth:`data_batch_size`, :meth:`log_likelihood`, :meth:`generator_loss`,
    :meth:`_generate` and, for data other than images of the ``channels`` / ``img_size`` hyperparameters,
    ``data_from_batch`` (a training batch, checked; :meth:`EBMModule.data_from_batch` for images).

    Hyperparameters read here (see :class:`LatentEBMPrior` for their meaning): ``nz``, ``ndf``, ``e_activation``,
    ``prior``, ``prior_steps``, ``prior_step_size``, ``posterior_steps``, ``posterior_step_size``, ``prior_sigma``,
    ``lr_g``, ``lr_e``, ``betas``, ``lr_decay``, ``grad_clip_g``, ``grad_clip_e``; optional: ``lr_schedule`` (absent:
    ``"exponential"``), ``loss_g_limit`` (absent: off), ``loss_g_limit_after_epoch``, ``loss_g_limit_check``,
    ``compile_chains`` (absent: eager chains), ``compile_scope`` (absent: ``"step"``), ``capture_step`` (absent:
    off; data that is not one tensor overrides :meth:`~lebm_zoo.models.base.EBMModule.forward_backward` to give the
    region tensors).

    Latents are ``(B, nz)``; "data" is the subclass's (images, token batches).
    """

    @staticmethod
    def _check_prior_args(prior: str, prior_sigma: float) -> None:
        """Raise ValueError for a ``prior`` other than "ebm" / "gaussian" or a non-positive ``prior_sigma``."""
        if prior not in ("ebm", "gaussian"):
            raise ValueError(f"prior must be 'ebm' or 'gaussian', got {prior!r}")
        if prior_sigma <= 0:
            raise ValueError(f"prior_sigma must be > 0, got {prior_sigma}")

    def _build_prior(self) -> None:
        """The energy net (``prior="ebm"``) and the prior and posterior samplers, from the hyperparameters."""
        hp = self.hparams
        self.energy_net = EnergyMLP(nz=hp.nz, ndf=hp.ndf, activation=hp.e_activation) if hp.prior == "ebm" else None
        compiled = self.chain_compile_kwargs()
        self.samplers = {
            "prior": LangevinSampler(hp.prior_steps, hp.prior_step_size, **compiled),
            "posterior": LangevinSampler(hp.posterior_steps, hp.posterior_step_size, **compiled),
        }

    # ------------------------------------------------------------------------------------------------ densities
    @property
    def is_ebm(self) -> bool:
        return self.energy_net is not None

    def energy(self, z: Tensor) -> Tensor:
        """Prior energy E_a(z) (lower = more likely), the tilt of the Gaussian reference (eq. 2).

        Args:
            z: latents ``(B, nz)``.

        Returns:
            ``(B,)`` energies in nats, up to the prior's log-normaliser; zeros for ``prior="gaussian"``.

        Raises:
            DataShapeError: for latents that are not ``(B, nz)`` finite floats.
        """
        if self.called_by_user():
            check_latents(z, self.hparams.nz, where=f"{type(self).__name__}.energy")
        if self.energy_net is None:
            return z.new_zeros(z.shape[0])
        return full_precision(self.energy_net(z))

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """Unnormalised log p_a(z) = -E(z) - ||z||^2 / (2 sigma_p^2), ``(B, nz) -> (B,)`` in nats.

        Raises:
            DataShapeError: for latents that are not ``(B, nz)`` finite floats.
        """
        if self.called_by_user():
            check_latents(z, self.hparams.nz, where=f"{type(self).__name__}.prior_log_prob")
        return -self.energy(z) - z.flatten(1).pow(2).sum(1) / (2 * self.hparams.prior_sigma ** 2)

    def log_likelihood(self, x, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """log p(x | z) of the subclass's generator, ``(B,)`` in nats (up to a constant)."""
        raise NotImplementedError

    def neg_log_likelihood(self, x, z: Tensor) -> Tensor:
        """-log p(x | z), ``(B,)`` in nats: the posterior chain's data energy (a subclass may compute it directly)."""
        return -self.log_likelihood(x, z)

    def prior_target(self) -> Callable[[Tensor], Tensor]:
        """The prior chain's target ``(B, nz) -> (B,)``: :meth:`prior_log_prob` as a
        :class:`~lebm_zoo.samplers.GaussianTiltedTarget` (the energy :meth:`energy` tilting N(0, prior_sigma^2)),
        whose Gaussian gradient the eager sampler takes in closed form, as the reference; the plain
        :meth:`prior_log_prob` if a subclass overrides it."""
        if type(self).prior_log_prob is not LatentPriorBase.prior_log_prob:
            return self.prior_log_prob
        return GaussianTiltedTarget(self.energy, self.hparams.prior_sigma)

    def posterior_target(self, x) -> Callable[[Tensor], Tensor]:
        """The posterior chain's target for data ``x`` (checked and on the model's device), ``(B, nz) -> (B,)``:
        :meth:`log_joint` as a :class:`~lebm_zoo.samplers.GaussianTiltedTarget` of the energy ``-log p(x | z) +
        E(z)``; the plain ``log_joint(x, .)`` if a subclass overrides :meth:`log_joint` or :meth:`prior_log_prob`."""
        cls = type(self)
        if cls.log_joint is not LatentPriorBase.log_joint or cls.prior_log_prob is not LatentPriorBase.prior_log_prob:
            return lambda z: self.log_joint(x, z)
        mro = [c.__dict__ for c in cls.__mro__]
        where = {name: next(i for i, d in enumerate(mro) if name in d) for name in ("log_likelihood",
                                                                                  "neg_log_likelihood")}
        if where["neg_log_likelihood"] <= where["log_likelihood"]:
            nll = self.neg_log_likelihood
        else:  # a subclass changed log_likelihood below the class that wrote neg_log_likelihood for the old one
            def nll(x, z):
                return -self.log_likelihood(x, z)
        if self.energy_net is None:
            return GaussianTiltedTarget(lambda z: nll(x, z), self.hparams.prior_sigma)
        return GaussianTiltedTarget(lambda z: nll(x, z) + self.energy(z), self.hparams.prior_sigma)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """Unnormalised log p(x, z) = log p(x | z) - E(z) - ||z||^2 / (2 sigma_p^2).

        For images, log p(x | z) = -||x - G(z)||^2 / (2 llhd_sigma^2). The posterior Langevin target (eq. 8); also the
        anomaly score of the paper.

        Args:
            x: the model's data: images ``(B, C, H, W)`` in [-1, 1], token batches for the sequence model.
            z: latents ``(B, nz)``.

        Returns:
            ``(B,)`` in nats, up to constants (the Gaussian normalisers and log Z(a)).

        Raises:
            DataShapeError: for bad data (as :meth:`infer_latent`) or latents that are not ``(B, nz)`` finite floats
                with the data's B (no broadcasting of one against the other).
        """
        if self.called_by_user():
            where = f"{type(self).__name__}.log_joint"
            x = self.prepare_data_input(x, where)
            z = check_latents(z, self.hparams.nz, batch=self.data_batch_size(x), where=where).to(self.device)
        return self.log_likelihood(x, z) + self.prior_log_prob(z)

    def generator_loss(self, x, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The generator's loss at posterior latents ``z`` ``(B, nz)`` (a scalar)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ data hooks
    def prepare_data_input(self, x, where: str = ""):  # pragma: no cover - abstract
        """Check data given to a public method (named ``where`` in the error) and move it to the model's device."""
        raise NotImplementedError

    @staticmethod
    def data_batch_size(x) -> int:  # pragma: no cover - abstract
        """The number of items in the data ``x``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ sampling
    def _noise(self, n: int) -> Tensor:
        return torch.randn(n, self.hparams.nz, device=self.device)

    @torch.no_grad()
    def sample_latent(self, n: int, z0: Tensor | None = None, n_steps: int | None = None,
                      return_trace: bool = False):
        """Draw ``n`` latents from the prior by short-run Langevin (K0 steps from N(0, I); eq. 7).

        For ``prior="gaussian"`` this is exact N(0, sigma_p^2 I) sampling.

        Args:
            n: number of latents.
            z0: initial states ``(n, nz)`` (default: fresh N(0, I) noise, as in training).
            n_steps: chain length (default: ``prior_steps``).
            return_trace: also return the chain's trace: ``trace["log_prob"]``, ``(n_steps,)``, the mean unnormalised
                prior log-density at the start of each step (its negative is the energy profile of the chain).

        Returns:
            ``(n, nz)`` latents, or ``(latents, trace)``.

        Raises:
            ValueError: for ``n`` < 1 or not an integer. DataShapeError: for a ``z0`` that is not ``(n, nz)`` finite
                floats.
        """
        where = f"{type(self).__name__}.sample_latent"
        n = check_count(n, where=where)
        z0 = self._noise(n) if z0 is None else check_latents(z0, self.hparams.nz, name="z0", batch=n, where=where)
        if not self.is_ebm:
            z = z0 * self.hparams.prior_sigma
            return (z, {"log_prob": z.new_zeros(0)}) if return_trace else z
        return self.langevin(self.prior_target(), z0, "prior", n_steps=n_steps, return_trace=return_trace)

    def _generate(self, z: Tensor):  # pragma: no cover - abstract
        """The generator's output for latents the model made, ``(B, nz)`` (unchecked)."""
        raise NotImplementedError

    @torch.no_grad()
    def infer_latent(self, x: Tensor, z0: Tensor | None = None, n_steps: int | None = None) -> Tensor:
        """Posterior inference: short-run Langevin on log p(x, z) from N(0, I) noise (K1 steps; eq. 8).

        Args:
            x: the model's data (see :meth:`prepare_data_input`): images ``(B, C, H, W)`` in [-1, 1] for
                :class:`LatentEBMPrior`; token batches or strings for the sequence model.
            z0: initial latents ``(B, nz)`` (default: fresh N(0, I) noise, as the reference).
            n_steps: chain length (default: ``posterior_steps``).

        Returns:
            ``(B, nz)`` latents.

        Raises:
            DataShapeError: for bad data (for images: another shape, an integer dtype, values outside [-1, 1] or
                non-finite ones; see :meth:`prepare_data_input`), or a ``z0`` that is not ``(B, nz)`` finite floats.
        """
        where = f"{type(self).__name__}.infer_latent"
        x = self.prepare_data_input(x, where)  # also: a batch made under Lightning's inference mode becomes normal
        if z0 is not None:
            z0 = check_latents(z0, self.hparams.nz, name="z0", batch=self.data_batch_size(x), where=where)
        return self._infer_latent(x, z0, n_steps)

    def _infer_latent(self, x, z0: Tensor | None = None, n_steps: int | None = None) -> Tensor:
        """:meth:`infer_latent` of data :meth:`prepare_data_input` has checked and moved."""
        z0 = self._noise(self.data_batch_size(x)) if z0 is None else z0
        return self.langevin(self.posterior_target(x), z0, "posterior", n_steps=n_steps)

    @torch.no_grad()
    def anomaly_score(self, x: Tensor, n_steps: int | None = None) -> Tensor:
        """Anomaly score: the negative unnormalised log-joint -log p(x, z) at z inferred by posterior Langevin.

        The decision function of Pang et al. (2020), anomaly detection experiment (MNIST with one held-out digit),
        for images::

            ||x - G(z)||^2 / (2 llhd_sigma^2) + E(z) + ||z||^2 / (2 sigma_p^2),   z = infer_latent(x)

        (for sequences, ``-log p(x | z)`` replaces the first term).

        z comes from a short-run chain started from fresh N(0, I) noise, so the score is random (seed the RNG to
        repeat it). Used by :class:`~lebm_zoo.callbacks.AnomalyDetectionCallback`.

        Args:
            x: the model's data, as :meth:`infer_latent`.
            n_steps: posterior chain length (default: ``posterior_steps``).

        Returns:
            ``(B,)`` float32 scores in nats, up to an additive constant (the Gaussian normalisers and log Z(a));
            higher = more anomalous.

        Raises:
            DataShapeError: for bad data, as :meth:`infer_latent`.
        """
        x = self.prepare_data_input(x, f"{type(self).__name__}.anomaly_score")
        z = self._infer_latent(x, n_steps=n_steps)
        return -self.log_joint(x, z)

    # ------------------------------------------------------------------------------------------------ training
    def _scheduler(self, optimizer):
        """The per-epoch learning-rate schedule of ``lr_schedule`` (stepped in :meth:`on_train_epoch_end`)."""
        hp = self.hparams
        if hp.get("lr_schedule", "exponential") == "reference":
            factor = functools.partial(reference_lr_factor, gamma=hp.lr_decay)
            return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=hp.lr_decay)

    def configure_optimizers(self):
        hp = self.hparams
        opt_g = self.adam(self.generator.parameters(), hp.lr_g)
        if not self.is_ebm:
            return [opt_g], [self._scheduler(opt_g)]
        opt_e = self.adam(self.energy_net.parameters(), hp.lr_e)
        return [opt_g, opt_e], [self._scheduler(opt_g), self._scheduler(opt_e)]

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        x = self.data_from_batch(batch)  # the model's data: images (B, C, H, W) in [-1, 1], token batches
        b = self.data_batch_size(x)
        opts = self.optimizers()
        opt_g, opt_e = opts if self.is_ebm else (opts, None)

        stats = self.forward_backward(x)  # with capture_step on a GPU: one CUDA graph replay
        losses = {"loss_g": stats["loss_g"], "loss_e": stats["energy_gap"]} if self.is_ebm else {
            "loss_g": stats["loss_g"]}
        limits = None
        if self._loss_g_limit_applies("per_batch"):
            limits = {"loss_g": hp.loss_g_limit}
        if not self.check_finite(losses, limits):
            return  # diverged: skip both updates; the trainer stops after this batch
        self._last_loss_g = stats["loss_g"]
        opt_g.step()  # generator first, then energy, both from the same chains (reference order)
        if self.is_ebm:
            self.step_uncounted(opt_e)  # global_step counts iterations, not optimiser steps
        prog = {"loss_g": stats["loss_g"]}
        if self.is_ebm:  # energy gap E(z+) - E(z-): near zero when prior samples match posterior samples
            prog["gap"] = stats["energy_gap"]
        self.log_train(stats, prog, batch_size=b)

    def _forward_backward(self, x, backward: Callable[[Tensor], None]) -> dict[str, Tensor]:
        """Everything of a training step but the two parameter updates: the posterior chain, the prior chain, both
        losses, one backward into ``.grad`` and the gradients' norms (clipped when ``grad_clip_g`` / ``grad_clip_e``
        are set). No host reads: with ``capture_step`` on a GPU this is what one CUDA graph holds
        (:meth:`EBMModule.forward_backward`).

        Args:
            x: the model's data, checked (:meth:`data_from_batch`).
            backward: ``loss -> None``, back-propagates the total loss (``self.manual_backward`` or
                ``Tensor.backward``).

        Returns:
            detached 0-d tensors: ``loss_g``, ``grad_norm_g`` and, for the EBM prior, ``energy_pos``, ``energy_neg``,
            ``energy_gap`` (the energy loss, mean E(z+) - mean E(z-)) and ``grad_norm_e``.
        """
        hp = self.hparams
        z_pos = self.infer_latent(x)  # (B, nz) posterior samples, K1 steps from N(0, I)
        loss_g = self.generator_loss(x, z_pos)
        stats = {"loss_g": loss_g}
        if self.is_ebm:
            z_neg = self.sample_latent(self.data_batch_size(x))  # (B, nz) prior samples, K0 steps from N(0, I)
            en_pos, en_neg = self.energy(z_pos), self.energy(z_neg)  # (B,), (B,)
            loss_e = en_pos.mean() - en_neg.mean()
            stats.update(energy_pos=en_pos.mean(), energy_neg=en_neg.mean(), energy_gap=loss_e)
        # One backward for both updates: E does not depend on G's parameters and the chains' latents are detached, so
        # grad(loss_g + loss_e) gives G exactly grad(loss_g) and E exactly grad(loss_e), as two backward passes
        # would, at the cost of one (and under DDP every parameter gets a gradient in the same all-reduce).
        opts = self.optimizers()
        for opt in opts if self.is_ebm else [opts]:
            opt.zero_grad(set_to_none=True)
        backward(loss_g + loss_e if self.is_ebm else loss_g)
        stats["grad_norm_g"] = self.grad_norm_and_clip(self.generator.parameters(), hp.grad_clip_g)
        if self.is_ebm:
            stats["grad_norm_e"] = self.grad_norm_and_clip(self.energy_net.parameters(), hp.grad_clip_e)
        return {k: v.detach() for k, v in stats.items()}

    def _loss_g_limit_applies(self, check: str) -> bool:
        hp = self.hparams
        return (hp.get("loss_g_limit") is not None and hp.get("loss_g_limit_check", "per_batch") == check
                and self.current_epoch > hp.get("loss_g_limit_after_epoch", 10))

    def on_train_epoch_end(self) -> None:
        self.step_schedulers()
        last = getattr(self, "_last_loss_g", None)
        if not (self._loss_g_limit_applies("epoch_end") and epoch_completed(self.trainer)
                and not self.replaying_epoch_end):
            return
        exceeds = last is not None and float(last) > self.hparams.loss_g_limit
        if self.trainer.world_size > 1:  # every rank stops together (each sees its own last batch)
            exceeds = self.trainer.strategy.reduce_boolean_decision(exceeds, all=False)
        if exceeds:
            last = float("nan") if last is None else last
            self.stop_training(
                f"{type(self).__name__} stopped at the end of epoch {self.current_epoch} (step {self.global_step}): "
                f"the last batch's generator loss (this rank: {float(last):.4g}) exceeds "
                f"loss_g_limit={self.hparams.loss_g_limit:g} "
                f"(the reference's early stop, after epoch {self.hparams.loss_g_limit_after_epoch}). The last "
                "weights are in the last checkpoint. Try smaller learning rates or Langevin step sizes.")


class LatentImagesMixin:
    """What the image families with latent variables share (:class:`LatentEBMPrior` and
    :class:`~lebm_zoo.models.joint_hierarchical.JointHierarchicalEBMPrior`): the checks of images given to their public
    methods, :meth:`sample` and :meth:`reconstruct`, on the family's ``sample_latent``, ``_infer_latent`` and
    ``_generate``."""

    def prepare_data_input(self, x, where: str = ""):
        """Check images given to a public method (named ``where`` in the error) and move them to the model's device,
        as a normal (not inference-mode) tensor.

        The check (:func:`~lebm_zoo.utils.check_images`: shape, dtype, finite values in [-1, 1]; one host sync) is
        skipped in the training loop, whose batches :meth:`~lebm_zoo.models.base.EBMModule.data_from_batch` has
        checked.

        Raises:
            DataShapeError: for images of another shape, an integer dtype, values outside [-1, 1] or non-finite ones.
        """
        if not in_training_loop(self):
            hp = self.hparams
            check_images(x, hp.channels, hp.img_size, where=where)
        return as_normal_tensor(x.to(self.device))

    @staticmethod
    def data_batch_size(x) -> int:
        return x.shape[0]

    @torch.no_grad()
    def sample(self, n: int, n_steps: int | None = None) -> Tensor:
        """Draw ``n`` images: prior Langevin for the latents, then the generator.

        Args:
            n: number of images.
            n_steps: prior chain length (default: ``prior_steps``, as in training).

        Returns:
            ``(n, C, H, W)`` images in [-1, 1] on the model's device.

        Raises:
            ValueError: for ``n`` < 1 or not an integer.
        """
        n = check_count(n, where=f"{type(self).__name__}.sample")
        return self._generate(self.sample_latent(n, n_steps=n_steps))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, n_steps: int | None = None) -> Tensor:
        """The generator's output at latents inferred by posterior Langevin: images ``(B, C, H, W)`` in [-1, 1] ->
        the same shape and range.

        Raises:
            DataShapeError: for bad images (see :meth:`prepare_data_input`).
        """
        x = self.prepare_data_input(x, f"{type(self).__name__}.reconstruct")
        return self._generate(self._infer_latent(x, n_steps=n_steps))


@register_family(tiny={
    "LatentEBMPrior": dict(img_size=28, channels=1, nz=8, ngf=4, ndf=16, prior_steps=2, posterior_steps=2),
})
class LatentEBMPrior(LatentImagesMixin, LatentPriorBase):
    """Generator with a latent-space energy-based prior, learned by short-run prior and posterior Langevin.

    Defaults are the reference SVHN recipe: 32x32x3 images, ``nz=100``, ``ngf=64`` (G of 3,447,683 parameters),
    E an MLP 100-200-200-1 with GELU, K0=60 s0=0.4, K1=20 s1=0.1, ``llhd_sigma=0.3``, Adam lr 1e-4 (G) and 2e-5 (E)
    with betas (0.5, 0.999), learning rates decayed by gamma 0.998 per epoch as the reference schedules them
    (``lr_schedule="reference"``), and the reference's early stop (``loss_g_limit=300`` after epoch 10, checked at
    epoch ends).

    Args:
        img_size: 28, 32 or 64 (pixels).
        channels: 1 or 3.
        nz: latent size.
        ngf: generator width (see :class:`~lebm_zoo.nets.ConvGenerator`).
        ndf: hidden width of the energy MLP.
        e_activation: ``"gelu"`` (reference) or ``"lrelu"``.
        prior: ``"ebm"`` (the model of the paper) or ``"gaussian"`` (N(0, I) prior, no energy net).
        prior_steps, prior_step_size: K0 and s0 of the prior chain.
        posterior_steps, posterior_step_size: K1 and s1 of the posterior chain.
        prior_sigma: sigma_p of the Gaussian reference N(0, sigma_p^2 I) (reference: 1).
        llhd_sigma: sigma of the Gaussian likelihood, in units of [-1, 1] pixels (reference: 0.3).
        lr_g, lr_e: Adam learning rates of G and E.
        betas: Adam betas of both optimisers.
        lr_decay: the per-epoch learning-rate decay gamma.
        lr_schedule: ``"reference"``: the reference calls ``ExponentialLR.step(epoch=e)`` after epoch e, so epochs
            0, 1, 2, 3, ... train at lr x 1, 1, gamma, gamma^2, ...; ``"exponential"``: a plain ``ExponentialLR``
            stepped after every epoch (lr x 1, gamma, gamma^2, ...: one epoch ahead of the reference).
        grad_clip_g, grad_clip_e: optional max gradient norm (reference: off).
        loss_g_limit: stop training (a clean stop, reported as a divergence) if the generator loss exceeds this in
            an epoch later than ``loss_g_limit_after_epoch`` (reference: 300 after epoch 10); None: off. Non-finite
            losses always stop training, before their update.
        loss_g_limit_after_epoch: see ``loss_g_limit``.
        loss_g_limit_check: ``"epoch_end"`` (reference): at the end of such an epoch, stop if the last batch's
            generator loss (after that batch's update) exceeded the limit; ``"per_batch"`` (stricter): check every
            batch of such an epoch and skip the offending update.
        channels_last: run the generator's transposed convolutions in the fastest memory layouts (see
            :class:`~lebm_zoo.nets.ConvGenerator`; same function and gradients). How much faster depends on the
            CPU (docs/speed.md).
        compile_chains: ``torch.compile`` the step of both Langevin chains (prior and posterior): None or False
            (default) eager; True the default mode; a string a ``torch.compile`` mode, e.g. ``"reduce-overhead"``
            (CUDA graphs on a GPU). Same chains up to float rounding (the noise is drawn as in the eager chains); the
            first steps pay the compile time. See :class:`~lebm_zoo.samplers.LangevinSampler` (``compile``).
        compile_scope: with ``compile_chains`` on, what one compiled region holds: ``"step"`` (default) one Langevin
            step, ``"chain"`` each whole chain (one CUDA graph per chain in ``"reduce-overhead"``; compile time grows
            with the number of steps). No effect on eager chains.
        capture_step: on a GPU, run each training step's two chains, both losses and the backward as one CUDA graph
            (:class:`~lebm_zoo.capture.CapturedStep`: 3 eager warm-up steps, then one capture, then one replay per
            step; the two Adam updates stay eager, through Lightning). Same arithmetic as the eager step, fresh noise
            from torch's CUDA generator at each replay. Default False. One GPU only (an error under DDP), not with
            ``compile_chains`` or precision ``16-mixed`` (errors); on a CPU it warns and runs the eager step.
            Lightning's ``on_before_backward`` / ``on_after_backward`` hooks are not called. Pair it with
            :class:`~lebm_zoo.callbacks.SyncEvery` so that the divergence guard does not read the losses at every step.

    Images are ``(B, channels, img_size, img_size)`` in [-1, 1]; latents ``(B, nz)``. The prior, both chains and the
    training step are :class:`LatentPriorBase`'s; this class adds the image generator G and the image data hooks.
    """

    #: layer sizes, each an integer >= 1 (checked when the hyperparameters are saved)
    size_hparams = ("nz", "ngf", "ndf")
    #: hyperparameters a resumed run may change (the others come from the checkpoint)
    resume_hparams = (
        "prior_steps", "prior_step_size", "posterior_steps", "posterior_step_size", "lr_g", "lr_e", "betas", "lr_decay",
        "lr_schedule", "grad_clip_g", "grad_clip_e", "loss_g_limit", "loss_g_limit_after_epoch", "loss_g_limit_check",
        "compile_chains", "compile_scope", "capture_step")

    def __init__(
        self,
        img_size: int = 32,
        channels: int = 3,
        nz: int = 100,
        ngf: int = 64,
        ndf: int = 200,
        e_activation: str = "gelu",
        prior: str = "ebm",
        prior_steps: int = 60,
        prior_step_size: float = 0.4,
        posterior_steps: int = 20,
        posterior_step_size: float = 0.1,
        prior_sigma: float = 1.0,
        llhd_sigma: float = 0.3,
        lr_g: float = 1e-4,
        lr_e: float = 2e-5,
        betas: tuple[float, float] = (0.5, 0.999),
        lr_decay: float = 0.998,
        lr_schedule: str = "reference",
        grad_clip_g: float | None = None,
        grad_clip_e: float | None = None,
        loss_g_limit: float | None = 300.0,
        loss_g_limit_after_epoch: int = 10,
        loss_g_limit_check: str = "epoch_end",
        channels_last: bool = False,
        compile_chains: bool | str | None = None,
        compile_scope: str = "step",
        capture_step: bool = False,
    ):
        super().__init__()
        self._check_prior_args(prior, prior_sigma)
        self.check_capture_args(capture_step, compile_chains)
        if lr_schedule not in ("reference", "exponential"):
            raise ValueError(f"lr_schedule must be 'reference' or 'exponential', got {lr_schedule!r}")
        if loss_g_limit_check not in ("epoch_end", "per_batch"):
            raise ValueError(f"loss_g_limit_check must be 'epoch_end' or 'per_batch', got {loss_g_limit_check!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if llhd_sigma <= 0:
            raise ValueError(f"llhd_sigma must be > 0, got {llhd_sigma}")
        self.save_hyperparameters()
        self.generator = ConvGenerator(nz=nz, ngf=ngf, img_size=img_size, channels=channels,
                                       channels_last=channels_last)
        self._build_prior()

    # ------------------------------------------------------------------------------------------------ densities
    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) = -||x - G(z)||^2 / (2 llhd_sigma^2), up to the Gaussian normaliser: ``(B,)`` in nats.

        Args:
            x: images ``(B, C, H, W)`` in [-1, 1].
            z: latents ``(B, nz)``.
        """
        return -self.neg_log_likelihood(x, z)

    def neg_log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """-log p(x | z) = ||x - G(z)||^2 / (2 llhd_sigma^2), ``(B,)`` in nats (arguments as :meth:`log_likelihood`)."""
        rec = full_precision((x - self.generator(z)).flatten(1)).pow(2).sum(1)
        return rec / (2 * self.hparams.llhd_sigma ** 2)

    def generator_loss(self, x: Tensor, z: Tensor) -> Tensor:
        """The generator's loss at posterior latents: ``sum((G(z) - x)^2) / B`` (the reference's scale, without the
        1/(2 sigma^2) factor)."""
        return (full_precision(self.generator(z)) - x).pow(2).sum() / x.shape[0]

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, z: Tensor) -> Tensor:
        """G(z): latents ``(B, nz)`` to images ``(B, C, H, W)`` in [-1, 1] (the mean of p(x | z)).

        Raises:
            DataShapeError: for latents that are not ``(B, nz)`` finite floats.
        """
        return self._generate(check_latents(z, self.hparams.nz, where=f"{type(self).__name__}.generate"))

    def _generate(self, z: Tensor) -> Tensor:
        """:meth:`generate` of latents the model made (unchecked)."""
        return full_precision(self.generator(z))

    # ------------------------------------------------------------------------------------------------ predict
    def predict_step(self, batch, batch_idx: int) -> dict:
        """Posterior latents and reconstructions of a batch: ``{"z": (B, nz), "x_rec": (B, C, H, W)}``."""
        z = self.infer_latent(images_from_batch(batch))
        return {"z": z, "x_rec": self.generate(z)}


def reference_lr_factor(epoch: int, gamma: float) -> float:
    """Learning-rate factor of the reference schedule at scheduler step ``epoch``: ``gamma ** max(epoch - 1, 0)``.

    The reference calls ``ExponentialLR.step(epoch=e)`` after epoch e, which sets lr x gamma^e for epoch e + 1: epochs
    0, 1, 2, 3, ... train at lr x 1, 1, gamma, gamma^2, ... A ``LambdaLR`` stepped after every epoch with this factor
    gives the same learning rates (and the same scheduler state to checkpoint).
    """
    return gamma ** max(epoch - 1, 0)
