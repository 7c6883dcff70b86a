"""Latent EBM of symbol-vector coupling (Pang & Wu, "Latent Space Energy-Based Model of Symbol-Vector Coupling for
Text Generation and Classification", ICML 2021), for semi-supervised learning on images and 2-D toy data.

Model (the paper's symbol-vector coupling; the generator as LEBM)::

    p_a(y, z) = exp(<y, F_a(z)>) p_0(z) / Z(a)       y one-hot of C classes, F_a(z) in R^C, p_0 = N(0, sigma_p^2 I)
    p_a(z)    = exp(f_a(z)) p_0(z) / Z(a),  f_a(z) = logsumexp_y F_a(z)      the marginal: an LEBM prior with
                                                                              energy E(z) = -f_a(z)
    p_a(y | z) = softmax(F_a(z))                                               the classifier
    x = G_b(z) + eps,  eps ~ N(0, llhd_sigma^2 I)                              the generator, as LatentEBMPrior

Objective (the paper's semi-supervised one)::

    L = sum_{all x} log p(x) + lambda * sum_{labelled (x, y)} log p(y | x)

The first term is the LEBM objective with the marginal prior (Pang et al. 2020, eq. 9-11): posterior Langevin on
log p(x, z) for z+, prior Langevin on log p_a(z) for z-, the generator fits x at z+, the energy descends
``mean E(z+) - mean E(z-)``. The second term is estimated by ``cross_entropy(F(z+), y)`` at the labelled images'
posterior samples z+ ~ p(z | x), i.e. log p(y | x) ~= log p(y | z+).

Reference: the authors' public code, bpucla/ibebm @315b645: ``semi_sup_classification.py`` (text, AGNews; the image
models take its settings, there being no public image code) and ``synthetic_8gaussian.py`` / ``synthetic_pinwell.py``
(2-D, unsupervised). Followed by default (``docs/fidelity.md``):

* F: an MLP ``nz -> ndf (200) [-> ndf] -> C``, two hidden layers in the text script, one in the 2-D scripts
  (``energy_layers``; LeakyReLU 0.2 in the text script, GELU in the 2-D ones: ``e_activation``); the marginal energy
  ``-logsumexp`` of the logits at temperature 1;
* the prior Langevin ``z <- z - 0.5 s^2 (grad E(z) + z / sigma^2) + s eps`` from N(0, I), sigma = 1, 100 steps of 0.4;
* F's Adam: lr 1e-5, betas (0.9, 0.999), weight decay 1e-3 (text); lr 1e-4, betas (0.9, 0.999), no decay (2-D);
* the semi-supervised iteration's order (text script): F steps first on ``class_weight * CE`` (200, the batch-mean
  cross-entropy at the labelled data's latents), both unlabelled chains then run with the updated F, G steps, and F
  steps again on ``mean E(z+) - mean E(z-) - mi_weight * MI`` with the information-bottleneck term
  ``MI = H(mean_z softmax F(z)) - mean_z H(softmax F(z))`` at posterior z (weight 100 text, 15 in 2-D);
* the generator loss: a sum over a data point's entries / B (text, as the LEBM), the mean over B x dim in 2-D
  (``nn.MSELoss()``).

Where the hyperparameters ``mi_weight``, ``lr_e``, ``weight_decay_e``, ``energy_layers`` and ``loss_g_reduction`` are
None (the defaults), the script for the model's data decides (images: text; ``dim``: 2-D); :data:`REFERENCE_SETTINGS`
lists them. The package's earlier choices are options: ``update_order="joint"`` (one F step on the sum of its
losses, both posterior chains before any update), ``class_weight=1``, ``mi_weight=0``, ``betas_e=(0.5, 0.999)``,
``weight_decay_e=0``, ``energy_layers=2`` and ``loss_g_reduction="sum"`` in 2-D, ``prior_steps=60``.

What differs by necessity (named in ``docs/symbol_vector.md``):

* inference: the reference infers z with an encoder (VAE-style); we use the LEBM way, short-run posterior Langevin on
  log p(x, z) with the MARGINAL prior (K1 = 20 steps of s1 = 0.1, ``llhd_sigma`` 0.3), as :class:`LatentEBMPrior`,
  and the cross-entropy is taken at a posterior sample where the reference takes the encoder's mean;
* the classification (and MI) gradient therefore reaches only F: our z+ are detached chain samples, where the
  reference's cross-entropy also trains its encoder;
* the generator and the energy terms use the unlabelled part of a batch only (the whole training split, labelled
  images included, cycles through it); the labelled part adds only the classification term;
* 2-D data (``dim``): an MLP generator ``nz -> ngf -> ngf -> dim`` (LeakyReLU 0.2, linear output) with a Gaussian
  likelihood, in place of the reference's 2-D decoder and encoder.

See ``docs/symbol_vector.md``.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lebm_zoo.models.base import DataShapeError
from lebm_zoo.models.latent_prior import LatentEBMPrior
from lebm_zoo.models.registry import register_family
from lebm_zoo.nets import ConvGenerator
from lebm_zoo.samplers import LangevinSampler, as_normal_tensor
from lebm_zoo.utils import check_count, check_latents, full_precision, images_from_batch, in_training_loop

__all__ = ["SymbolVectorEnergy", "SymbolVectorLEBM", "VectorGenerator", "mutual_information"]


class SymbolVectorEnergy(nn.Module):
    """F_a(z): an MLP ``nz -> ndf [-> ndf] -> C`` giving the C class logits (the reference's netE with C outputs).

    Args:
        nz: latent size.
        ndf: hidden width (reference: 200).
        n_classes: C.
        activation: ``"gelu"`` (the reference's 2-D scripts) or ``"lrelu"`` (LeakyReLU 0.2, its AGNews script).
        layers: hidden layers, each ``Linear`` then the activation (>= 1): 2 in the reference's AGNews script
            (``semi_sup_classification.py`` ``_netE``), 1 in its 2-D scripts (``synthetic_8gaussian.py``,
            ``synthetic_pinwell.py``).

    Shapes:
        ``z`` ``(B, nz)`` -> logits ``(B, C)``.
    """

    def __init__(self, nz: int = 100, ndf: int = 200, n_classes: int = 10, activation: str = "gelu",
                 layers: int = 2):
        super().__init__()
        acts = {"gelu": nn.GELU, "lrelu": lambda: nn.LeakyReLU(0.2)}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be an integer >= 1, got {layers!r}")
        act = acts[activation]
        hidden: list[nn.Module] = [nn.Linear(nz, ndf), act()]
        for _ in range(layers - 1):
            hidden += [nn.Linear(ndf, ndf), act()]
        self.net = nn.Sequential(*hidden, nn.Linear(ndf, n_classes))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.flatten(1))


class VectorGenerator(nn.Module):
    """G(z) for vector data: MLP ``nz -> width -> width -> dim``, LeakyReLU 0.2, linear output (unbounded data).

    Shapes:
        ``z`` ``(B, nz)`` -> ``(B, dim)``.
    """

    def __init__(self, nz: int = 2, width: int = 200, dim: int = 2, leak: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(nz, width), nn.LeakyReLU(leak), nn.Linear(width, width),
                                 nn.LeakyReLU(leak), nn.Linear(width, dim))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.flatten(1))


def mutual_information(logits: Tensor) -> Tensor:
    """The information-bottleneck term of the reference: ``H(mean_i p_i) - mean_i H(p_i)``, ``p_i = softmax(logits_i)``.

    The mutual information between y and z under the empirical distribution of the batch's z (with p(y | z) the
    classifier), in nats, in ``[0, log C]``: high when each z is classified confidently and the classes are used evenly.

    Args:
        logits: ``(B, C)``.

    Returns:
        a scalar tensor.
    """
    logp = torch.log_softmax(logits, dim=1)  # (B, C)
    conditional = -(logp.exp() * logp).sum(1).mean()
    log_mean = torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])  # (C,) log of the batch-mean p(y | z)
    marginal = -(log_mean.exp() * log_mean).sum()
    return marginal - conditional


#: the authors' settings that differ between their scripts: (images: the AGNews script ``semi_sup_classification.py``,
#: vectors: the 2-D scripts ``synthetic_8gaussian.py`` / ``synthetic_pinwell.py``); a hyperparameter left at None
#: takes the one for the model's data (see :meth:`SymbolVectorLEBM.setting`)
REFERENCE_SETTINGS = {
    "mi_weight": (100.0, 15.0),  # the information-bottleneck weight (AGNews: 100 in both losses; 2-D: mi_weight 15)
    "lr_e": (1e-5, 1e-4),  # F's Adam learning rate (AGNews: e_lr; 2-D: emb_lr)
    "weight_decay_e": (1e-3, 0.0),  # F's Adam weight decay (AGNews: e_decay; 2-D: ebm_weight_decay)
    "energy_layers": (2, 1),  # F's hidden layers (AGNews: _netE; 2-D: IBEBM.ebm)
    "loss_g_reduction": ("sum", "mean"),  # the generator loss: sum over a data point / B (AGNews, LEBM), nn.MSELoss
}
UPDATE_ORDERS = ("reference", "joint")
LOSS_G_REDUCTIONS = ("sum", "mean")


@register_family(tiny={
    "SymbolVectorLEBM": dict(img_size=28, channels=1, nz=8, ngf=4, ndf=16, n_classes=3, prior_steps=2,
        posterior_steps=2),
})
class SymbolVectorLEBM(LatentEBMPrior):
    """Latent EBM of symbol-vector coupling (Pang & Wu, ICML 2021): an LEBM whose prior energy net gives C class
    logits F(z), so that one network is the prior ``p(z) ~ exp(logsumexp F(z)) N(z; 0, sigma_p^2 I)`` and the
    classifier ``p(y | z) = softmax F(z)``; trained semi-supervised (module docstring; ``docs/symbol_vector.md``).

    It is a :class:`LatentEBMPrior`: the marginal :meth:`energy` is ``-logsumexp_y F_y(z)``, so
    :meth:`prior_log_prob`, both chains (:meth:`sample_latent` without ``y``, :meth:`infer_latent`),
    :meth:`anomaly_score`, :meth:`reconstruct`, G's optimiser, the schedules and the early stop are inherited as
    they are; F's Adam has its own settings (``lr_e``, ``betas_e``, ``weight_decay_e``). Added: :meth:`logits`,
    :meth:`class_energy`, :meth:`conditional_prior_log_prob`, :meth:`classify`, and ``y`` in :meth:`sample` /
    :meth:`sample_latent` (conditional prior Langevin on ``F_y(z) - ||z||^2 / (2 sigma_p^2)``).

    Batches (training): ``(x_unlabelled, x_labelled, y_labelled)`` as :class:`~datamodules.SemiSupervisedDataModule`
    yields them: ``x_unlabelled`` ``(B, ...)``, ``x_labelled`` ``(B_l, ...)``, ``y_labelled`` ``(B_l,)`` integer
    labels in ``[0, n_classes)``; Lightning's combined form ``[(x_u, y_u), (x_l, y_l)]`` of the same loaders (the
    module fitted on ``datamodule.train_dataloader()`` without the datamodule) is read the same way, ``y_u`` ignored.
    Any other batch
    (a tensor, ``(x,)``, ``(x, y)``) is all unlabelled: no classification term (``y`` is ignored). Items are images
    ``(channels, img_size, img_size)`` in [-1, 1], or vectors ``(dim,)`` when ``dim`` is set.

    Training step (``update_order="reference"``, the default), in this order: posterior Langevin from N(0, I) for the
    labelled part (marginal prior); F's Adam step on ``class_weight * CE(F(z+_l), y_l)`` (CE a mean over the labelled
    part); posterior Langevin for the unlabelled part and prior Langevin for ``B`` chains, both with the updated F;
    generator loss (see ``loss_g_reduction``) and G's step; F's step on ``mean E(z+_u) - mean E(z-) - mi_weight *
    MI(F(z+_u))``. Without a labelled part the first two are skipped. ``update_order="joint"``: one posterior chain
    call for both parts, then G's step and one F step on the sum of F's losses. Logged (``train/``): ``loss_g``,
    ``loss_e`` (F's loss of the last step: without the cross-entropy in the reference order, with it in the joint
    one), ``energy_pos``, ``energy_neg``, ``energy_gap``, ``loss_cls`` (0 without labelled part), ``acc_labelled``
    (training accuracy of F(z+_l); only with a labelled part), ``mi`` (when the MI weight is > 0), ``grad_norm_g``,
    ``grad_norm_e`` and, in the reference order with a labelled part, ``grad_norm_e_cls``.

    Defaults: F and its training as the authors' scripts (module docstring); the generator, the posterior chain and
    the schedules as :class:`LatentEBMPrior`'s (the LEBM SVHN recipe); C = 10.

    Args:
        img_size, channels, nz, ngf, ndf, e_activation, prior_step_size, posterior_steps, posterior_step_size,
            prior_sigma, llhd_sigma, lr_g, betas, lr_decay, lr_schedule, grad_clip_g, grad_clip_e, loss_g_limit,
            loss_g_limit_after_epoch, loss_g_limit_check, channels_last: as :class:`LatentEBMPrior` (``ndf``: F's
            hidden width; ``grad_clip_e``: F's; ``betas``: G's Adam only; ``ngf``: with ``dim``, the MLP generator's
            width). There is no ``prior`` option: the prior is always the EBM (F is the classifier).
        n_classes: C, the number of classes (>= 2).
        class_weight: the weight of the labelled cross-entropy (a mean over the labelled part of the batch) in F's
            classification step (>= 0; default 200, the reference's ``labeled_weight``).
        mi_weight: the weight of the information-bottleneck term MI (:func:`mutual_information`) at the unlabelled
            part's posterior samples, subtracted from F's loss (>= 0; None: 100 for images, the text script's, and
            15 with ``dim``, the 2-D scripts'; 0 turns it off).
        classify_samples: posterior samples (independent chains) whose class probabilities :meth:`classify` averages
            (>= 1; default 1).
        dim: None for images; an integer for vector data ``(B, dim)`` (the 2-D toys): the generator is then
            :class:`VectorGenerator` (``nz -> ngf -> ngf -> dim``) and ``img_size`` / ``channels`` are unused.
        energy_layers: F's hidden layers (>= 1; None: 2 for images, 1 with ``dim``).
        prior_steps: the prior chain's length K0 (default 100, the reference's).
        lr_e: F's Adam learning rate (> 0; None: 1e-5 for images, 1e-4 with ``dim``).
        betas_e: F's Adam betas (default (0.9, 0.999), the reference's).
        weight_decay_e: F's Adam (L2) weight decay (>= 0; None: 1e-3 for images, 0 with ``dim``).
        update_order: ``"reference"`` (F's classification step before the chains) or ``"joint"`` (one F step).
        loss_g_reduction: ``"sum"`` (over a data point's entries, divided by B) or ``"mean"`` (over all B x entries);
            None: ``"sum"`` for images, ``"mean"`` with ``dim``.
        compile_chains, compile_scope: run the Langevin chains through ``torch.compile`` (default None: eager), each
            step or each whole chain as one compiled region, as :class:`~lebm_zoo.LatentEBMPrior`'s (same chains up to
            float rounding; see :class:`~lebm_zoo.samplers.LangevinSampler`).
        capture_step: on a GPU, the step's chains, losses and backward as CUDA graphs, the updates eager (default
            False), as :class:`~lebm_zoo.LatentEBMPrior`'s: one graph in the joint order; two in the reference order
            (the classification part, then, after F's classification step, the unlabelled part).

    Raises:
        ValueError: for a bad value of any argument (naming it), as :class:`LatentEBMPrior` and for ``n_classes`` < 2,
            negative ``class_weight`` / ``mi_weight`` / ``weight_decay_e``, ``classify_samples`` < 1, ``dim`` < 1,
            ``energy_layers`` < 1, ``lr_e`` <= 0, an unknown ``update_order`` or ``loss_g_reduction``.
    """

    #: layer sizes, each an integer >= 1 (checked when the hyperparameters are saved)
    size_hparams = ("nz", "ngf", "ndf", "energy_layers")
    #: hyperparameters a resumed run may change (the others come from the checkpoint)
    resume_hparams = (
        "class_weight", "mi_weight", "prior_steps", "prior_step_size", "posterior_steps", "posterior_step_size", "lr_g",
        "lr_e", "betas", "betas_e", "weight_decay_e", "lr_decay", "lr_schedule", "grad_clip_g", "grad_clip_e",
        "loss_g_limit", "loss_g_limit_after_epoch", "loss_g_limit_check", "compile_chains", "compile_scope",
        "capture_step")

    def __init__(
        self,
        img_size: int = 32,
        channels: int = 3,
        nz: int = 100,
        ngf: int = 64,
        ndf: int = 200,
        n_classes: int = 10,
        class_weight: float = 200.0,
        mi_weight: float | None = None,
        classify_samples: int = 1,
        dim: int | None = None,
        e_activation: str = "gelu",
        energy_layers: int | None = None,
        prior_steps: int = 100,
        prior_step_size: float = 0.4,
        posterior_steps: int = 20,
        posterior_step_size: float = 0.1,
        prior_sigma: float = 1.0,
        llhd_sigma: float = 0.3,
        lr_g: float = 1e-4,
        lr_e: float | None = None,
        betas: tuple[float, float] = (0.5, 0.999),
        betas_e: tuple[float, float] = (0.9, 0.999),
        weight_decay_e: float | None = None,
        update_order: str = "reference",
        loss_g_reduction: str | None = None,
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
        # LatentEBMPrior.__init__ builds a one-output energy MLP and an image-only generator: this class builds its
        # own networks, in the same order (generator, then prior), and repeats its argument checks.
        super(LatentEBMPrior, self).__init__()
        # zero-argument super(): it gives this function the __class__ cell by which Lightning's save_hyperparameters
        # recognises a constructor's frame and collects its arguments
        super()._check_prior_args("ebm", prior_sigma)
        self.check_capture_args(capture_step, compile_chains)
        if lr_schedule not in ("reference", "exponential"):
            raise ValueError(f"lr_schedule must be 'reference' or 'exponential', got {lr_schedule!r}")
        if loss_g_limit_check not in ("epoch_end", "per_batch"):
            raise ValueError(f"loss_g_limit_check must be 'epoch_end' or 'per_batch', got {loss_g_limit_check!r}")
        if llhd_sigma <= 0:
            raise ValueError(f"llhd_sigma must be > 0, got {llhd_sigma}")
        if dim is None and channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        _check_int("n_classes", n_classes, 2)
        _check_int("classify_samples", classify_samples, 1)
        if dim is not None:
            _check_int("dim", dim, 1)
        for name, value in (("class_weight", class_weight), ("mi_weight", mi_weight),
                            ("weight_decay_e", weight_decay_e)):
            if name != "class_weight" and value is None:
                continue
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0{'' if name == 'class_weight' else ' or None'},"
                                 f" got {value!r}")
        if update_order not in UPDATE_ORDERS:
            raise ValueError(f"update_order must be one of {UPDATE_ORDERS}, got {update_order!r}")
        if loss_g_reduction is not None and loss_g_reduction not in LOSS_G_REDUCTIONS:
            raise ValueError(f"loss_g_reduction must be one of {LOSS_G_REDUCTIONS} or None, got {loss_g_reduction!r}")
        if lr_e is not None and not lr_e > 0:
            raise ValueError(f"lr_e must be a learning rate > 0 or None, got {lr_e}")
        self.save_hyperparameters()
        if dim is None:
            self.generator = ConvGenerator(nz=nz, ngf=ngf, img_size=img_size, channels=channels,
                                           channels_last=channels_last)
        else:
            self.generator = VectorGenerator(nz=nz, width=ngf, dim=dim)
        self._build_prior()

    def _build_prior(self) -> None:
        """F (C logits) and the prior and posterior samplers."""
        hp = self.hparams
        self.energy_net = SymbolVectorEnergy(nz=hp.nz, ndf=hp.ndf, n_classes=hp.n_classes,
                                             activation=hp.e_activation, layers=self.setting("energy_layers"))
        self.samplers = {
            "prior": LangevinSampler(hp.prior_steps, hp.prior_step_size, **self.chain_compile_kwargs()),
            "posterior": LangevinSampler(hp.posterior_steps, hp.posterior_step_size, **self.chain_compile_kwargs()),
        }

    def setting(self, name: str):
        """The value in use of ``name`` (``mi_weight``, ``lr_e``, ``weight_decay_e``, ``energy_layers``,
        ``loss_g_reduction``): the hyperparameter, or where it is None the authors' setting for the model's data
        (:data:`REFERENCE_SETTINGS`: the AGNews script's for images, the 2-D scripts' with ``dim``).

        Raises:
            KeyError: for another name.
        """
        value = self.hparams.get(name)
        return REFERENCE_SETTINGS[name][self.hparams.dim is not None] if value is None else value

    # ------------------------------------------------------------------------------------------------ densities
    def logits(self, z: Tensor) -> Tensor:
        """F(z): the C class logits (the negative class energies), ``(B, nz) -> (B, C)``, in at least float32.

        Unchecked (chains call it); :meth:`class_energy` and :meth:`classify` check what users give them.
        """
        return full_precision(self.energy_net(z))

    def energy(self, z: Tensor) -> Tensor:
        """The marginal prior energy ``E(z) = -logsumexp_y F_y(z)``, ``(B, nz) -> (B,)`` in nats, so that
        ``prior_log_prob(z) = logsumexp_y F_y(z) - ||z||^2 / (2 sigma_p^2)`` (up to log Z(a)).

        Raises:
            DataShapeError: for latents that are not ``(B, nz)`` finite floats.
        """
        if self.called_by_user():
            check_latents(z, self.hparams.nz, where=f"{type(self).__name__}.energy")
        return -torch.logsumexp(self.logits(z), dim=1)

    def class_energy(self, z: Tensor, y) -> Tensor:
        """The class energy ``E_y(z) = -F_y(z)`` (the negative logit of class y), ``(B,)`` in nats.

        Args:
            z: latents ``(B, nz)``.
            y: an int (every row) or a ``(B,)`` integer tensor, classes in ``[0, n_classes)``.

        Raises:
            DataShapeError: for latents that are not ``(B, nz)`` finite floats, or a ``y`` tensor that is not ``(B,)``
                integers. ValueError: for class values outside ``[0, n_classes)``.
        """
        where = f"{type(self).__name__}.class_energy"
        z = check_latents(z, self.hparams.nz, where=where)
        y = self._check_labels(y, z.shape[0], where)
        return -self._class_logit(z, y)

    def conditional_prior_log_prob(self, z: Tensor, y) -> Tensor:
        """Unnormalised log p_a(z | y) = ``F_y(z) - ||z||^2 / (2 sigma_p^2)`` (up to log Z_y(a)), ``(B,)`` in nats.

        ``logsumexp_y`` of it over the C classes is :meth:`prior_log_prob`. Arguments and errors as
        :meth:`class_energy`.
        """
        where = f"{type(self).__name__}.conditional_prior_log_prob"
        z = check_latents(z, self.hparams.nz, where=where)
        return self._conditional_log_prob(z, self._check_labels(y, z.shape[0], where))

    def _class_logit(self, z: Tensor, y: Tensor) -> Tensor:
        return self.logits(z).gather(1, y.view(-1, 1)).squeeze(1)

    def _conditional_log_prob(self, z: Tensor, y: Tensor) -> Tensor:
        return self._class_logit(z, y) - z.flatten(1).pow(2).sum(1) / (2 * self.hparams.prior_sigma ** 2)

    def _check_labels(self, y, n: int, where: str, name: str = "y") -> Tensor:
        """``y`` as a ``(n,)`` long tensor on the model's device: an int (repeated), or an ``(n,)`` integer tensor (or
        list), with classes in ``[0, n_classes)``. One host synchronisation for a tensor."""
        c = self.hparams.n_classes
        if isinstance(y, (list, tuple)):
            y = torch.as_tensor(y)
        if isinstance(y, Tensor):
            if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
                hint = (" (a floating (n, nz) tensor: pass initial latents as z0=...)" if y.ndim == 2
                        and y.shape[-1] == self.hparams.nz else "; convert with y.long()")
                raise DataShapeError(f"{where}: {name} must hold integer class labels, got dtype {y.dtype}{hint}")
            if y.ndim == 0:
                y = y.reshape(1).expand(n)
            if tuple(y.shape) != (n,):
                raise DataShapeError(f"{where}: {name} must be an int or a ({n},) tensor of class labels, got shape "
                                     f"{tuple(y.shape)}")
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(y)).cpu())
            if lo < 0 or hi >= c:
                raise ValueError(f"{where}: {name} must be class labels in [0, {c}) (n_classes={c}), got values in "
                                 f"[{lo}, {hi}]")
            return as_normal_tensor(y.to(self.device, torch.long))
        try:
            value = None if isinstance(y, bool) else operator.index(y)
        except TypeError:
            value = None
        if value is None:
            raise ValueError(f"{where}: {name} must be an int or a ({n},) integer tensor of class labels, got "
                             f"{type(y).__name__}")
        if not 0 <= value < c:
            raise ValueError(f"{where}: {name} must be a class label in [0, {c}) (n_classes={c}), got {name}={value}")
        return torch.full((n,), value, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------------------------------------ data hooks
    def _item_shape(self) -> tuple[int, ...]:
        hp = self.hparams
        return (hp.dim,) if hp.dim is not None else (hp.channels, hp.img_size, hp.img_size)

    def data_from_batch(self, batch, expected_shape=None, hint=None) -> Tensor:
        """The data of a batch (its first tensor), per-item shape checked: images, or ``(dim,)`` vectors."""
        if self.hparams.dim is None or expected_shape is not None:
            return super().data_from_batch(batch, expected_shape, hint)
        return super().data_from_batch(batch, (self.hparams.dim,), "Set --model.dim." if hint is None else hint)

    def prepare_data_input(self, x, where: str = ""):
        """Check data given to a public method (images as :class:`LatentEBMPrior`; with ``dim``: ``(B, dim)`` finite
        floats) and move it to the model's device as a normal (not inference-mode) tensor. Skipped in the training
        loop.

        Raises:
            DataShapeError: for images of another shape, dtype or range (see :class:`LatentEBMPrior`), or vectors that
                are not ``(B, dim)`` finite floats.
        """
        if self.hparams.dim is None:
            return super().prepare_data_input(x, where)
        if not in_training_loop(self):
            d = self.hparams.dim
            if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != d or x.shape[0] == 0:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise DataShapeError(f"{where}: x must be vectors of shape (B, dim) = (B, {d}) with B >= 1, got {got}")
            if not x.is_floating_point():
                raise DataShapeError(f"{where}: x has dtype {x.dtype}, but vectors must be floating-point: x.float()")
            if not bool(torch.isfinite(x).all()):
                raise DataShapeError(f"{where}: x has non-finite values (NaN or inf)")
        return as_normal_tensor(x.to(self.device))

    def setup(self, stage: str) -> None:
        """Refuse a datamodule whose ``channels`` / ``img_size`` (images) or ``dim`` (vectors) differ from the model's,
        or whose ``classes`` (:class:`~datamodules.SemiSupervisedDataModule`) do not fit ``n_classes``.

        Raises:
            DataShapeError: naming the attribute, both values and the ``--model.*`` flag that fixes it.
        """
        hp = self.hparams
        if hp.dim is None:
            super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        have = getattr(dm, "dim", None)
        if hp.dim is not None and have is not None and have != hp.dim:
            raise DataShapeError(f"the datamodule yields dim={have} but the model has dim={hp.dim}: set --model.dim "
                                 f"{have}.")
        classes = getattr(dm, "classes", None)
        if classes is not None and len(classes) and max(int(c) for c in classes) >= hp.n_classes:
            raise DataShapeError(f"the datamodule's labels go up to {max(int(c) for c in classes)} but the model has "
                                 f"n_classes={hp.n_classes}: set --model.n_classes {max(int(c) for c in classes) + 1}.")

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_latent(self, n: int, y=None, *, z0: Tensor | None = None, n_steps: int | None = None,
                      return_trace: bool = False):
        """Draw ``n`` latents from the prior by short-run Langevin (K0 steps of s0 from N(0, I)): the marginal
        ``p_a(z)`` (``y`` None, :meth:`LatentPriorBase.sample_latent`), or the class-conditional
        ``p_a(z | y) ~ exp(F_y(z)) N(z; 0, sigma_p^2 I)``.

        Args:
            n: number of latents.
            y: None, an int class (every chain) or an ``(n,)`` integer tensor of classes in ``[0, n_classes)``.
            z0: initial states ``(n, nz)`` (default: fresh N(0, I) noise, as in training).
            n_steps: chain length (default: ``prior_steps``).
            return_trace: also return ``{"log_prob": (n_steps,)}``, the chains' mean unnormalised log-density (of the
                marginal or the conditional) at the start of each step.

        Returns:
            ``(n, nz)`` latents, or ``(latents, trace)``.

        Raises:
            ValueError: for ``n`` < 1 or not an integer, or classes outside ``[0, n_classes)``. DataShapeError: for a
                ``y`` tensor that is not ``(n,)`` integers, a ``z0`` that is not ``(n, nz)`` finite floats.
        """
        if y is None:
            return super().sample_latent(n, z0=z0, n_steps=n_steps, return_trace=return_trace)
        where = f"{type(self).__name__}.sample_latent"
        n = check_count(n, where=where)
        y = self._check_labels(y, n, where)
        z0 = self._noise(n) if z0 is None else check_latents(z0, self.hparams.nz, name="z0", batch=n, where=where)
        return self.langevin(lambda z: self._conditional_log_prob(z, y), z0, "prior", n_steps=n_steps,
                             return_trace=return_trace)

    @torch.no_grad()
    def sample(self, n: int, y=None, n_steps: int | None = None) -> Tensor:
        """Draw ``n`` data points: prior Langevin for z (marginal, or conditional on ``y``; see :meth:`sample_latent`),
        then G(z).

        Args:
            n: number of samples.
            y: None (the marginal model), an int class, or an ``(n,)`` integer tensor of classes.
            n_steps: prior chain length (default: ``prior_steps``).

        Returns:
            images ``(n, C, H, W)`` in [-1, 1], or vectors ``(n, dim)``, on the model's device.

        Raises:
            ValueError, DataShapeError: as :meth:`sample_latent`.
        """
        n = check_count(n, where=f"{type(self).__name__}.sample")
        return self._generate(self.sample_latent(n, y, n_steps=n_steps))

    # ------------------------------------------------------------------------------------------------ classifier
    @torch.no_grad()
    def classify(self, x: Tensor, n_samples: int | None = None, n_steps: int | None = None) -> Tensor:
        """Class probabilities ``p(y | x) ~= mean_k softmax F(z_k)``, z_k from independent posterior Langevin chains on
        log p(x, z) (marginal prior; K1 steps from N(0, I), as :meth:`infer_latent`).

        The chains are random: seed the RNG to repeat a result.

        Args:
            x: images ``(B, C, H, W)`` in [-1, 1], or vectors ``(B, dim)`` with ``dim``.
            n_samples: chains per item averaged (default: ``classify_samples``).
            n_steps: posterior chain length (default: ``posterior_steps``).

        Returns:
            ``(B, n_classes)`` float probabilities; every row sums to 1.

        Raises:
            DataShapeError: for bad data (as :meth:`infer_latent`). ValueError: for ``n_samples`` < 1.
        """
        where = f"{type(self).__name__}.classify"
        x = self.prepare_data_input(x, where)
        k = check_count(self.hparams.classify_samples if n_samples is None else n_samples, "n_samples", where=where)
        b = x.shape[0]
        xs = x if k == 1 else x.repeat(k, *([1] * (x.ndim - 1)))  # (k B, ...): k chains per item, one chain call
        z = self._infer_latent(xs, n_steps=n_steps)
        return torch.softmax(self.logits(z), dim=1).view(k, b, -1).mean(0)

    def predict_step(self, batch, batch_idx: int) -> dict:
        """Posterior latents, reconstructions and class probabilities of a batch: ``{"z": (B, nz), "x_rec": G(z),
        "probs": softmax F(z) (B, n_classes)}``."""
        x = self.prepare_data_input(images_from_batch(batch), f"{type(self).__name__}.predict_step")
        z = self._infer_latent(x)
        with torch.no_grad():
            return {"z": z, "x_rec": self._generate(z), "probs": torch.softmax(self.logits(z), dim=1)}

    # ------------------------------------------------------------------------------------------------ training
    def split_batch(self, batch) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(x_unlabelled, x_labelled, y_labelled)`` of a training batch (see the class docstring for the formats);
        ``(x, None, None)`` for a batch without a labelled part. Shapes are checked; labels too (one host sync).

        Raises:
            DataShapeError: for items of another shape than the model's, or labels that are not ``(B_l,)`` integers.
            ValueError: for labels outside ``[0, n_classes)``.
        """
        if (isinstance(batch, (list, tuple)) and len(batch) == 2
                and all(isinstance(b, (list, tuple)) and len(b) >= 1 for b in batch)):  # Lightning's combined form
            lab = batch[1]
            if len(lab) < 2:
                raise DataShapeError("the labelled part of a combined batch must be (x_labelled, y_labelled)")
            batch = (images_from_batch(batch[0]), lab[0], lab[1])
        if (isinstance(batch, (list, tuple)) and len(batch) == 3 and all(isinstance(b, Tensor) for b in batch)
                and batch[1].ndim == batch[0].ndim and batch[0].ndim >= 2 and not batch[2].is_floating_point()):
            x_u, x_l, y_l = batch
            shape, hint = self._item_shape(), ("Set --model.dim." if self.hparams.dim is not None
                                               else "Set --model.channels/--model.img_size.")
            self.check_data_shape(x_u, shape, hint)
            self.check_data_shape(x_l, shape, hint)
            return x_u, x_l, self._check_labels(y_l, x_l.shape[0], f"{type(self).__name__}.training_step",
                                                name="y_labelled")
        return self.data_from_batch(batch), None, None

    def generator_loss(self, x: Tensor, z: Tensor) -> Tensor:
        """The generator's loss at posterior latents: ``sum((G(z) - x)^2) / B`` (``loss_g_reduction="sum"``, the
        AGNews script's and the LEBM's scale) or the mean over the ``B x dim`` entries (``"mean"``, the 2-D scripts'
        ``nn.MSELoss()``); the default is the one for the model's data (:meth:`setting`)."""
        if self.setting("loss_g_reduction") == "mean":
            return (full_precision(self.generator(z)) - x).pow(2).mean()
        return super().generator_loss(x, z)

    def configure_optimizers(self):
        """G's Adam (``lr_g``, ``betas``) and F's Adam (``lr_e``, ``betas_e``, ``weight_decay_e``: the reference's
        optimiser of its EBM, F), each with the ``lr_schedule`` schedule."""
        hp = self.hparams
        opt_g = self.adam(self.generator.parameters(), hp.lr_g)
        opt_e = torch.optim.Adam(self.energy_net.parameters(), lr=self.setting("lr_e"), betas=tuple(hp.betas_e),
                                 weight_decay=self.setting("weight_decay_e"))
        return [opt_g, opt_e], [self._scheduler(opt_g), self._scheduler(opt_e)]

    def training_step(self, batch, batch_idx: int) -> None:
        if self.hparams.update_order == "joint":
            self._joint_training_step(batch)
        else:
            self._reference_training_step(batch)

    def _unlabelled_losses(self, x_u: Tensor, z_pos: Tensor, z_neg: Tensor, logs: dict) -> tuple[Tensor, Tensor]:
        """(loss_g, F's loss on the unlabelled part ``mean E(z+) - mean E(z-) - mi_weight * MI(F(z+))``), logging
        their parts into ``logs``."""
        loss_g = self.generator_loss(x_u, z_pos)
        logits_pos = self.logits(z_pos)  # (B, C)
        en_pos, en_neg = -torch.logsumexp(logits_pos, dim=1), self.energy(z_neg)  # (B,), (B,)
        gap = en_pos.mean() - en_neg.mean()
        logs.update(loss_g=loss_g.detach(), energy_pos=en_pos.mean().detach(), energy_neg=en_neg.mean().detach(),
                    energy_gap=gap.detach())
        mi_weight = self.setting("mi_weight")
        loss_e = gap
        if mi_weight > 0:
            mi = mutual_information(logits_pos)
            loss_e = gap - mi_weight * mi
            logs["mi"] = mi.detach()
        return loss_g, loss_e

    def _g_and_f_backward(self, loss_g: Tensor, loss_e: Tensor, backward) -> dict[str, Tensor]:
        """One backward for G's and F's losses (F's does not depend on G's parameters and the chains' latents are
        detached, so G gets exactly grad(loss_g) and F exactly grad(loss_e)); returns both gradients' norms (clipped
        with ``grad_clip_g`` / ``grad_clip_e``)."""
        hp = self.hparams
        for opt in self.optimizers():
            opt.zero_grad(set_to_none=True)
        backward(loss_g + loss_e)
        return {"grad_norm_g": self.grad_norm_and_clip(self.generator.parameters(), hp.grad_clip_g),
                "grad_norm_e": self.grad_norm_and_clip(self.energy_net.parameters(), hp.grad_clip_e)}

    def _step_g_and_f(self) -> None:
        """G's step, then F's (from the gradients of :meth:`_g_and_f_backward`)."""
        opt_g, opt_e = self.optimizers()
        opt_g.step()
        self.step_uncounted(opt_e)  # global_step counts iterations, not optimiser steps

    def _classify_region(self, x_l: Tensor, y_l: Tensor, *, backward) -> dict[str, Tensor]:
        """The reference order's classification part: posterior latents of the labelled images (with F before this
        step), F's cross-entropy on them, its backward into F's ``.grad`` (``class_weight`` times it) and F's gradient
        norm. Detached 0-d tensors ``loss_cls``, ``acc_labelled``, ``grad_norm_e_cls``; no host reads (with
        ``capture_step`` on a GPU, one CUDA graph: :meth:`EBMModule.run_region`)."""
        hp = self.hparams
        z_l = self.infer_latent(x_l)  # (B_l, nz) posterior samples with F before this step
        logits_l = self.logits(z_l)
        loss_cls = F.cross_entropy(logits_l, y_l)  # mean over the labelled part
        acc = (logits_l.detach().argmax(1) == y_l).float().mean()
        _, opt_e = self.optimizers()
        opt_e.zero_grad(set_to_none=True)
        backward(hp.class_weight * loss_cls)
        norm = self.grad_norm_and_clip(self.energy_net.parameters(), hp.grad_clip_e)
        return {"loss_cls": loss_cls.detach(), "acc_labelled": acc, "grad_norm_e_cls": norm}

    def _unlabelled_region(self, x_u: Tensor, *, backward) -> dict[str, Tensor]:
        """The reference order's unlabelled part: both chains (with the updated F), G's and F's losses, one backward
        and both gradient norms. Detached 0-d tensors (``loss_g``, ``loss_e``, the energies, ``mi`` when weighted,
        ``grad_norm_g``, ``grad_norm_e``); no host reads."""
        z_pos = self.infer_latent(x_u)  # (B, nz) posterior samples, K1 steps from N(0, I), marginal prior, new F
        z_neg = self.sample_latent(x_u.shape[0])  # (B, nz) marginal prior samples, K0 steps from N(0, I)
        logs: dict = {}
        loss_g, loss_e = self._unlabelled_losses(x_u, z_pos, z_neg, logs)
        logs["loss_e"] = loss_e.detach()
        logs.update(self._g_and_f_backward(loss_g, loss_e, backward))
        return {k: v.detach() for k, v in logs.items()}

    def _joint_region(self, x_u: Tensor, x_l: Tensor | None = None, y_l: Tensor | None = None, *,
                      backward) -> dict[str, Tensor]:
        """The joint order's step but its updates: both posterior chains in one call, the prior chain, every loss
        (F's classification loss added to F's), one backward and both gradient norms. Detached 0-d tensors; no host
        reads."""
        hp = self.hparams
        b = x_u.shape[0]
        x_all = x_u if x_l is None else torch.cat([x_u, x_l])
        z_all = self.infer_latent(x_all)  # (B + B_l, nz) posterior samples, K1 steps from N(0, I), marginal prior
        z_neg = self.sample_latent(b)  # (B, nz) marginal prior samples, K0 steps from N(0, I)
        logs: dict = {}
        loss_g, loss_e = self._unlabelled_losses(x_u, z_all[:b], z_neg, logs)
        loss_cls = full_precision(x_u.new_zeros(()))
        if x_l is not None:
            logits_l = self.logits(z_all[b:])  # (B_l, C) at the labelled images' posterior samples
            loss_cls = F.cross_entropy(logits_l, y_l)  # mean over the labelled part
            loss_e = loss_e + hp.class_weight * loss_cls
            logs["acc_labelled"] = (logits_l.detach().argmax(1) == y_l).float().mean()
        logs["loss_cls"] = loss_cls.detach()
        logs["loss_e"] = loss_e.detach()
        logs.update(self._g_and_f_backward(loss_g, loss_e, backward))
        return {k: v.detach() for k, v in logs.items()}

    def _reference_training_step(self, batch) -> None:
        """``update_order="reference"``: F's classification step first, then the chains with the updated F, G's step
        and F's unlabelled step (``semi_sup_classification.py`` lines 740-804)."""
        hp = self.hparams
        x_u, x_l, y_l = self.split_batch(batch)
        b = x_u.shape[0]
        _, opt_e = self.optimizers()
        logs: dict = {"loss_cls": full_precision(x_u.new_zeros(()))}
        if x_l is not None:
            logs.update(self.run_region("classify", self._classify_region, x_l.to(x_u.dtype), y_l))
            if not self.check_finite({"loss_cls": logs["loss_cls"]}):
                return  # diverged: skip every update; the trainer stops after this batch
            self.step_uncounted(opt_e)
        logs.update(self.run_region("unlabelled", self._unlabelled_region, x_u))
        limits = {"loss_g": hp.loss_g_limit} if self._loss_g_limit_applies("per_batch") else None
        if not self.check_finite({"loss_g": logs["loss_g"], "loss_e": logs["loss_e"]}, limits):
            return
        self._last_loss_g = logs["loss_g"]
        self._step_g_and_f()
        self._log_step(logs, b, x_l is not None)

    def _joint_training_step(self, batch) -> None:
        """``update_order="joint"``: both posterior chains in one call, one F step on the sum of all F's losses."""
        hp = self.hparams
        x_u, x_l, y_l = self.split_batch(batch)
        b = x_u.shape[0]
        if x_l is None:
            logs = self.run_region("joint_unlabelled", self._joint_region, x_u)
        else:
            logs = self.run_region("joint", self._joint_region, x_u, x_l.to(x_u.dtype), y_l)
        losses = {k: logs[k] for k in ("loss_g", "loss_e", "loss_cls")}  # the same names on every rank (DDP)
        limits = {"loss_g": hp.loss_g_limit} if self._loss_g_limit_applies("per_batch") else None
        if not self.check_finite(losses, limits):
            return  # diverged: skip both updates; the trainer stops after this batch
        self._last_loss_g = logs["loss_g"]
        self._step_g_and_f()
        self._log_step(logs, b, x_l is not None)

    def _log_step(self, logs: dict, b: int, labelled: bool) -> None:
        prog = {"loss_g": logs["loss_g"], "gap": logs["energy_gap"]}
        if labelled:
            prog["acc_l"] = logs["acc_labelled"]
        self.log_train(logs, prog, batch_size=b)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
