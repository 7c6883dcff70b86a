"""Trajectory prediction with the latent belief energy-based model, LB-EBM (Pang, Zhao, Xie, Wu, "Trajectory
Prediction with Latent Belief Energy-Based Model", CVPR 2021), following the authors' ``lbebm_{eth,hotel,univ,zara1,
zara2,sdd}.py`` and ``utils.py`` in ``bpucla/lbebm``.

A pedestrian's past ``x`` (8 positions) is encoded to ``c = E_past(x)`` (16-d; on Stanford Drone followed by three
rounds of non-local social pooling over the pedestrians of a scene). A latent belief ``z`` (16-d) has the prior
``p(z | c) ∝ exp(f(z, c)) N(z; 0, e_prior_sig^2 I)`` with f an MLP on ``[z, c]``, the negative energy. The decoder
maps ``[c, z]`` to a *plan*: the positions at the sub-goal steps (2, 5, 8, 11 of the 12 future steps); a predictor
maps ``[c, E_dest(plan)]`` to the whole future (12 positions). Training is a VAE on the plan with the EBM prior in
place of the Gaussian one: the inference net ``q(z | c, plan)`` gives posterior samples ``z+``, short-run Langevin
on the prior (20 steps, step 0.4, from N(0, 2^2) or, once the replay memory is full, from its samples) gives ``z-``,
and one Adam step minimises

    2 MSE(plan_hat, plan) + MSE(future_hat, future) + kld_coeff KL(q || N(0, I)) [summed over the batch]
      + (mean E(z+, c) - mean E(z-, c)) + MSE(plan_hat, future_hat[sub-goals])

with E = -f and c detached inside the EBM. Prediction: ``z`` from the prior chain, ``plan = dec(c, z)``, ``future =
predictor(c, E_dest(plan))``. Coordinates enter every network relative to the last observed position and multiplied
by ``data_scale`` (60 on ETH-UCY, 1.86 on SDD); errors are reported in the data's units (metres, pixels).

Identical to the reference (checked one iteration at float64 in ``tests/test_reference_trajectory.py``): the
networks (sizes, ReLU MLPs, GELU EBM, PyTorch's default init, creation order), the chain, the replay memory (200,000
single latents, used once full), the losses and their reductions, one Adam over every parameter (lr 1e-4), the
per-epoch StepLR (every 4 epochs x0.5 on ETH; per scene: :data:`SCENE_SETTINGS`), float64 (the recipes' precision
``64-true``), and the evaluation: best of 20 plans by their distance to the true plan, FDE from the best plan's last
point, ADE from the predictor's future for the best plan, summed over windows and divided by their number.

Deviations: the replay memory is sampled with torch's generator (the reference: Python's ``random.sample``, the same
distribution); the divergence guard of every family (here only for a non-finite loss); on Stanford Drone the scene
groups are visited in a shuffled order each epoch (the reference: the pickle's order). See ``docs/fidelity.md``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lebm_zoo.errors import DataShapeError
from lebm_zoo.models.base import EBMModule
from lebm_zoo.models.registry import register_family
from lebm_zoo.samplers import LangevinSampler, as_normal_tensor
from lebm_zoo.utils import images_from_batch

__all__ = ["MLP", "SCENE_SETTINGS", "TrajectoryLEBM"]

#: the reference's per-scene settings (``lbebm_<scene>.py``); every other hyperparameter is shared
SCENE_SETTINGS: dict[str, dict] = {
    "eth": dict(seed=3, kld_coeff=0.5, lr_decay_step_size=4, max_epochs=100, data_scale=60.0),
    "hotel": dict(seed=2, kld_coeff=0.8, lr_decay_step_size=1, max_epochs=5, data_scale=60.0),
    "univ": dict(seed=1, kld_coeff=0.5, lr_decay_step_size=30, max_epochs=100, data_scale=60.0),
    "zara1": dict(seed=1, kld_coeff=0.5, lr_decay_step_size=30, max_epochs=100, data_scale=60.0),
    "zara2": dict(seed=1, kld_coeff=0.5, lr_decay_step_size=30, max_epochs=100, data_scale=60.0),
    "sdd": dict(seed=1, kld_coeff=0.6, lr=3e-4, lr_milestones=[120, 150, 180, 210, 240, 270, 300],
                max_epochs=400, data_scale=1.86),
}


class MLP(nn.Module):
    """The reference's MLP: Linear layers ``in -> hidden... -> out`` with ReLU between them (none after the last).

    Shapes: ``(B, input_dim) -> (B, output_dim)``.
    """

    def __init__(self, input_dim: int, output_dim: int, hidden_size: tuple[int, ...] | list[int]):
        super().__init__()
        dims = [input_dim, *hidden_size, output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


@register_family(tiny={"TrajectoryLEBM": dict(fdim=4, zdim=3, enc_past_size=[8], enc_dest_size=[8],
                                               enc_latent_size=[8], dec_size=[8], predictor_size=[8],
                                               non_local_theta_size=[4], non_local_phi_size=[4],
                                               non_local_g_size=[4], non_local_dim=4, ebm_hidden=8, e_l_steps=2,
                                               e_l_steps_pcd=2, memory_size=24, n_values=3)})
class TrajectoryLEBM(EBMModule):
    """LB-EBM (Pang et al., CVPR 2021): trajectory prediction with a latent EBM prior conditioned on the past.

    Defaults are the reference's ETH settings (``lbebm_eth.py``); :data:`SCENE_SETTINGS` lists the per-scene ones the
    recipes ``<scene>_lbebm`` use.

    Data: a batch is a tensor of windows ``(B, past_length + future_length, 2)``, positions in the data's units
    (metres on ETH-UCY), or a tuple ``(windows, mask)`` with a ``(B, B)`` social mask of which pedestrians of the
    batch (a scene group) see each other; with a mask the past features go through ``nonlocal_pools`` rounds of
    non-local social pooling (the reference's Stanford Drone model), without one they do not (ETH-UCY).

    Args:
        past_length, future_length: observed and predicted steps (8 and 12 at 2.5 fps).
        sub_goal_indexes: the future steps (0-based) that make the plan (reference: 2, 5, 8, 11; the last one must be
            ``future_length - 1``: FDE is read from it).
        fdim: width of the past and plan features.
        zdim: latent size nz.
        enc_past_size, enc_dest_size, enc_latent_size, dec_size, predictor_size: hidden widths of the past encoder,
            plan encoder, inference net, plan decoder and future predictor.
        non_local_theta_size, non_local_phi_size, non_local_g_size, non_local_dim, nonlocal_pools: the social
            pooling's networks and rounds (used only for batches with a mask).
        ebm_hidden: width of the EBM's two hidden GELU layers; ``ny``: its outputs (f = logsumexp of them; 1).
        data_scale: factor on the relative coordinates before the networks (60 for metres, 1.86 for SDD pixels).
        kld_coeff, dest_loss_coeff, future_loss_coeff: loss weights (reference: 0.5, 2, 1; hotel 0.8, SDD 0.6).
        lr: Adam learning rate over all parameters (betas (0.9, 0.999)); ``lr_decay_gamma`` every
            ``lr_decay_step_size`` epochs, or at the epochs ``lr_milestones`` when given (SDD).
        e_prior_sig: sigma of the Gaussian factor of the prior; ``e_init_sig``: of the chains' initial states.
        e_l_steps, e_l_steps_pcd, e_l_step_size, e_l_with_noise: the prior chain (from noise, from the memory).
        memory_size: replay memory of single latents; chains start from it once it holds this many.
        n_values: K of the best-of-K evaluation (:class:`~lebm_zoo.callbacks.TrajectoryMetrics`'s default).
        cd_limit: stop training (a clean stop, reported as a divergence, before that batch's update) when the
            contrastive term ``|mean E(z+) - mean E(z-)|`` exceeds this (> 0), in nats; None (default, the
            reference): only a non-finite loss stops training. A deviation (``docs/fidelity.md``): on zara1's full
            schedule one seed's energies ran away after epoch 29 while the loss stayed finite.

    Raises:
        ValueError: for bad sizes, sub-goals outside the future or not ending at its last step, non-positive scales.
    """

    #: only a non-finite loss stops training: the KL term is summed over the batch, so a sound first iteration can be
    #: above the other families' bound of 1e8 (the reference has no guard at all)
    explode_threshold = math.inf
    size_hparams = ("past_length", "future_length", "fdim", "zdim", "enc_past_size", "enc_dest_size",
                    "enc_latent_size", "dec_size", "predictor_size", "non_local_theta_size", "non_local_phi_size",
                    "non_local_g_size", "non_local_dim", "ebm_hidden", "ny", "memory_size")
    resume_hparams = ("kld_coeff", "dest_loss_coeff", "future_loss_coeff", "lr", "lr_decay_step_size",
                      "lr_decay_gamma", "lr_milestones", "e_l_steps", "e_l_steps_pcd", "e_l_step_size",
                      "e_l_with_noise", "n_values", "cd_limit")

    def __init__(
        self,
        past_length: int = 8,
        future_length: int = 12,
        sub_goal_indexes: tuple[int, ...] | list[int] = (2, 5, 8, 11),
        fdim: int = 16,
        zdim: int = 16,
        enc_past_size: tuple[int, ...] | list[int] = (512, 256),
        enc_dest_size: tuple[int, ...] | list[int] = (256, 128),
        enc_latent_size: tuple[int, ...] | list[int] = (256, 512),
        dec_size: tuple[int, ...] | list[int] = (1024, 512, 1024),
        predictor_size: tuple[int, ...] | list[int] = (1024, 512, 256),
        non_local_theta_size: tuple[int, ...] | list[int] = (256, 128, 64),
        non_local_phi_size: tuple[int, ...] | list[int] = (256, 128, 64),
        non_local_g_size: tuple[int, ...] | list[int] = (256, 128, 64),
        non_local_dim: int = 128,
        nonlocal_pools: int = 3,
        ebm_hidden: int = 200,
        ny: int = 1,
        data_scale: float = 60.0,
        kld_coeff: float = 0.5,
        dest_loss_coeff: float = 2.0,
        future_loss_coeff: float = 1.0,
        lr: float = 1e-4,
        lr_decay_step_size: int = 4,
        lr_decay_gamma: float = 0.5,
        lr_milestones: list[int] | None = None,
        e_prior_sig: float = 2.0,
        e_init_sig: float = 2.0,
        e_l_steps: int = 20,
        e_l_steps_pcd: int = 20,
        e_l_step_size: float = 0.4,
        e_l_with_noise: bool = True,
        memory_size: int = 200_000,
        n_values: int = 20,
        cd_limit: float | None = None,
    ):
        super().__init__()
        # sequences are kept as tuples (what a published model's config gives back)
        sub_goal_indexes, enc_past_size, enc_dest_size = tuple(sub_goal_indexes), tuple(enc_past_size), \
            tuple(enc_dest_size)
        enc_latent_size, dec_size, predictor_size = tuple(enc_latent_size), tuple(dec_size), tuple(predictor_size)
        non_local_theta_size, non_local_phi_size, non_local_g_size = tuple(non_local_theta_size), \
            tuple(non_local_phi_size), tuple(non_local_g_size)
        self.save_hyperparameters()
        sub_goal_indexes = [int(i) for i in sub_goal_indexes]
        if not sub_goal_indexes or sorted(set(sub_goal_indexes)) != sub_goal_indexes or \
                sub_goal_indexes[0] < 0 or sub_goal_indexes[-1] != future_length - 1:
            raise ValueError(f"sub_goal_indexes must be increasing future steps ending at future_length - 1 = "
                             f"{future_length - 1}, got {sub_goal_indexes}")
        for key in ("data_scale", "e_prior_sig", "e_init_sig", "e_l_step_size", "lr_decay_gamma"):
            if not float(locals()[key]) > 0:
                raise ValueError(f"{key} must be > 0, got {locals()[key]}")
        if cd_limit is not None and not float(cd_limit) > 0:
            raise ValueError(f"cd_limit must be > 0 or None, got {cd_limit}")
        if nonlocal_pools < 0 or lr_decay_step_size < 1 or n_values < 1 or min(e_l_steps, e_l_steps_pcd) < 0:
            raise ValueError(f"nonlocal_pools and the chains' steps must be >= 0, lr_decay_step_size and n_values "
                             f">= 1; got {nonlocal_pools}, {e_l_steps}, {e_l_steps_pcd}, {lr_decay_step_size}, "
                             f"{n_values}")
        n_goal = 2 * len(sub_goal_indexes)
        # the reference's creation order (the same initial weights from the same seed)
        self.encoder_past = MLP(2 * past_length, fdim, enc_past_size)
        self.encoder_dest = MLP(n_goal, fdim, enc_dest_size)
        self.encoder_latent = MLP(2 * fdim, 2 * zdim, enc_latent_size)
        self.decoder = MLP(fdim + zdim, n_goal, dec_size)
        self.predictor = MLP(2 * fdim, 2 * future_length, predictor_size)
        self.non_local_theta = MLP(fdim, non_local_dim, non_local_theta_size)
        self.non_local_phi = MLP(fdim, non_local_dim, non_local_phi_size)
        self.non_local_g = MLP(fdim, fdim, non_local_g_size)
        self.EBM = nn.Sequential(nn.Linear(zdim + fdim, ebm_hidden), nn.GELU(), nn.Linear(ebm_hidden, ebm_hidden),
                                 nn.GELU(), nn.Linear(ebm_hidden, ny))
        # the replay memory of prior-chain end states: a ring of single latents, not part of the weights (it is saved
        # in training checkpoints, see on_save_checkpoint)
        self.register_buffer("memory", torch.zeros(memory_size, zdim), persistent=False)
        self.memory_count = 0  # latents pushed so far (the memory is full once this reaches memory_size)
        noise = 1.0 if e_l_with_noise else 0.0
        self.samplers = {"prior": LangevinSampler(e_l_steps, e_l_step_size, noise_scale=noise),
                         "prior_pcd": LangevinSampler(e_l_steps_pcd, e_l_step_size, noise_scale=noise)}

    # ----------------------------------------------------------------------------------------------- networks
    @property
    def window_length(self) -> int:
        return self.hparams.past_length + self.hparams.future_length

    def relative(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        """The networks' coordinates of windows ``(B, past + future, 2)``: the past ``(B, 2 past)`` and future
        ``(B, future, 2)`` relative to the last observed position, times ``data_scale``."""
        p, s = self.hparams.past_length, self.hparams.data_scale
        rel = (windows - windows[:, p - 1:p]) * s
        return rel[:, :p].reshape(rel.shape[0], -1), rel[:, p:]

    def encode_past(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Past features ``c`` ``(B, fdim)`` of scaled relative pasts ``(B, 2 past_length)``; with a social mask
        ``(B, B)``, after ``nonlocal_pools`` rounds of non-local social pooling."""
        c = self.encoder_past(x)
        if mask is not None:
            if not isinstance(mask, Tensor) or tuple(mask.shape) != (x.shape[0],) * 2:
                shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise DataShapeError(f"a social mask must be (B, B) = {(x.shape[0],) * 2} for {x.shape[0]} "
                                     f"pedestrians, got {shape}")
            mask = mask.to(c.device, c.dtype)
            for _ in range(self.hparams.nonlocal_pools):
                c = self.social_pooling(c, mask)
        return c

    def social_pooling(self, feat: Tensor, mask: Tensor) -> Tensor:
        """One round of non-local social pooling: ``feat + normalize_l1(softmax(theta phi^T) * mask) g``, ``(B, fdim)``
        with a ``(B, B)`` mask."""
        weights = F.softmax(self.non_local_theta(feat) @ self.non_local_phi(feat).T, dim=-1) * mask
        weights = F.normalize(weights, p=1, dim=1)
        return weights @ self.non_local_g(feat) + feat

    def neg_energy(self, z: Tensor, c: Tensor) -> Tensor:
        """f(z, c) = logsumexp of the EBM's outputs on ``[z, c]``, ``(B,)``; the condition ``c`` is detached (the
        reference trains the past encoder through the other losses only)."""
        return self.EBM(torch.cat([z, c.detach()], dim=1)).logsumexp(dim=1)

    def energy(self, z: Tensor, c: Tensor) -> Tensor:
        """E(z, c) = -f(z, c), ``(B,)``."""
        return -self.neg_energy(z, c)

    def prior_log_prob(self, z: Tensor, c: Tensor) -> Tensor:
        """Unnormalised log p(z | c) = f(z, c) - ||z||^2 / (2 e_prior_sig^2), ``(B,)``: the prior chain's target."""
        return self.neg_energy(z, c) - z.pow(2).sum(1) / (2 * self.hparams.e_prior_sig ** 2)

    def _init_latents(self, c: Tensor) -> Tensor:
        """N(0, e_init_sig^2) initial states ``(B, zdim)`` (drawn in float32, as the reference, then cast)."""
        z = torch.randn(c.shape[0], self.hparams.zdim, device=c.device, dtype=torch.float32)
        return (self.hparams.e_init_sig * z).to(c.dtype)

    def prior_latents(self, c: Tensor, persistent: bool = False) -> Tensor:
        """Prior latents ``(B, zdim)`` for past features ``c`` ``(B, fdim)``: the short-run chain from N(0,
        e_init_sig^2), or with ``persistent`` from the replay memory once it is full."""
        c = c.detach()
        if persistent and self.memory_count >= self.hparams.memory_size:
            if c.shape[0] > self.hparams.memory_size:
                raise ValueError(f"the replay memory (memory_size {self.hparams.memory_size}) holds fewer states "
                                 f"than the batch ({c.shape[0]}): raise --model.memory_size or lower the batch size")
            idx = torch.randperm(self.hparams.memory_size, device=self.memory.device)[:c.shape[0]]
            z0, name = self.memory[idx].to(c), "prior_pcd"
        else:
            z0, name = self._init_latents(c), "prior"
        return self.langevin(lambda z: self.prior_log_prob(z, c), z0, name)

    def _push(self, z: Tensor) -> None:
        """Push chain end states ``(B, zdim)`` into the replay memory (a ring, oldest overwritten)."""
        n, size = z.shape[0], self.hparams.memory_size
        pos = (self.memory_count + torch.arange(n, device=self.memory.device)) % size
        if n > size:  # only the last `size` survive a ring of that size
            pos, z = pos[-size:], z[-size:]
        self.memory[pos] = z.detach().to(self.memory.dtype)
        self.memory_count += n

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------------------------------ public API
    def check_windows(self, windows: Tensor, length: int | None = None, name: str = "windows") -> Tensor:
        """``windows`` as a float tensor on the model's device, after checking its shape ``(B, length, 2)``.

        Raises:
            DataShapeError: for another shape, an integer dtype or non-finite values.
        """
        length = self.window_length if length is None else length
        if not isinstance(windows, Tensor) or windows.dim() != 3 or tuple(windows.shape[1:]) != (length, 2):
            shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
            raise DataShapeError(f"{type(self).__name__} expects {name} of shape (B, {length}, 2) (x, y positions), "
                                 f"got {shape}")
        if not windows.is_floating_point():
            raise DataShapeError(f"{name} must be floating point positions, got dtype {windows.dtype}")
        if self.called_by_user() and not torch.isfinite(windows).all():
            raise DataShapeError(f"{name} hold non-finite values")
        return as_normal_tensor(windows.to(self.device, self._param_dtype()))

    @torch.no_grad()
    def sample_plans(self, past: Tensor, k: int | None = None, mask: Tensor | None = None) -> Tensor:
        """``k`` plans per pedestrian in the networks' coordinates: ``(k, B, len(sub_goal_indexes), 2)``, each from
        its own prior chain, for pasts ``(B, past_length, 2)`` in the data's units."""
        k = self.hparams.n_values if k is None else int(k)
        past = self.check_windows(past, self.hparams.past_length, "past")
        p = self.hparams.past_length
        x = ((past - past[:, p - 1:p]) * self.hparams.data_scale).reshape(past.shape[0], -1)
        c = self.encode_past(x, mask)
        plans = [self.decoder(torch.cat([c, self.prior_latents(c)], 1)) for _ in range(k)]
        return torch.stack(plans).reshape(k, past.shape[0], -1, 2)

    @torch.no_grad()
    def complete(self, past: Tensor, plans: Tensor, mask: Tensor | None = None) -> Tensor:
        """The predictor's futures for given plans, in the networks' coordinates: ``(..., B, future_length, 2)`` for
        plans ``(..., B, len(sub_goal_indexes), 2)`` and pasts ``(B, past_length, 2)`` in the data's units."""
        hp = self.hparams
        p = hp.past_length
        past = self.check_windows(past, p, "past")
        x = ((past - past[:, p - 1:p]) * hp.data_scale).reshape(past.shape[0], -1)
        c = self.encode_past(x, mask)
        lead = plans.shape[:-3]
        flat = plans.reshape(-1, *plans.shape[-3:])
        out = [self.predictor(torch.cat([c, self.encoder_dest(pl.reshape(pl.shape[0], -1))], 1)) for pl in flat]
        return torch.stack(out).reshape(*lead, past.shape[0], hp.future_length, 2)

    @torch.no_grad()
    def predict(self, past: Tensor, n_samples: int = 1, mask: Tensor | None = None) -> Tensor:
        """Predicted futures ``(n_samples, B, future_length, 2)`` in the data's units and frame, for observed pasts
        ``(B, past_length, 2)``: a plan from the prior per sample, then the predictor's whole future for it.

        With a social mask ``(B, B)`` (1 where two pedestrians share a scene, as in training) the plans come from the
        pooled past features and the futures from the unpooled ones, as in the reference's ``predict`` and in
        :meth:`best_of_k_errors`.

        Raises:
            DataShapeError: for pasts of another shape or non-finite ones, or a mask that is not ``(B, B)``.
        """
        past = self.check_windows(past, self.hparams.past_length, "past")
        plans = self.sample_plans(past, n_samples, mask)
        futures = self.complete(past, plans)
        return futures / self.hparams.data_scale + past[:, -1:].unsqueeze(0)

    def sample(self, n: int, past: Tensor | None = None) -> Tensor:
        """``n`` predicted futures ``(n, future_length, 2)`` for one observed past ``(past_length, 2)`` (default: a
        pedestrian standing still at the origin), in the data's units."""
        if past is None:
            past = torch.zeros(self.hparams.past_length, 2, device=self.device)
        if past.dim() == 2:
            past = past.unsqueeze(0)
        if past.shape[0] != 1:
            raise DataShapeError(f"sample(n, past) takes one past of shape ({self.hparams.past_length}, 2); use "
                                 f"predict(past, n_samples) for a batch, got {tuple(past.shape)}")
        return self.predict(past, n)[:, 0]

    @torch.no_grad()
    def best_of_k_errors(self, windows: Tensor, k: int | None = None, mask: Tensor | None = None) -> tuple[
            Tensor, Tensor]:
        """Per-window ADE and FDE ``(B,)``, ``(B,)`` in the data's units, best of ``k`` (the reference's protocol):
        ``k`` plans from the prior; the one nearest the true plan (L2 over all its coordinates) is kept; FDE is the
        distance of its last point to the true final position; ADE is the mean distance over the future of the
        predictor's future for that plan. With a social mask the plans come from the pooled past features and, as in
        the reference's ``predict``, the future from the unpooled ones.

        Raises:
            DataShapeError: for windows of another shape.
        """
        hp = self.hparams
        windows = self.check_windows(windows)
        past = windows[:, :hp.past_length]
        _, y = self.relative(windows)  # (B, F, 2)
        truth = y[:, hp.sub_goal_indexes]  # (B, G, 2)
        plans = self.sample_plans(past, k, mask)  # (k, B, G, 2)
        err = (plans - truth).flatten(2).norm(dim=2)  # (k, B)
        best = plans[err.argmin(0), torch.arange(windows.shape[0], device=windows.device)]  # (B, G, 2)
        fde = (best[:, -1] - truth[:, -1]).norm(dim=-1) / hp.data_scale
        future = self.complete(past, best)  # (B, F, 2); without pooling, as the reference's predict()
        ade = (future - y).norm(dim=-1).mean(dim=1) / hp.data_scale
        return ade, fde

    # ------------------------------------------------------------------------------------------------ training
    def windows_from_batch(self, batch) -> tuple[Tensor, Tensor | None]:
        """``(windows (B, T, 2), mask (B, B) or None)`` of a batch: a tensor, an ``(windows, mask)`` tuple or a dict
        with ``"x"`` (and ``"mask"``)."""
        mask = None
        if isinstance(batch, dict):
            mask = batch.get("mask")
        elif isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor) and \
                batch[1].dim() == 2:
            mask = batch[1]
        windows = images_from_batch(batch)
        self.check_data_shape(windows, (self.window_length, 2),
                              "Batches are windows of positions (B, past_length + future_length, 2).")
        if mask is not None and tuple(mask.shape) != (windows.shape[0],) * 2:
            raise DataShapeError(f"a social mask must be (B, B) = {(windows.shape[0],) * 2}, got {tuple(mask.shape)}")
        return windows, (None if mask is None else mask.to(windows.dtype))

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.Adam(self.parameters(), lr=hp.lr)
        if hp.lr_milestones:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.lr_milestones),
                                                         gamma=hp.lr_decay_gamma)
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.lr_decay_step_size, gamma=hp.lr_decay_gamma)
        return [opt], [sched]

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        windows, mask = self.windows_from_batch(batch)
        b, sg = windows.shape[0], hp.sub_goal_indexes
        x, y = self.relative(windows)
        plan, future = y[:, sg].reshape(b, -1), y.reshape(b, -1)
        c = self.encode_past(x, mask)
        pcd = self.memory_count >= hp.memory_size
        z_neg = self.prior_latents(c, persistent=True)
        self._push(z_neg)

        mu, logvar = self.encoder_latent(torch.cat([c, self.encoder_dest(plan)], 1)).chunk(2, dim=1)
        z_pos = mu + torch.randn_like(logvar) * logvar.mul(0.5).exp()
        plan_hat = self.decoder(torch.cat([c, z_pos], 1))
        future_hat = self.predictor(torch.cat([c, self.encoder_dest(plan_hat)], 1))
        en_pos, en_neg = self.energy(z_pos, c).mean(), self.energy(z_neg, c).mean()
        cd = en_pos - en_neg

        dest_loss = F.mse_loss(plan_hat, plan)
        future_loss = F.mse_loss(future_hat, future)
        subgoal_reg = F.mse_loss(plan_hat, future_hat.reshape(b, hp.future_length, 2)[:, sg].reshape(b, -1))
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = (hp.dest_loss_coeff * dest_loss + hp.future_loss_coeff * future_loss + hp.kld_coeff * kld + cd
                + subgoal_reg)
        limit = hp.get("cd_limit")
        if not self.check_finite({"loss": loss} if limit is None else {"loss": loss, "cd": cd},
                                 None if limit is None else {"cd": limit}):
            return
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        logs = {"loss": loss, "dest_loss": dest_loss, "future_loss": future_loss, "kld": kld, "cd": cd,
                "en_pos": en_pos, "en_neg": en_neg, "subgoal_reg": subgoal_reg, "pcd": float(pcd)}
        self.log_train(logs, {"future_loss": future_loss}, batch_size=b)

    def on_train_epoch_end(self) -> None:
        self.step_schedulers()

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Training checkpoints also hold the replay memory (its filled part) and how many latents were pushed."""
        super().on_save_checkpoint(checkpoint)
        n = min(self.memory_count, self.hparams.memory_size)
        checkpoint["lbebm_memory"] = {"z": self.memory[:n].detach().cpu().clone(),
                                      "count": torch.tensor(self.memory_count, dtype=torch.int64)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("lbebm_memory")
        if saved is None:
            return
        z, count = saved["z"], int(saved["count"])
        if z.dim() != 2 or z.shape[1] != self.hparams.zdim or z.shape[0] > self.hparams.memory_size:
            raise DataShapeError(f"the checkpoint's replay memory has shape {tuple(z.shape)}; this model holds "
                                 f"({self.hparams.memory_size}, {self.hparams.zdim})")
        self.memory[: z.shape[0]] = z.to(self.memory)
        self.memory_count = count
