"""EBMs learned by diffusion recovery likelihood (Gao, Song, Poole, Wu, Kingma, "Learning Energy-Based Models by
Diffusion Recovery Likelihood", ICLR 2021), following the authors' TensorFlow 2 code ``ruiqigao/recovery_likelihood``
at commit c77cc05 (``model.py``, ``network.py``, ``nn.py``, ``train.py``, ``train_utils.py``, ``config.py``; the code
files are identical at its first commit 79aaadf). The paper's T6 setting, the one that code implements.

The diffusion (``model.py`` ``get_sigma_schedule``). DDPM's linear betas, beta_k = linspace(1e-4, 0.02, 1000), are
grouped into T + 1 jumps at the indices ``idx = (0, d, 2d, ..., (T-1) d, 999)`` with ``d = 1000 // (2 (T - 1))``
(T = 6: 0, 100, ..., 500, 999): ``a_0 = sqrt(1 - beta_0)``, ``a_i = prod_{k = idx_{i-1}+1}^{idx_i} sqrt(1 - beta_k)``,
``sigma_i = sqrt(1 - a_i^2)``. The levels are ``x_t = a_t x_{t-1} + sigma_t eps`` for t = 0..T from the clean data
(so level 0 is the data with N(0, 0.01^2) noise, and level T, with a_cum_T = 0.0064, is nearly N(0, I));
``x_t = a_cum_t x + sigma_cum_t eps`` directly, ``a_cum = cumprod(a)``, ``sigma_cum = sqrt(1 - a_cum^2)``.
For T = 6: sigma = (0.01, 0.3237, 0.5165, 0.6322, 0.7132, 0.7734, 0.9997).

The model. For each t in 0..T-1 an EBM of level t in the scaled variable y = a_{t+1} x_t, whose density the Langevin
chains target (``model.py`` ``log_prob``)::

    log p_theta(y | x_{t+1}) = f_theta(y, t) / s_t^2 - r_t ||y - x_{t+1}||^2 / (2 sigma_{t+1}^2) + const,

with the step sizes ``s_t^2 = (sigma_cum_t / sigma_cum_0) b^2 sigma_{t+1}^2``, b^2 = 2e-4 (T = 6: s = 0.0046,
0.0416, 0.0685, 0.0890, 0.1036, 0.1386). r_t = 1 (a recovery likelihood, the conditional of x_t given the noisier
x_{t+1}) except at the top level t = T - 1, where r = 0 and a_T is replaced by 1: there the chain targets the
marginal EBM exp(f(x_{T-1}, T-1) / s^2) itself. One chain: K = 30 steps of textbook Langevin,
``y <- y + (s_t^2 / 2) grad_y log p + s_t eps`` (noise scale 1 in training), from ``y = x_{t+1}``; its state divided
by a_{t+1} is the sample of x_t.

Training (``train.py`` ``train_fn``, ``model.py`` ``training_losses``): a batch of data in [-1, 1], flipped left-right
at random; one level t ~ U{0..T-1} per example; the pair (x_t, x_{t+1}); the chain from x_{t+1}; then one Adam step
on the loss ``mean_i (sigma_1 / sigma_{t_i+1}) (f(y_i^-, t_i) - f(a_{t_i+1} x_{t_i}, t_i))``, which raises f (the
log-density) at the data and lowers it at the samples. Adam (TF's update, epsilon 1e-7) with lr 1e-4 warmed up
linearly over 1,000 iterations (the first update has lr 0), betas (0.9, 0.999), no clipping; an exponential moving
average of the weights (decay 0.999) is the model that samples.

Sampling (``model.py`` ``p_sample_progressive``): x_T ~ N(0, I); for t = T-1 down to 0, a chain from x_{t+1} gives
x_t (K = 30 steps; noise scale 0.99, the reference's evaluation setting); x_0 is the sample, no final denoising.

The network (``network.py`` ``net_res_temb2``): conv_in (3x3 to ``ch``), then for each resolution level
``num_res_blocks`` residual blocks of width ``ch * ch_mult[i]`` with 2x2 average pooling between levels; a block is
``x + conv2(lrelu(conv1(lrelu(x)) + dense(lrelu(temb))))`` (3x3 convs; a 3x3 conv shortcut where the width changes;
conv2 initialised at ~0 and scaled by a learned per-channel gain); no normalisation, no attention, no dropout;
LeakyReLU(0.2). The level embedding is the sinusoidal embedding of t (dimension ``ch``) through two dense layers
(to 4 ``ch``). The energy: ``f = sum_c (sum_{h,w} relu(h))_c * dense(lrelu(temb))_c``. Every conv and dense layer but
the final one is spectrally normalised (one power iteration per training-mode call; conv2's norm is only capped at
1); weights are Glorot-uniform (conv2: scale 1e-10), biases 0. CIFAR-10: ch 128, ch_mult (1, 2, 2, 2), 8 blocks per
level, batch 256 (the reference's README); CelebA: 6 blocks, beta1 0.5, batch 128.

Every deviation is a named option whose default is the reference (``docs/recovery_likelihood.md``).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lebm_zoo.models.base import EBMModule
from lebm_zoo.models.registry import register_family
from lebm_zoo.optim import AdamTF
from lebm_zoo.samplers import LangevinSampler, as_normal_tensor
from lebm_zoo.utils import check_count, check_images, check_latents, full_precision

__all__ = ["DiffusionRecoveryEBM", "RecoveryEnergyMLP", "RecoveryEnergyResNet", "recovery_schedule",
           "timestep_embedding"]

#: the reference's channel multipliers per image size (model.py); 28 px (MNIST) is ours: 28 -> 14 -> 7
DEFAULT_CH_MULT = {28: (1, 2, 2), 32: (1, 2, 2, 2), 64: (1, 2, 2, 2, 4), 128: (1, 2, 2, 2, 4, 4),
                   256: (1, 1, 2, 2, 2, 4, 4)}
_ACTS = ("lrelu", "swish")
_ADAMS = ("tf", "torch")
_LOSS_WEIGHTS = ("sigma_ratio", "none")


# ----------------------------------------------------------------------------------------------------- schedule
def recovery_schedule(num_timesteps: int = 6, beta_start: float = 1e-4, beta_end: float = 0.02,
                      b_square: float = 2e-4) -> dict[str, np.ndarray]:
    """The noise levels and Langevin step sizes of the reference (``model.py`` ``get_sigma_schedule`` and
    ``p_sample_langevin``), in float64.

    Args:
        num_timesteps: T, the number of EBMs (levels 0..T, T >= 2; at most 501, where the reference's index spacing
            ``1000 // (2 (T - 1))`` reaches 1).
        beta_start, beta_end: the ends of the 1,000 linear DDPM betas (reference: 1e-4, 0.02).
        b_square: b^2 of the step sizes (reference: 2e-4).

    Returns:
        a dict of arrays: ``a`` and ``sigma`` ``(T+1,)`` (x_t = a_t x_{t-1} + sigma_t eps, t = 0..T; sigma = sqrt(1 -
        a^2)), ``a_cum`` and ``sigma_cum`` ``(T+1,)`` (x_t = a_cum_t x + sigma_cum_t eps), ``a_prev`` ``(T+1,)`` (a with
        a_prev_T = 1: the scale y = a_prev_{t+1} x_t of level t), ``is_recovery`` ``(T+1,)`` (1, and 0 at T),
        ``step_size_sq`` ``(T,)`` (s_t^2 = sigma_cum_t / sigma_cum_0 * b^2 * sigma_{t+1}^2, level t's chain) and
        ``loss_weights`` ``(T,)`` (sigma_1 / sigma_{t+1}).

    Raises:
        ValueError: for T outside [2, 501], betas outside (0, 1) or a non-positive b^2.
    """
    t_levels = int(num_timesteps)
    if not 2 <= t_levels <= 501:
        raise ValueError(f"num_timesteps must be in [2, 501] (the reference's level spacing), got {num_timesteps}")
    if not (0 < beta_start <= beta_end < 1):
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    if b_square <= 0:
        raise ValueError(f"b_square must be > 0, got {b_square}")
    sqrt_alpha = np.sqrt(1.0 - np.linspace(beta_start, beta_end, 1000, dtype=np.float64))
    spacing = 1000 // ((t_levels - 1) * 2)
    idx = [i * spacing for i in range(t_levels)] + [999]
    a = np.array([np.prod(sqrt_alpha[: idx[0] + 1])]
                 + [np.prod(sqrt_alpha[idx[i - 1] + 1: idx[i] + 1]) for i in range(1, len(idx))])
    sigma = np.sqrt(1.0 - a ** 2)
    a_cum = np.cumprod(a)
    sigma_cum = np.sqrt(1.0 - a_cum ** 2)
    a_prev = a.copy()
    a_prev[-1] = 1.0
    is_recovery = np.ones(t_levels + 1)
    is_recovery[-1] = 0.0
    t = np.arange(t_levels)
    step_size_sq = sigma_cum[t] / sigma_cum[0] * b_square * sigma[t + 1] ** 2
    loss_weights = sigma[1] / sigma[t + 1]
    return {"a": a, "sigma": sigma, "a_cum": a_cum, "sigma_cum": sigma_cum, "a_prev": a_prev,
            "is_recovery": is_recovery, "step_size_sq": step_size_sq, "loss_weights": loss_weights}


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal level embedding ``(B,) -> (B, dim)``: ``[sin(t w_k), cos(t w_k)]``, w_k = 10000^(-k / (dim/2 - 1)),
    k = 0..dim/2-1 (zero-padded to an odd ``dim``), as the reference's ``nn.get_timestep_embedding``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# ------------------------------------------------------------------------------------------------------ layers
def _variance_scaling_(w: Tensor, scale: float) -> None:
    """TF's ``variance_scaling(scale, mode='fan_avg', distribution='uniform')`` (scale 0 -> 1e-10, as ``nn.py``)."""
    scale = 1e-10 if scale == 0 else scale
    receptive = w[0, 0].numel() if w.dim() > 2 else 1
    fan_avg = (w.shape[0] + w.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    with torch.no_grad():
        w.uniform_(-bound, bound)


class _SpectralNorm(nn.Module):
    """The reference's spectral normalisation (``nn.py`` ``SN``) of a weight ``(out, ...)``: one power iteration
    ``v = u W / |u W|``, ``u = v W^T / |v W^T|``, sigma = v W^T u^T (u, v constants), weight ``W / sigma``, or
    ``W / sigma * min(sigma, 1)`` with ``lower_bound`` (sigma + 1e-6; the zero-initialised layers'). ``u`` is
    updated only in training mode (the reference updates it at every call); computed in the weight's dtype with
    autocast off."""

    def __init__(self, out_features: int, lower_bound: bool = False):
        super().__init__()
        self.lower_bound = lower_bound
        u = torch.empty(out_features)
        nn.init.trunc_normal_(u, std=0.02, a=-0.04, b=0.04)  # TF TruncatedNormal(0.02): cut at 2 std
        self.register_buffer("u", u)

    @staticmethod
    def _l2_normalize(x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).sum().clamp_min(1e-12))

    def forward(self, w: Tensor) -> Tensor:
        with torch.autocast(device_type=w.device.type, enabled=False):
            w_mat = w.flatten(1)  # (out, fan_in)
            with torch.no_grad():
                u = self.u.to(w.dtype)
                v = self._l2_normalize(u @ w_mat)  # (fan_in,)
                u = self._l2_normalize(w_mat @ v)  # (out,)
                if self.training:
                    self.u.copy_(u)
            sigma = torch.dot(u, w_mat @ v)
            if self.lower_bound:
                sigma = sigma + 1e-6
                return w / sigma * sigma.clamp(max=1.0)
            return w / sigma


class _Dense(nn.Linear):
    """Dense layer of the reference (``nn.py`` ``dense``): Glorot-uniform weight times ``init_scale``, zero bias,
    optional spectral normalisation."""

    def __init__(self, n_in: int, n_out: int, spec_norm: bool, init_scale: float = 1.0, use_scale: bool = False):
        super().__init__(n_in, n_out)
        _variance_scaling_(self.weight, init_scale)
        nn.init.zeros_(self.bias)
        self.sn = _SpectralNorm(n_out, lower_bound=init_scale == 0) if spec_norm else None
        self.g = nn.Parameter(torch.ones(n_out)) if use_scale else None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.sn is None else self.sn(self.weight)
        out = F.linear(x, w, self.bias)
        return out if self.g is None else out * self.g


class _Conv3x3(nn.Conv2d):
    """3x3 'SAME' conv of the reference (``nn.py`` ``conv2d``): Glorot-uniform weight times ``init_scale``, zero bias,
    optional spectral normalisation and per-channel gain ``g`` (``(conv + b) * g``)."""

    def __init__(self, c_in: int, c_out: int, spec_norm: bool, init_scale: float = 1.0, use_scale: bool = False):
        super().__init__(c_in, c_out, 3, 1, 1)
        _variance_scaling_(self.weight, init_scale)
        nn.init.zeros_(self.bias)
        self.sn = _SpectralNorm(c_out, lower_bound=init_scale == 0) if spec_norm else None
        self.g = nn.Parameter(torch.ones(c_out)) if use_scale else None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.sn is None else self.sn(self.weight)
        out = F.conv2d(x, w, self.bias, 1, 1)
        return out if self.g is None else out * self.g.view(1, -1, 1, 1)


def _activation(name: str):
    return nn.LeakyReLU(0.2) if name == "lrelu" else nn.SiLU()


class _LevelEmbedding(nn.Module):
    """t -> sinusoid(t, dim) -> dense(dim -> 4 dim) -> act -> dense(4 dim -> 4 dim) (``net_res_temb2``)."""

    def __init__(self, dim: int, spec_norm: bool, act: str):
        super().__init__()
        self.dim = dim
        self.dense0 = _Dense(dim, 4 * dim, spec_norm)
        self.dense1 = _Dense(4 * dim, 4 * dim, spec_norm)
        self.act = _activation(act)

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.dim).to(self.dense0.weight.dtype)
        return self.dense1(self.act(self.dense0(emb)))


class _ResBlock(nn.Module):
    """``x + conv2(act(conv1(act(x)) + dense(act(temb))))``, a 3x3 conv shortcut where the width changes."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, spec_norm: bool, act: str):
        super().__init__()
        self.act = _activation(act)
        self.conv1 = _Conv3x3(c_in, c_out, spec_norm)
        self.temb_proj = _Dense(temb_dim, c_out, spec_norm)
        self.conv2 = _Conv3x3(c_out, c_out, spec_norm, init_scale=0.0, use_scale=True)
        self.shortcut = _Conv3x3(c_in, c_out, spec_norm) if c_in != c_out else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.act(x)) + self.temb_proj(self.act(temb))[:, :, None, None]
        h = self.conv2(self.act(h))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class RecoveryEnergyResNet(nn.Module):
    """f_theta(y, t) of the reference (``network.py`` ``net_res_temb2``, its defaults: no normalisation, attention or
    dropout, average-pool downsampling, conv shortcuts, learned conv2 gains, spectral norm, LeakyReLU(0.2), final
    ReLU); see the module doc.

    Args:
        channels: image channels.
        img_size: image side; must be divisible by ``2 ** (len(ch_mult) - 1)``.
        ch: base width (reference: 128; even, >= 4: the level embedding's dimension).
        ch_mult: width multipliers, one per resolution level (reference: (1, 2, 2, 2) at 32 px, (1, 2, 2, 2, 4) at 64).
        num_res_blocks: residual blocks per level (reference: 2 by default, 8 for CIFAR-10, 6 for CelebA).
        spec_norm: spectral normalisation (reference: on).
        act: ``"lrelu"`` (LeakyReLU 0.2, reference) or ``"swish"``.

    Shapes:
        ``y`` ``(B, channels, img_size, img_size)``, ``t`` ``(B,)`` integer levels in [0, T) -> f ``(B,)``, the
        negative energy (higher = more likely).
    """

    def __init__(self, channels: int = 3, img_size: int = 32, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, spec_norm: bool = True, act: str = "lrelu"):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        if not ch_mult or any(m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of integers >= 1, got {ch_mult}")
        if img_size % (2 ** (len(ch_mult) - 1)):
            raise ValueError(f"img_size {img_size} is not divisible by 2^{len(ch_mult) - 1} (ch_mult {ch_mult} has "
                             f"{len(ch_mult)} resolution levels): choose ch_mult with fewer levels")
        self.temb = _LevelEmbedding(ch, spec_norm, act)
        self.conv_in = _Conv3x3(channels, ch, spec_norm)
        self.levels = nn.ModuleList()
        c = ch
        for m in ch_mult:
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(c, ch * m, 4 * ch, spec_norm, act))
                c = ch * m
            self.levels.append(blocks)
        self.dense_out = _Dense(4 * ch, c, spec_norm=False)
        self.act = _activation(act)

    def forward(self, y: Tensor, t: Tensor) -> Tensor:
        temb = self.temb(t)
        h = self.conv_in(y)
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h, temb)
            if i != len(self.levels) - 1:
                h = F.avg_pool2d(h, 2)
        h = F.relu(h).sum((2, 3))  # (B, C)
        return (h * self.dense_out(self.act(temb))).sum(1)


class RecoveryEnergyMLP(nn.Module):
    """f_theta(y, t) for vector data (ours; the reference has images only): the residual net of
    :class:`RecoveryEnergyResNet` with dense layers for the 3x3 convs and no pooling: ``h = dense(y)``, then
    ``num_res_blocks`` blocks ``h + dense2(act(dense1(act(h)) + dense(act(temb))))`` (dense2 zero-initialised with a
    gain), ``f = sum_c relu(h)_c * dense(act(temb))_c``; the same level embedding and spectral norm.

    Shapes:
        ``y`` ``(B, dim)``, ``t`` ``(B,)`` -> f ``(B,)``.
    """

    def __init__(self, dim: int = 2, hidden: int = 64, num_res_blocks: int = 2, spec_norm: bool = True,
                 act: str = "lrelu"):
        super().__init__()
        self.temb = _LevelEmbedding(hidden, spec_norm, act)
        self.dense_in = _Dense(dim, hidden, spec_norm)
        self.blocks = nn.ModuleList()
        for _ in range(num_res_blocks):
            self.blocks.append(nn.ModuleDict({
                "dense1": _Dense(hidden, hidden, spec_norm), "temb_proj": _Dense(4 * hidden, hidden, spec_norm),
                "dense2": _Dense(hidden, hidden, spec_norm, init_scale=0.0, use_scale=True)}))
        self.dense_out = _Dense(4 * hidden, hidden, spec_norm=False)
        self.act = _activation(act)

    def forward(self, y: Tensor, t: Tensor) -> Tensor:
        temb = self.temb(t)
        h = self.dense_in(y)
        for b in self.blocks:
            h = h + b["dense2"](self.act(b["dense1"](self.act(h)) + b["temb_proj"](self.act(temb))))
        return (F.relu(h) * self.dense_out(self.act(temb))).sum(1)


# ------------------------------------------------------------------------------------------------------- model
@register_family(tiny={
    "DiffusionRecoveryEBM": dict(img_size=28, channels=1, ch=4, num_res_blocks=1, num_timesteps=2, mcmc_steps=2,
        ema_decay=None),
})
class DiffusionRecoveryEBM(EBMModule):
    """A sequence of T EBMs learned by diffusion recovery likelihood (Gao et al., ICLR 2021), the reference's T6
    setting; the equations and their numbers are in the module doc.

    Defaults are the reference's (``config.py``, ``model.py``): 32x32x3 images in [-1, 1], T = 6 levels of the
    schedule of :func:`recovery_schedule`, K = 30 Langevin steps with s_t^2 = (sigma_cum_t / sigma_cum_0) 2e-4
    sigma_{t+1}^2, the net of :class:`RecoveryEnergyResNet` (ch 128, ch_mult (1, 2, 2, 2), 2 blocks per level,
    spectral norm), random horizontal flips, the loss weights sigma_1 / sigma_{t+1}, TF Adam lr 1e-4 (epsilon 1e-7)
    with 1,000 warm-up iterations, EMA 0.999, sampling noise scale 0.99 (training: 1).

    Args:
        img_size: image side (28, 32, 64, 128, 256, or any with ``ch_mult`` given).
        channels: image channels.
        dim: vector data of this dimension instead of images (then the energy is :class:`RecoveryEnergyMLP`;
            ``img_size``, ``channels``, ``ch``, ``ch_mult`` and ``random_flip`` are unused).
        ch, ch_mult, num_res_blocks, spec_norm, act: the image net (:class:`RecoveryEnergyResNet`; ``ch_mult``
            None: the reference's for the image size, ours (1, 2, 2) at 28 px).
        energy_hidden: width of the vector net (:class:`RecoveryEnergyMLP`; it uses ``num_res_blocks`` too).
        num_timesteps: T, the number of EBMs (reference: 6).
        beta_start, beta_end: the DDPM betas the schedule groups (reference: 1e-4, 0.02).
        mcmc_steps: K, Langevin steps per level in training and sampling (reference: 30).
        b_square: b^2 of the step sizes (reference: 2e-4).
        noise_scale: the chains' noise scale in training (reference: 1.0).
        sample_noise_scale: the chains' noise scale in :meth:`sample` (reference: 0.99, its evaluation setting).
        lr: Adam learning rate after warm-up (reference: 1e-4).
        betas: Adam betas (reference: (0.9, 0.999); CelebA: beta1 0.5).
        adam: ``"tf"`` (reference: TF's Adam update, :class:`~lebm_zoo.optim.AdamTF` with ``adam_eps``) or
            ``"torch"`` (``torch.optim.Adam``).
        adam_eps: Adam's epsilon (reference: Keras' 1e-7).
        warmup: linear learning-rate warm-up iterations, lr * min(1, step / warmup) (reference: 1000; 0: none).
        grad_clip: max global norm of the gradient (reference: off; its ``--grad_clip`` flag clips at 1).
        ema_decay: decay of the exponential moving average of the net (parameters and spectral-norm vectors) that
            :meth:`sample` uses; None: no EMA (reference: 0.999).
        random_flip: flip each training image left-right with probability 1/2 (reference: on).
        loss_weight: ``"sigma_ratio"`` (reference: sigma_1 / sigma_{t+1} per example) or ``"none"`` (1).
        capture_step: on a GPU, each training step's chains, loss and backward as one CUDA graph, the update and the
            EMA eager (default False), as :class:`~lebm_zoo.LatentEBMPrior`'s (:meth:`EBMModule.forward_backward`).

    Raises:
        ValueError: for an out-of-range size, level count, step-size or noise factor, an unknown ``act``, ``adam`` or
            ``loss_weight``, an ``ema_decay`` outside [0, 1), or an image size ``ch_mult`` does not divide.
    """

    #: layer sizes, each an integer >= 1 (checked when the hyperparameters are saved)
    size_hparams = ("img_size", "channels", "dim", "ch", "num_res_blocks", "energy_hidden")
    #: hyperparameters a resumed run may change (the others come from the checkpoint)
    resume_hparams = ("mcmc_steps", "lr", "betas", "grad_clip", "loss_weight", "capture_step")

    def __init__(
        self,
        img_size: int = 32,
        channels: int = 3,
        dim: int | None = None,
        ch: int = 128,
        ch_mult: tuple[int, ...] | None = None,
        num_res_blocks: int = 2,
        energy_hidden: int = 64,
        spec_norm: bool = True,
        act: str = "lrelu",
        num_timesteps: int = 6,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        mcmc_steps: int = 30,
        b_square: float = 2e-4,
        noise_scale: float = 1.0,
        sample_noise_scale: float = 0.99,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        adam: str = "tf",
        adam_eps: float = 1e-7,
        warmup: int = 1000,
        grad_clip: float | None = None,
        ema_decay: float | None = 0.999,
        random_flip: bool = True,
        loss_weight: str = "sigma_ratio",
        capture_step: bool = False,
    ):
        super().__init__()
        self.check_capture_args(capture_step, None)
        self.save_hyperparameters()  # first: it checks the sizes (size_hparams) that the checks below compare
        if ch < 4 or (dim is not None and energy_hidden < 4):
            raise ValueError(f"ch and energy_hidden must be >= 4 (the level embedding's dimension), got {ch}, "
                             f"{energy_hidden}")
        if act not in _ACTS:
            raise ValueError(f"act must be one of {_ACTS}, got {act!r}")
        if adam not in _ADAMS:
            raise ValueError(f"adam must be one of {_ADAMS}, got {adam!r}")
        if loss_weight not in _LOSS_WEIGHTS:
            raise ValueError(f"loss_weight must be one of {_LOSS_WEIGHTS}, got {loss_weight!r}")
        if mcmc_steps < 0 or noise_scale < 0 or sample_noise_scale < 0 or warmup < 0:
            raise ValueError(f"mcmc_steps, noise_scale, sample_noise_scale and warmup must be >= 0, got "
                             f"{mcmc_steps}, {noise_scale}, {sample_noise_scale}, {warmup}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        if dim is None and ch_mult is None and img_size not in DEFAULT_CH_MULT:
            raise ValueError(f"no default ch_mult for img_size {img_size} (defaults for {sorted(DEFAULT_CH_MULT)}): "
                             "set ch_mult")
        sched = recovery_schedule(num_timesteps, beta_start, beta_end, b_square)
        for name, values in sched.items():  # float32, as the reference gathers them (model.py _extract)
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)
        if dim is not None:
            self.data_shape: tuple[int, ...] = (dim,)
            self.net = RecoveryEnergyMLP(dim, energy_hidden, num_res_blocks, spec_norm, act)
        else:
            self.data_shape = (channels, img_size, img_size)
            mult = DEFAULT_CH_MULT[img_size] if ch_mult is None else tuple(ch_mult)
            self.net = RecoveryEnergyResNet(channels, img_size, ch, mult, num_res_blocks, spec_norm, act)
        self.ema_net = None
        if ema_decay is not None:
            self.ema_net = copy.deepcopy(self.net)
            self.ema_net.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def num_timesteps(self) -> int:
        """T, the number of EBMs (levels 0..T)."""
        return int(self.hparams.num_timesteps)

    def _levels(self, t, b: int) -> Tensor:
        """``t`` as a ``(b,)`` long tensor of levels in [0, T) on the model's device (checked: one host sync).

        Raises:
            ValueError: for another count of levels or a level outside [0, T).
        """
        if isinstance(t, Tensor):
            t = t.to(self.a.device).long().reshape(-1)
            if t.numel() == 1 and b != 1:
                t = t.expand(b)
        else:
            t = torch.full((b,), int(t), dtype=torch.long, device=self.a.device)
        if t.shape[0] != b:
            raise ValueError(f"t must be one level or one per item ({b}), got {t.shape[0]}")
        lo, hi = (int(v) for v in torch.stack([t.min(), t.max()]).cpu())
        if lo < 0 or hi >= self.num_timesteps:
            raise ValueError(f"levels t must be in [0, {self.num_timesteps}), got [{lo}, {hi}]")
        return t

    @staticmethod
    def _per_item(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """``values[t]`` shaped ``(B, 1, ...)`` to broadcast over ``x``, in ``x``'s dtype."""
        return values[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def _check_data(self, x: Tensor, name: str, where: str, value_range=(-1.0, 1.0)) -> None:
        if self.hparams.dim is not None:
            check_latents(x, self.hparams.dim, name=name, where=where)
        else:
            check_images(x, self.hparams.channels, self.hparams.img_size, name=name, where=where,
                         value_range=value_range)

    # -------------------------------------------------------------------------------------------- the diffusion
    def q_sample(self, x: Tensor, t, noise: Tensor | None = None) -> Tensor:
        """Level t of clean data: ``x_t = a_cum_t x + sigma_cum_t eps`` (t = 0: the data with N(0, 0.01^2) noise).

        Args:
            x: clean data ``(B, *data_shape)`` (images in [-1, 1]).
            t: a level in [0, T] (an int, or a ``(B,)`` tensor).
            noise: eps ``(B, *data_shape)`` (default: fresh N(0, I)).

        Returns:
            ``(B, *data_shape)`` in ``x``'s dtype.
        """
        b = x.shape[0]
        t = torch.full((b,), int(t), dtype=torch.long, device=x.device) if not isinstance(t, Tensor) else t.long()
        noise = torch.randn_like(x) if noise is None else noise
        return self._per_item(self.a_cum, t, x) * x + self._per_item(self.sigma_cum, t, x) * noise

    def q_sample_pairs(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """The training pair of level t: ``x_t`` (:meth:`q_sample`) and ``x_{t+1} = a_{t+1} x_t + sigma_{t+1} eps``.

        Args:
            x: clean data ``(B, *data_shape)``; t: levels in [0, T) (an int or ``(B,)``).

        Returns:
            ``(x_t, x_{t+1})``, each ``(B, *data_shape)``.
        """
        return self._pairs(x, self._levels(t, x.shape[0]))

    def _pairs(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        x_t = self.q_sample(x, t)
        x_next = self._per_item(self.a, t + 1, x) * x_t + self._per_item(self.sigma, t + 1, x) * torch.randn_like(x)
        return x_t, x_next

    # ------------------------------------------------------------------------------------------------ energies
    def _net(self, use_ema: bool | None) -> nn.Module:
        if use_ema is None:
            use_ema = self.ema_net is not None
        if use_ema and self.ema_net is None:
            raise ValueError("this model has no EMA (ema_decay=None): pass use_ema=False")
        return self.ema_net if use_ema else self.net

    def neg_energy(self, y: Tensor, t, use_ema: bool | None = None) -> Tensor:
        """The network's output f_theta(y, t) (higher = more likely), at least fp32.

        Args:
            y: the scaled variable ``y = a_{t+1} x_t`` (for t = T-1: ``x_{T-1}`` itself), ``(B, *data_shape)``.
            t: a level in [0, T) (an int or ``(B,)``).
            use_ema: the EMA net (default: when the model has one).

        Returns:
            ``(B,)``.
        """
        return full_precision(self._net(use_ema)(y, self._levels(t, y.shape[0])))

    def energy(self, x: Tensor, t, use_ema: bool | None = None) -> Tensor:
        """Energy of level-t data under the level-t EBM: ``-f_theta(a_{t+1} x, t) / s_t^2`` (the reference's
        tempered density exp(f / s_t^2) of the chains; a_T counts as 1), up to the EBM's log-normaliser.

        Args:
            x: data at level t, ``(B, *data_shape)`` (level 0 is the data: images in [-1, 1] up to 0.01 noise).
            t: a level in [0, T) (an int or ``(B,)``).
            use_ema: the EMA net (default: when the model has one).

        Returns:
            ``(B,)``, at least fp32; lower = more likely.

        Raises:
            DataShapeError: for data of another shape or non-finite values. ValueError: for a level outside [0, T).
        """
        self._check_data(x, "x", f"{type(self).__name__}.energy", value_range=None)
        t = self._levels(t, x.shape[0])
        y = self._per_item(self.a_prev, t + 1, x) * x
        return -full_precision(self._net(use_ema)(y, t)) / self.step_size_sq[t]

    def recovery_log_prob(self, y: Tensor, x_next: Tensor, t, use_ema: bool | None = None) -> Tensor:
        """The target of level t's chains (``model.py`` ``log_prob``): ``f(y, t) / s_t^2 - r_t ||y - x_{t+1}||^2 /
        (2 sigma_{t+1}^2)``, r = 0 at the top level T-1; ``(B,)``, at least fp32.

        Args:
            y: states ``(B, *data_shape)`` in the scaled variable y = a_{t+1} x_t.
            x_next: the conditioning ``x_{t+1}`` ``(B, *data_shape)``.
            t: levels in [0, T) (an int or ``(B,)``).
            use_ema: the EMA net (default: when the model has one).
        """
        t = self._levels(t, y.shape[0])
        return self._log_prob_fn(self._net(use_ema), x_next, t)(y)

    def _log_prob_fn(self, net: nn.Module, x_next: Tensor, t: Tensor, scale: Tensor | None = None):
        """The chain target of :meth:`recovery_log_prob` as a function of y, or of u = y / s_t with ``scale = s_t``."""
        s2 = self.step_size_sq[t]  # (B,)
        quad_coef = self.is_recovery[t + 1] / (2 * self.sigma[t + 1] ** 2)  # (B,): 0 at the top level

        def log_prob(v: Tensor) -> Tensor:
            y = v if scale is None else v * scale
            f = full_precision(net(y, t))
            return f / s2 - quad_coef * (y - x_next).pow(2).flatten(1).sum(1)

        return log_prob

    # ------------------------------------------------------------------------------------------------ chains
    def _chain(self, net: nn.Module, x_next: Tensor, t: Tensor, n_steps: int, noise_scale: float) -> Tensor:
        """K Langevin steps on level t's target from ``y = x_{t+1}``; returns the final y (detached).

        The step size differs per example (s_t of its level), while the shared sampler has one: the chain runs on
        u = y / s_t with step size 1, ``u <- u + (1/2) grad_u log p + eps`` with grad_u = s_t grad_y, which is exactly
        ``y <- y + (s_t^2 / 2) grad_y log p + s_t eps`` (the reference's update) for every example at once.
        """
        scale = self._per_item(self.step_size_sq, t, x_next).sqrt()
        x_next = x_next.detach()
        sampler = LangevinSampler(n_steps, 1.0, noise_scale=noise_scale)
        u = self.langevin(self._log_prob_fn(net, x_next, t, scale), x_next / scale, sampler)
        return u * scale

    @torch.no_grad()
    def sample(self, n: int, return_levels: bool = False, mcmc_steps: int | None = None,
               noise_scale: float | None = None, use_ema: bool | None = None, x_T: Tensor | None = None,
               clamp: bool = True):
        """Progressive sampling (``model.py`` ``p_sample_progressive``): x_T ~ N(0, I), then for t = T-1 down to 0
        ``mcmc_steps`` Langevin steps on level t's target from y = x_{t+1}, and x_t = y / a_{t+1}.

        Args:
            n: number of samples.
            return_levels: also return every level.
            mcmc_steps: K per level (default: the ``mcmc_steps`` hyperparameter, 30).
            noise_scale: the chains' noise scale (default: ``sample_noise_scale``, 0.99).
            use_ema: sample with the EMA net (default: when the model has one, as the reference samples with it).
            x_T: the initial level ``(n, *data_shape)`` (default: N(0, I)).
            clamp: clip images to [-1, 1], the data range every image family's ``sample`` returns (the reference
                clips when it writes pixels); False returns the raw x_0. Vectors (``dim``) are never clipped.

        Returns:
            x_0 ``(n, *data_shape)`` on the model's device (images in [-1, 1] unless ``clamp=False``; ``levels`` are
            the raw chain states), or ``(x_0, levels)`` with ``levels`` ``(T+1, n, *data_shape)``, ``levels[t]`` =
            x_t (``levels[T]`` = x_T, ``levels[0]`` = x_0), the reference's ``x_neg`` layout.

        Raises:
            ValueError: for ``n`` < 1 or not an integer, or ``use_ema`` without an EMA. DataShapeError: for an
                ``x_T`` that is not ``(n, *data_shape)`` finite floats.
        """
        where = f"{type(self).__name__}.sample"
        n = check_count(n, where=where)
        hp = self.hparams
        k = hp.mcmc_steps if mcmc_steps is None else check_count(mcmc_steps, "mcmc_steps", where=where, minimum=0)
        noise = hp.sample_noise_scale if noise_scale is None else float(noise_scale)
        net = self._net(use_ema)
        with torch.inference_mode(False):
            if x_T is None:
                x = torch.randn(n, *self.data_shape, device=self.a.device)
            else:
                self._check_data(x_T, "x_T", where, value_range=None)
                if x_T.shape[0] != n:
                    raise ValueError(f"{where}: x_T must hold n={n} items, got {x_T.shape[0]}")
                x = as_normal_tensor(x_T.to(self.a.device))
            levels = [x]
            for level in reversed(range(self.num_timesteps)):
                t = torch.full((n,), level, dtype=torch.long, device=x.device)
                y = self._chain(net, x, t, k, noise)
                x = y / self._per_item(self.a_prev, t + 1, y)
                levels.append(x)
        out = x.clamp(-1, 1) if clamp and self.hparams.get("dim") is None else x
        if not return_levels:
            return out
        return out, torch.stack(levels[::-1])

    # ------------------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        hp = self.hparams
        if hp.adam == "tf":
            return self.adam(self.net.parameters(), hp.lr, optimizer=AdamTF, eps=hp.adam_eps)
        return self.adam(self.net.parameters(), hp.lr, eps=hp.adam_eps)

    def recovery_loss(self, y_pos: Tensor, y_neg: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The training loss (``model.py`` ``training_losses``): ``mean_i w_{t_i} (f(y_i^-, t_i) - f(y_i^+, t_i))``
        with w_t = sigma_1 / sigma_{t+1} (``loss_weight="sigma_ratio"``) or 1. Its gradient descent raises f (the
        log-density) at the data y^+ and lowers it at the chains' samples y^-.

        Args:
            y_pos: data in the scaled variable, ``a_{t+1} x_t`` ``(B, *data_shape)``.
            y_neg: the chains' final states ``(B, *data_shape)``.
            t: their levels ``(B,)`` (long, in [0, T); not checked).

        Returns:
            ``(loss, f_pos, f_neg)``: the scalar loss and f at the data and at the samples ``(B,)``, at least fp32.
        """
        b = y_pos.shape[0]
        f = full_precision(self.net(torch.cat([y_pos, y_neg]), torch.cat([t, t])))  # one pass: (2B,)
        f_pos, f_neg = f[:b], f[b:]
        if self.hparams.loss_weight == "sigma_ratio":
            loss = (self.loss_weights[t] * (f_neg - f_pos)).mean()  # reference: -(f_pos - f_neg) * sigma_1/sigma_t+1
        else:
            loss = (f_neg - f_pos).mean()
        return loss, f_pos, f_neg

    def learning_rate(self, step: int | None = None) -> float:
        """The learning rate of iteration ``step`` (default: the current ``global_step``): ``lr * min(1, step /
        warmup)`` (``train_utils.py`` ``get_warmed_up_lr``; 0 at the first iteration, as TF's schedule at step 0)."""
        hp = self.hparams
        step = self.global_step if step is None else int(step)
        return hp.lr if hp.warmup == 0 else hp.lr * min(1.0, step / hp.warmup)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- ema + (1 - decay) (net - ema) for every parameter and buffer (TF's ExponentialMovingAverage)."""
        if self.ema_net is None:
            return
        w = 1.0 - self.hparams.ema_decay
        for e, p in zip(self.ema_net.parameters(), self.net.parameters()):
            e.lerp_(p.detach(), w)
        for e, b in zip(self.ema_net.buffers(), self.net.buffers()):
            e.lerp_(b, w)

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        hint = "Set --model.dim." if hp.dim is not None else None
        x = self.data_from_batch(batch, self.data_shape if hp.dim is not None else None, hint)
        logs = self.forward_backward(x)  # with capture_step on a GPU: one CUDA graph replay
        # the reference stops when its loss drops below -1e6 (or is NaN): the same bound, both signs
        if not self.check_finite({"loss": logs["loss"]}, {"loss": 1e6}):
            return
        opt = self.optimizers()
        lr = self.learning_rate()
        for group in getattr(opt, "optimizer", opt).param_groups:
            group["lr"] = lr
        opt.step()
        self._update_ema()
        logs["lr"] = lr
        self.log_train(logs, {"gap": logs["f_pos"] - logs["f_neg"]}, batch_size=x.shape[0])

    def _forward_backward(self, x: Tensor, backward) -> dict[str, Tensor]:
        """The training step but its parameter update and the EMA: the random flip, the levels t, the pairs, the
        chains, the recovery loss, its backward into ``.grad`` and the gradient's norm (clipped with ``grad_clip``).

        Args:
            x: a checked training batch ``(B, *data_shape)``.
            backward: ``loss -> None`` (``self.manual_backward`` or ``Tensor.backward``).

        Returns:
            detached 0-d tensors ``loss``, ``f_pos``, ``f_neg`` (means), ``grad_norm`` and ``disp`` (the chains'
            displacement ``|x^- - x_{t+1}|`` in units of x_t, the reference's ``disp``). No host reads; with
            ``capture_step`` on a GPU, one CUDA graph.
        """
        hp = self.hparams
        b = x.shape[0]
        if hp.dim is None and hp.random_flip:  # reference: tf.image.random_flip_left_right
            flip = (torch.rand(b, device=x.device) < 0.5).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        t = torch.randint(0, self.num_timesteps, (b,), device=x.device)
        x_t, x_next = self._pairs(x, t)
        y_neg = self._chain(self.net, x_next, t, hp.mcmc_steps, hp.noise_scale)  # (B, ...), K steps
        y_pos = self._per_item(self.a_prev, t + 1, x_t) * x_t
        loss, f_pos, f_neg = self.recovery_loss(y_pos, y_neg, t)
        self.optimizers().zero_grad(set_to_none=True)
        backward(loss)
        grad_norm = self.grad_norm_and_clip(self.net.parameters(), hp.grad_clip)
        with torch.no_grad():  # the chains' displacement |x^- - x_{t+1}| in units of x_t (reference: disp)
            a = self._per_item(self.a_prev, t + 1, y_neg)
            disp = (y_neg / a - x_next).flatten(1).norm(dim=1).mean()
        logs = {"loss": loss, "f_pos": f_pos.mean(), "f_neg": f_neg.mean(), "grad_norm": grad_norm, "disp": disp}
        return {k: v.detach() for k, v in logs.items()}
