"""Flow contrastive estimation (Gao, Nijkamp, Kingma, Xu, Dai, Wu, "Flow Contrastive Estimation of Energy-Based
Models", CVPR 2020).

There is no official code; this follows the paper and the third-party 2-D code ``lifeitech/fce-2d``
(``docs/fidelity.md``, FlowContrastiveEBM). An EBM ``log p(x) = -f(x) - c`` with a learned log-normaliser c
(initialised at 1) and a normalizing flow q(x) play a two-class game on the value

    V = mean_{x ~ data} [log p(x) - logsumexp(log p(x), log q(x))]
      + mean_{x ~ q}    [log q(x) - logsumexp(log p(x), log q(x))],

the log-likelihood of classifying data against flow samples by ``sigmoid(log p - log q)``. The EBM step maximises V
(noise-contrastive estimation with the flow as noise); the flow step minimises it. Each iteration takes one step:
the flow's if the classification accuracy on the current batch exceeds ``accuracy_threshold`` (0.6), else the EBM's.
No MCMC; samples come from the flow (optionally refined by Langevin on the EBM).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lebm_zoo.flows import Flow
from lebm_zoo.models.base import EBMModule
from lebm_zoo.models.registry import register_family
from lebm_zoo.nets import ConvEnergy
from lebm_zoo.samplers import LangevinSampler, as_normal_tensor
from lebm_zoo.utils import check_count, check_images, check_latents, images_from_batch

__all__ = ["FlowContrastiveEBM"]


class PointEnergyMLP(nn.Module):
    """The fce-2d energy E(x) of points (written f in the FCE paper, log p = -f - c; lower = more likely): MLP
    ``dim -> hidden -> hidden -> 1`` with LeakyReLU(0.2); ``(B, dim) -> (B,)``."""

    def __init__(self, dim: int = 2, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).squeeze(-1)


@register_family(tiny={
    "FlowContrastiveEBM": dict(img_size=28, channels=1, ndf=4, flow_transforms=1, flow_hidden=8),
    "FlowContrastiveEBM-2d": dict(dim=2, energy_hidden=8, flow_transforms=1, flow_hidden=8),
})
class FlowContrastiveEBM(EBMModule):
    """An EBM with a learned normaliser, trained by noise-contrastive estimation against an adversarial flow.

    Two data kinds: vectors (``dim`` set: the fce-2d toy; energy MLP dim-128-128-1, MAF of 5 blocks with hidden 100,
    Adam 1e-3 / 7e-4, betas (0.9, 0.999), as ``lifeitech/fce-2d``) or images (``dim=None``: the divergence
    triangle's conv energy and a flow: a RealNVP on flattened pixels or the paper's multiscale Glow, see
    :mod:`lebm_zoo.flows`; pixels are
    uniformly dequantised by 1/128, one 8-bit level of [-1, 1], before both models see them).

    Args:
        dim: vector dimension; None for images.
        img_size, channels: image shape (images only).
        ndf: width of the image energy net.
        energy_hidden: width of the vector energy MLP.
        flow_kind: ``"maf"``, ``"realnvp"`` or ``"glow"`` (default: maf for vectors, realnvp for images; glow is the
            FCE paper's image flow, Gao et al. CVPR 2020 Sec. 4).
        flow_transforms, flow_hidden: flow blocks (per level for glow) and conditioner width (glow: hidden channels).
        flow_levels: glow's number of levels (None: the largest of 1-3 dividing ``img_size``; other kinds ignore it).
        log_z_init: initial value of the learned log-normaliser c.
        accuracy_threshold: train the flow when the classification accuracy exceeds this, else the EBM.
        lr_ebm, lr_flow: Adam learning rates; ``betas`` for both.
        dequantize: add U[0, 1/128) noise to image pixels (ignored for vectors).
        refine_steps, refine_step_size: default Langevin refinement of flow samples on the EBM in :meth:`sample`.
        flow_pretrain_steps: first train the flow alone by maximum likelihood for this many iterations (the paper
            starts FCE from a flow pretrained by MLE; 0 = off, as the 2-D toy). At the first FCE iteration after it,
            the log-normaliser c is set so that the EBM's mean log-density on the batch equals the flow's, so the game
            starts balanced instead of hundreds of nats apart. Without it, on MNIST the EBM separated a randomly
            initialised flow perfectly within a few iterations and the flow's gradient vanished (docs/results.md).
        flow_mle_weight: the flow's step minimises ``V + flow_mle_weight * mean(-log q(x_data))``: maximum
            likelihood keeps the flow covering the data while it plays the game (0: the pure FCE objective).

    Shapes: data ``(B, dim)`` or ``(B, channels, img_size, img_size)`` in [-1, 1].
    """

    #: layer sizes, each an integer >= 1 (checked when the hyperparameters are saved)
    size_hparams = ("ndf", "energy_hidden", "flow_transforms", "flow_hidden")
    #: hyperparameters a resumed run may change (the others come from the checkpoint)
    resume_hparams = (
        "lr_ebm", "lr_flow", "betas", "refine_steps", "refine_step_size", "flow_pretrain_steps", "flow_mle_weight")

    def __init__(
        self,
        dim: int | None = None,
        img_size: int = 32,
        channels: int = 3,
        ndf: int = 64,
        energy_hidden: int = 128,
        flow_kind: str | None = None,
        flow_transforms: int = 5,
        flow_hidden: int = 100,
        flow_levels: int | None = None,
        log_z_init: float = 1.0,
        accuracy_threshold: float = 0.6,
        lr_ebm: float = 1e-3,
        lr_flow: float = 7e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        dequantize: bool = True,
        refine_steps: int = 0,
        refine_step_size: float = 0.01,
        flow_pretrain_steps: int = 0,
        flow_mle_weight: float = 0.0,
    ):
        super().__init__()
        if flow_mle_weight < 0:
            raise ValueError(f"flow_mle_weight must be >= 0, got {flow_mle_weight}")
        if flow_pretrain_steps < 0:
            raise ValueError(f"flow_pretrain_steps must be >= 0, got {flow_pretrain_steps}")
        if not 0.5 <= accuracy_threshold < 1.0:
            raise ValueError(f"accuracy_threshold must be in [0.5, 1), got {accuracy_threshold}")
        self.save_hyperparameters()
        if dim is not None:
            self.data_shape: tuple[int, ...] = (dim,)
            self.energy_net = PointEnergyMLP(dim, energy_hidden)
        else:
            self.data_shape = (channels, img_size, img_size)
            self.energy_net = ConvEnergy(channels=channels, img_size=img_size, nf=ndf)
        kind = flow_kind or ("maf" if dim is not None else "realnvp")
        self.flow = Flow(self.data_shape, kind=kind, transforms=flow_transforms, hidden=flow_hidden,
                         levels=flow_levels)
        self.log_z = nn.Parameter(torch.tensor(float(log_z_init)))  # c in log p = -f - c
        self.samplers = {"refine": LangevinSampler(refine_steps, refine_step_size)}

    # ------------------------------------------------------------------------------------------------ densities
    def _check_points(self, x, method: str) -> None:
        where = f"{type(self).__name__}.{method}"
        if len(self.data_shape) == 1:
            check_latents(x, self.data_shape[0], name="x", where=where)
        else:
            check_images(x, self.data_shape[0], self.data_shape[1], where=where, value_range=None)

    def energy(self, x: Tensor) -> Tensor:
        """f(x), the EBM's energy (lower = more likely): ``(B, *data_shape) -> (B,)`` fp32.

        Raises:
            DataShapeError: for data of another shape, an integer dtype or non-finite values.
        """
        if self.called_by_user():
            self._check_points(x, "energy")
        return self.energy_net(x).float()

    def log_prob(self, x: Tensor, model: str = "ebm") -> Tensor:
        """Log-density of ``x`` in nats, ``(B, *data_shape) -> (B,)``.

        Args:
            x: data in [-1, 1] (images) or vectors.
            model: ``"ebm"``: ``-f(x) - c``, normalised by the learned constant (exactly normalised only at the
                optimum of NCE); ``"flow"``: the flow's exact log q(x).

        Raises:
            ValueError: for another ``model``. DataShapeError: for data of another shape, an integer dtype or
                non-finite values.
        """
        if self.called_by_user():
            self._check_points(x, "log_prob")
        if model == "ebm":
            return -self.energy(x) - self.log_z
        if model == "flow":
            return self.flow.log_prob(x)
        raise ValueError(f"model must be 'ebm' or 'flow', got {model!r}")

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, refine_steps: int | None = None, refine_step_size: float | None = None,
               clamp: bool = True) -> Tensor:
        """Flow samples, optionally refined by Langevin on the EBM's ``-f(x)``.

        Args:
            n: number of samples.
            refine_steps: Langevin steps (default: the ``refine_steps`` hyperparameter, 0).
            refine_step_size: their step size (default: the ``refine_step_size`` hyperparameter).
            clamp: clip images to [-1, 1], the data range every image family's ``sample`` returns; False returns the
                raw states. Vectors (``dim``) are never clipped.

        Returns:
            ``(n, *data_shape)`` on the model's device (images in [-1, 1] unless ``clamp=False``).

        Raises:
            ValueError: for ``n`` < 1 or not an integer, a negative ``refine_steps`` or a non-positive
                ``refine_step_size`` (see :meth:`~lebm_zoo.models.base.EBMModule.refine`).
        """
        n = check_count(n, where=f"{type(self).__name__}.sample")
        x = self.refine(self.flow.sample(n).to(self.device), refine_steps, refine_step_size)
        return x.clamp(-1, 1) if clamp and self.hparams.dim is None else x

    # ------------------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        hp = self.hparams
        opt_ebm = self.adam([*self.energy_net.parameters(), self.log_z], hp.lr_ebm)
        opt_flow = self.adam(self.flow.parameters(), hp.lr_flow)
        return [opt_ebm, opt_flow]

    def setup(self, stage: str) -> None:
        if self.hparams.dim is None:  # vectors have no image shape to check
            super().setup(stage)

    def value(self, x_data: Tensor, x_flow: Tensor) -> tuple[Tensor, Tensor]:
        """The FCE value V and the classification accuracy, for data ``x_data`` and flow samples ``x_flow``.

        Returns:
            ``(V, accuracy)``: V (scalar, nats; the EBM maximises it, the flow minimises it) and the fraction of the
            ``2B`` points that ``sigmoid(log p - log q)`` classifies correctly (scalar in [0, 1], no gradient).
        """
        lp_d, lq_d = self.log_prob(x_data), self.flow.log_prob(x_data)  # (B,), (B,)
        lp_f, lq_f = self.log_prob(x_flow), self.flow.log_prob(x_flow)
        v = (lp_d - torch.logaddexp(lp_d, lq_d)).mean() + (lq_f - torch.logaddexp(lp_f, lq_f)).mean()
        correct = torch.cat([lp_d >= lq_d, lq_f > lp_f]).float()
        return v, correct.mean().detach()

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        hint = "Set --model.dim or --model.channels/--model.img_size."
        x = self.data_from_batch(batch, self.data_shape, hint).float()
        b = x.shape[0]
        if hp.dim is None and hp.dequantize:
            x = x + torch.rand_like(x) / 128.0
        opt_ebm, opt_flow = self.optimizers()
        if self.global_step < hp.flow_pretrain_steps:  # maximum-likelihood warm-up of the flow
            nll = -self.flow.log_prob(x).mean()
            if not self.check_finite({"flow_nll": nll}):
                return
            opt_flow.zero_grad(set_to_none=True)
            self.manual_backward(nll)
            opt_flow.step()
            self.log_train({"flow_nll": nll}, {"nll": nll}, batch_size=b)
            return
        if hp.flow_pretrain_steps and self.global_step == hp.flow_pretrain_steps:
            with torch.no_grad():  # start the game balanced: mean log p = mean log q on this batch
                self.log_z.copy_(-(self.energy(x).mean() + self.flow.log_prob(x).mean()))
        x_flow = self.flow.rsample(b)  # (B, *data_shape), differentiable w.r.t. the flow
        v, acc = self.value(x, x_flow)
        if not self.check_finite({"value": v}):
            return
        train_flow = bool(acc > hp.accuracy_threshold)  # one sync per iteration: the alternation rule needs it
        opt, loss = (opt_flow, v) if train_flow else (opt_ebm, -v)
        if train_flow and hp.flow_mle_weight > 0:
            loss = loss - hp.flow_mle_weight * self.flow.log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()  # exactly one (counted) optimiser step per iteration
        logs = {"value": v, "accuracy": acc, "log_z": self.log_z, "flow_step": torch.tensor(float(train_flow))}
        self.log_train(logs, {"acc": acc, "V": v}, batch_size=b)

    def validation_step(self, batch, batch_idx: int) -> None:
        """Held-out mean log-density of the EBM and of the flow (``val/log_p_ebm``, ``val/log_q_flow``)."""
        x = as_normal_tensor(images_from_batch(batch).float())
        if self.hparams.dim is None and self.hparams.dequantize:
            x = x + torch.rand_like(x) / 128.0
        self.log_dict({"val/log_p_ebm": self.log_prob(x).mean(), "val/log_q_flow": self.flow.log_prob(x).mean()},
                      batch_size=x.shape[0])
