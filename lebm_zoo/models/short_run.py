"""Short-run data-space EBM (Nijkamp, Hill, Zhu, Wu, "Learning Non-Convergent Non-Persistent Short-Run MCMC Toward
Energy-Based Model", NeurIPS 2019), following the authors' ``train_cifar10_minimal.py`` in ``enijkamp/short_run`` at
commit d779e9a; the Generative ConvNet of Xie et al. (ICML 2016) as an option.

Model: a ConvNet f(x), the negative energy (the reference calls it the score; it is not the score grad log p of
score matching). One training iteration, as the reference's loop does it: perturb the data batch with N(0, 0.03^2)
noise; run K = 100 steps of ``x <- x + grad_x sum_batch f(x) + 0.01 eps`` from fresh U[-1, 1] noise (the
reference's tempered update: gradient coefficient 1, so the learned density is exp(f / (s^2/2)) for s = 0.01 --
intentional, as its authors explain in point0bar1/ebm-anatomy issue 1); one Adam step (lr 1e-4, betas (0.9, 0.999),
eps 1e-8) on ``mean f(x_q) - mean f(x_data)`` (the reference backpropagates ``-(mean f(x_data) - mean f(x_q))``, the
same loss).

Identical to the reference (checked one iteration at float64 in ``tests/test_reference_short_run.py``): the
negative-energy net at 32 px with ``nf=64`` (Conv k3 s1 p1 to nf, Conv k4 s2 p1 to 2, 4, 8 nf, LeakyReLU(0.2)
after each, Conv k4 to 1, biases, PyTorch's default init), the data noise, the chain (initial U[-1, 1] noise, K,
gradient coefficient, noise), the loss and its reductions, Adam and its settings, no gradient clipping, no schedule;
the CIFAR-10 recipe's seed 1, batch 64 and 100,000 iterations.

Deviations, all options off by default (= the reference) unless said otherwise:

* ``clamp_chains`` (clip chain states to [-1, 1] after every step) and ``energy_l2`` (a penalty on the magnitude of
  f):
  the MNIST recipe turns both on, because a run without them diverged there;
* ``grad_clip``, ``init="data"`` / ``"persistent"``, ``form="gaussian_reference"``: alternatives the reference does
  not have;
* other image sizes: 28 px (final kernel 3) and 64 px (one more stride-2 conv, 8nf -> 8nf) are generalisations;
* data batches (not an option, the datamodules' choice): the reference draws each batch of 64 with replacement from
  the whole training set; ours are shuffled epochs without replacement (with a smaller last batch when the set
  size is not a multiple of the batch size);
* the divergence guard (all families; always on): a non-finite loss, or one above 1e8 in magnitude, stops training
  before its update; the reference has no guard.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lebm_zoo.models.base import EBMModule
from lebm_zoo.models.registry import register_family
from lebm_zoo.nets import _check_size, down_trunk
from lebm_zoo.samplers import LangevinSampler, as_normal_tensor
from lebm_zoo.utils import check_count, check_images, full_precision

__all__ = ["ShortRunEBM", "ShortRunNegEnergyNet"]

_FORMS = ("short_run", "gaussian_reference")
_INITS = ("uniform", "data", "persistent")

class ShortRunNegEnergyNet(nn.Module):
    """The negative energy f(x) = -E(x) (higher = more likely) of the short-run EBM (Nijkamp et al. 2019; the
    reference calls it the score).

    At 32 px with ``nf=64`` it is exactly ``train_cifar10_minimal.py``'s net: Conv(C->nf, k3 s1 p1), then
    Conv k4 s2 p1 to 2nf, 4nf, 8nf (32 -> 16 -> 8 -> 4 px), LeakyReLU(0.2) after each, and a final Conv(8nf -> 1)
    whose kernel covers the remaining map (k4 at 32 px, k3 at 28 px); at 64 px a fourth k4 s2 layer (8nf -> 8nf) is
    added. No normalisation, PyTorch's default init.

    Args:
        channels: image channels, 1 or 3.
        img_size: 28, 32 or 64.
        nf: width (reference: 64).

    Shapes:
        ``x`` ``(B, channels, img_size, img_size)`` in [-1, 1] -> f(x) ``(B,)``.

    Raises:
        ValueError: for an unsupported ``img_size``.
    """

    def __init__(self, channels: int = 3, img_size: int = 32, nf: int = 64):
        super().__init__()
        _check_size(img_size)
        widths = [nf, 2 * nf, 4 * nf, 8 * nf] + ([8 * nf] if img_size == 64 else [])
        trunk, size = down_trunk(channels, img_size, widths)
        self.net = nn.Sequential(*trunk, nn.Conv2d(widths[-1], 1, size, 1, 0))  # (B, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten()


@register_family(tiny={"ShortRunEBM": dict(img_size=28, channels=1, nf=4, n_steps=2)})
class ShortRunEBM(EBMModule):
    """Data-space EBM learned with non-convergent, non-persistent short-run Langevin (Nijkamp et al. 2019).

    Defaults are the reference CIFAR-10 recipe: 32x32x3 images, negative-energy net width 64, chains of K=100 steps from
    U[-1, 1] noise with ``x <- x + grad f(x) + 0.01 eps``, data noise 0.03, Adam lr 1e-4 betas (0.9, 0.999), no
    clipping, no LR decay.

    Args:
        img_size: 28, 32 or 64 (pixels).
        channels: 1 or 3.
        nf: width of :class:`ShortRunNegEnergyNet`.
        form: ``"short_run"`` (the reference's tempered update on f) or ``"gaussian_reference"`` (the Generative
            ConvNet of Xie et al. 2016: textbook Langevin, step ``step_size``, on ``f(x) - ||x||^2/(2 ref_sigma^2)``).
        n_steps: Langevin steps K per chain, in training and (by default) at sample time.
        noise_std: ``short_run`` form: the standard deviation of the noise added per step (reference: 0.01).
        step_size: ``gaussian_reference`` form: the Langevin step size delta (default 0.002, CoopNets' descriptor).
        ref_sigma: ``gaussian_reference`` form: sigma of the Gaussian reference (default 0.016, CoopNets').
        data_noise: std of the N(0, data_noise^2) noise added to each data batch (reference: 0.03, with the comment
            to decrease it until training becomes unstable).
        init: chain initialisation in training: ``"uniform"`` (U[-1, 1], fresh each iteration: the paper),
            ``"data"`` (from the noisy data batch, contrastive-divergence style) or ``"persistent"`` (a replay buffer
            of past samples; each chain restarts from U[-1, 1] with probability ``reinit_prob``).
        buffer_size: replay-buffer size for ``init="persistent"``; the buffer is rank-local and saved in checkpoints.
        reinit_prob: probability that a persistent chain restarts from noise.
        lr: Adam learning rate.
        betas: Adam betas.
        grad_clip: optional max norm of the network's gradient (reference: off).
        energy_l2: weight of the penalty on f's magnitude ``energy_l2 * mean(f(x_data)^2 + f(x_q)^2)`` (Du and
            Mordatch 2019; the stabiliser the EBM maintainers advise). Reference: 0 (off).
        clamp_chains: clip chain states to [-1, 1] after every Langevin step (reference: off). Keeps chains in the
            data range, which stops the overshoot-then-explode divergence we saw on MNIST.
        compile_chains, compile_scope: run the Langevin chains through ``torch.compile`` (default None: eager), each
            step or each whole chain as one compiled region, as :class:`~lebm_zoo.LatentEBMPrior`'s (same chains up to
            float rounding; see :class:`~lebm_zoo.samplers.LangevinSampler`).
        capture_step: on a GPU, each training step's chains, loss and backward as one CUDA graph, the update eager
            (default False), as :class:`~lebm_zoo.LatentEBMPrior`'s (:meth:`EBMModule.forward_backward`). Not with
            ``init="persistent"``.

    Images are ``(B, channels, img_size, img_size)`` in [-1, 1].

    Names: f = -E is the *negative energy* (:meth:`neg_energy`, :class:`ShortRunNegEnergyNet`); the reference and
    earlier code called it the score, which in the field means grad log p. The network stays the attribute
    ``score_net``, deliberately: it is the state-dict prefix (``score_net.net.0.weight``, ...), so checkpoints and
    published weights keep their keys. The logged ``train/score_pos`` / ``train/score_neg`` keep their names too.

    Raises:
        ValueError: for an unknown ``form`` or ``init``, a non-positive size, or ``capture_step`` with
            ``init="persistent"``.
    """

    #: layer sizes, each an integer >= 1 (checked when the hyperparameters are saved)
    size_hparams = ("nf",)
    #: hyperparameters a resumed run may change (the others come from the checkpoint)
    resume_hparams = (
        "n_steps", "noise_std", "step_size", "data_noise", "reinit_prob", "lr", "betas", "grad_clip", "energy_l2",
        "compile_chains", "compile_scope", "capture_step")

    def __init__(
        self,
        img_size: int = 32,
        channels: int = 3,
        nf: int = 64,
        form: str = "short_run",
        n_steps: int = 100,
        noise_std: float = 0.01,
        step_size: float = 0.002,
        ref_sigma: float = 0.016,
        data_noise: float = 0.03,
        init: str = "uniform",
        buffer_size: int = 10000,
        reinit_prob: float = 0.05,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float | None = None,
        energy_l2: float = 0.0,
        clamp_chains: bool = False,
        compile_chains: bool | str | None = None,
        compile_scope: str = "step",
        capture_step: bool = False,
    ):
        super().__init__()
        self.check_capture_args(capture_step, compile_chains)
        if capture_step and init == "persistent":
            raise ValueError("capture_step cannot hold init='persistent': the replay buffer's write has a "
                             "data-dependent shape; use init='uniform' or 'data', or leave capture_step off")
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if init == "persistent" and buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1 for init='persistent', got {buffer_size}")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"reinit_prob must be in [0, 1], got {reinit_prob}")
        if energy_l2 < 0:
            raise ValueError(f"energy_l2 must be >= 0, got {energy_l2}")
        if ref_sigma <= 0 or data_noise < 0:
            raise ValueError(f"ref_sigma must be > 0 and data_noise >= 0, got {ref_sigma}, {data_noise}")
        self.save_hyperparameters()
        self.score_net = ShortRunNegEnergyNet(channels=channels, img_size=img_size, nf=nf)  # the name: see above
        self.samplers = {"train": self._make_sampler(n_steps, noise_std, step_size)}
        # (N, C, H, W) past samples; empty unless init="persistent". A buffer, so checkpoints carry it as a tensor.
        n_buf = buffer_size if init == "persistent" else 0
        self.register_buffer("replay_buffer", torch.rand(n_buf, channels, img_size, img_size) * 2 - 1)

    def _make_sampler(self, n_steps: int, noise_std: float | None = None, step_size: float | None = None):
        hp = self.hparams
        clamp = (-1.0, 1.0) if hp.clamp_chains else None
        if hp.form == "short_run":
            return LangevinSampler.tempered(n_steps, hp.noise_std if noise_std is None else noise_std, clamp=clamp,
                                            **self.chain_compile_kwargs())
        return LangevinSampler(n_steps, hp.step_size if step_size is None else step_size, clamp=clamp,
                               **self.chain_compile_kwargs())

    # ------------------------------------------------------------------------------------------------ densities
    def neg_energy(self, x: Tensor) -> Tensor:
        """The negative energy f(x) (higher = more likely): ``(B, C, H, W)`` in [-1, 1] -> ``(B,)``, at least fp32
        (float64 in float64 runs).

        Raises:
            DataShapeError: for images of another shape, an integer dtype or non-finite values (any finite value is
                accepted: chain states leave [-1, 1]).
        """
        if self.called_by_user():
            check_images(x, self.hparams.channels, self.hparams.img_size, where=f"{type(self).__name__}.neg_energy",
                         value_range=None)
        return full_precision(self.score_net(x))

    def energy(self, x: Tensor) -> Tensor:
        """Energy ``-f(x)`` (lower = more likely), ``(B, C, H, W) -> (B,)``, up to the unknown log-normaliser.

        For ``form="gaussian_reference"`` the Gaussian reference term ``||x||^2 / (2 ref_sigma^2)`` is included. The
        ``short_run`` model's density is ``exp(f(x) / (s^2/2))`` with s = 1 for its tempered sampler, so ``-f`` is
        its energy up to that constant temperature.
        """
        return -self.log_prob(x)

    def log_prob(self, x: Tensor) -> Tensor:
        """Unnormalised log-density the chains target: f(x), or f(x) - ||x||^2/(2 ref_sigma^2); ``(B,)``."""
        lp = self.neg_energy(x)
        if self.hparams.form == "gaussian_reference":
            lp = lp - full_precision(x.flatten(1)).pow(2).sum(1) / (2 * self.hparams.ref_sigma ** 2)
        return lp

    # ------------------------------------------------------------------------------------------------ sampling
    def _uniform(self, n: int) -> Tensor:
        hp = self.hparams
        return torch.rand(n, hp.channels, hp.img_size, hp.img_size, device=self.device) * 2 - 1

    @torch.no_grad()
    def sample(self, n: int, n_steps: int | None = None, noise_std: float | None = None,
               step_size: float | None = None, x0: Tensor | None = None, return_trace: bool = False,
               clamp: bool = True):
        """Draw ``n`` images by short-run Langevin from U[-1, 1] noise (the paper's sampler, also for evaluation).

        Args:
            n: number of images.
            n_steps: chain length (default: ``n_steps`` of training; the paper uses the same K at test time).
            noise_std: per-step noise std for the ``short_run`` form (default: the training value).
            step_size: step size for the ``gaussian_reference`` form (default: the training value).
            x0: initial states ``(n, C, H, W)`` (default: U[-1, 1]).
            return_trace: also return ``{"log_prob": (n_steps,)}``, the mean log-density along the chain.
            clamp: clip the images to [-1, 1], the data range every image family's ``sample`` returns; False returns
                the raw chain states.

        Returns:
            ``(n, C, H, W)`` images on the model's device, in [-1, 1] unless ``clamp=False`` (the chains may leave it
            slightly), or ``(images, trace)``.

        Raises:
            ValueError: for ``n`` < 1 or not an integer. DataShapeError: for an ``x0`` that is not ``(n, C, H, W)``
                finite floats (chain states: any finite values).
        """
        hp, where = self.hparams, f"{type(self).__name__}.sample"
        n = check_count(n, where=where)
        if x0 is not None:
            check_images(x0, hp.channels, hp.img_size, name="x0", batch=n, value_range=None, where=where)
        k = self.hparams.n_steps if n_steps is None else int(n_steps)
        x0 = self._uniform(n) if x0 is None else as_normal_tensor(x0.to(self.device))
        out = self.langevin(self.log_prob, x0, self._make_sampler(k, noise_std, step_size), return_trace=return_trace)
        if not clamp:
            return out
        return (out[0].clamp(-1, 1), out[1]) if return_trace else out.clamp(-1, 1)

    def reconstruct(self, x: Tensor, n_iters: int = 100, lr: float = 0.05, progress: bool = True,
                    seed: int | None = 0) -> Tensor:
        """Reconstruct images by optimising the chain's initial noise (Nijkamp et al. 2019, sec. 4: the short-run
        chain viewed as a generator x_K = M(x0) of its initial state).

        The K-step chain with its per-step noise held fixed is differentiated end to end
        (:meth:`LangevinSampler.unroll`); ``x0`` starts from U[-1, 1] and Adam minimises
        ``sum ||M(x0) - x||^2 / B`` for ``n_iters`` iterations.

        Args:
            x: images ``(B, C, H, W)`` in [-1, 1].
            n_iters: optimisation iterations (each costs one K-step chain plus its backward).
            lr: Adam learning rate on x0.
            progress: show a progress bar.
            seed: seed of the initial noise and the fixed chain noise (None: not seeded).

        Returns:
            ``(B, C, H, W)`` reconstructions ``M(x0*)``, detached, on the model's device.

        Raises:
            DataShapeError: for images of another shape, an integer dtype, values outside [-1, 1] or non-finite ones.
        """
        from tqdm.auto import tqdm

        hp = self.hparams
        check_images(x, hp.channels, hp.img_size, where=f"{type(self).__name__}.reconstruct")
        x = as_normal_tensor(x.to(self.device)).float()
        gen = torch.Generator(device=x.device)
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()
        sampler = self._make_sampler(self.hparams.n_steps)
        x0 = (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1).requires_grad_(True)
        noise = torch.randn((sampler.n_steps, *x.shape), generator=gen, device=x.device)
        opt = torch.optim.Adam([x0], lr=lr)
        with self.frozen_for_sampling(), torch.enable_grad():
            for _ in tqdm(range(n_iters), desc="reconstruct (optimising x0)", disable=not progress, leave=False):
                opt.zero_grad(set_to_none=True)
                loss = (sampler.unroll(self.log_prob, x0, noise) - x).pow(2).flatten(1).sum(1).mean()
                loss.backward()
                opt.step()
            with torch.no_grad():
                return sampler.unroll(self.log_prob, x0.detach(), noise).detach()

    # ------------------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        return self.adam(self.score_net.parameters(), self.hparams.lr)

    def _chain_init(self, x_data: Tensor) -> tuple[Tensor, Tensor | None]:
        """Initial chain states ``(B, C, H, W)`` and, for the persistent buffer, the buffer indices used."""
        hp, b = self.hparams, x_data.shape[0]
        if hp.init == "uniform":
            return self._uniform(b), None
        if hp.init == "data":
            return x_data.detach(), None
        idx = torch.randint(0, self.replay_buffer.shape[0], (b,), device=self.replay_buffer.device)
        x0 = self.replay_buffer[idx].to(x_data)
        restart = (torch.rand(b, device=x0.device) < hp.reinit_prob).view(-1, 1, 1, 1)
        return torch.where(restart, self._uniform(b).to(x0), x0), idx

    def training_step(self, batch, batch_idx: int) -> None:
        x = self.data_from_batch(batch)  # (B, C, H, W) in [-1, 1]
        logs = self.forward_backward(x)  # with capture_step on a GPU: one CUDA graph replay
        if not self.check_finite({"loss": logs["loss"]}):
            return
        self.optimizers().step()
        # gap f(data) - f(samples): positive while the model still tells data from its samples
        self.log_train(logs, {"gap": logs["score_pos"] - logs["score_neg"]}, batch_size=x.shape[0])

    def _forward_backward(self, x: Tensor, backward) -> dict[str, Tensor]:
        """The training step but its parameter update: the data noise, the chains (and the replay buffer's write),
        the loss, its backward into ``.grad`` and the gradient's norm (clipped with ``grad_clip``).

        Args:
            x: images ``(B, C, H, W)`` in [-1, 1], checked.
            backward: ``loss -> None`` (``self.manual_backward`` or ``Tensor.backward``).

        Returns:
            detached 0-d tensors ``loss``, ``score_pos``, ``score_neg``, ``grad_norm``. No host reads; with
            ``capture_step`` on a GPU, one CUDA graph (not with ``init="persistent"``: the buffer's write has a
            data-dependent shape).
        """
        hp = self.hparams
        b = x.shape[0]
        x = x + hp.data_noise * torch.randn_like(x)  # reference: N(0, 0.03^2) data noise
        x0, idx = self._chain_init(x)
        x_q = self.langevin(self.log_prob, x0, "train")  # (B, C, H, W), K steps
        if idx is not None:  # chains that drew the same slot: the last one is written (deterministic, unlike idx_put)
            slots, inverse = torch.unique(idx, return_inverse=True)
            last = torch.full_like(slots, -1).scatter_reduce_(0, inverse, torch.arange(b, device=idx.device), "amax")
            self.replay_buffer[slots] = x_q[last].to(self.replay_buffer.dtype)

        f_pos, f_neg = self.neg_energy(x), self.neg_energy(x_q)  # (B,), (B,)
        loss = f_neg.mean() - f_pos.mean()  # minimise -(mean f(data) - mean f(samples))
        if hp.energy_l2 > 0:
            loss = loss + hp.energy_l2 * (f_pos.pow(2).mean() + f_neg.pow(2).mean())
        self.optimizers().zero_grad(set_to_none=True)
        backward(loss)
        grad_norm = self.grad_norm_and_clip(self.score_net.parameters(), hp.grad_clip)
        logs = {"loss": loss, "score_pos": f_pos.mean(), "score_neg": f_neg.mean(), "grad_norm": grad_norm}
        return {k: v.detach() for k, v in logs.items()}
