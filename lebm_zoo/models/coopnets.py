"""Cooperative networks (Xie, Lu, Gao, Zhu, Wu, "Cooperative Training of Descriptor and Generator Networks",
TPAMI 2018; AAAI 2018), and their two networks.

Reference: the authors' TensorFlow 1 code, repository ``jianwen-xie/CoopNets`` at commit 04d5c32: ``main.py`` (the
defaults), ``model/model.py`` (the nets, the Langevin dynamics, the losses and the training loop),
``model/utils/custom_ops.py`` (layers and initialisers) and ``model/utils/data_io.py`` (data loading). Below,
``model.py:N`` etc. name lines of those files at that commit.

A descriptor (the Generative ConvNet: an EBM with score f(Y) and Gaussian reference N(0, sigma_d^2 I)) and a
generator g(z) learn together by MCMC teaching. One training iteration (``model.py:201-215``), in this order:

1. z ~ N(0, I) for ``n_chains`` chains (``main.py``: 12 x 12 = 144), drafts X = g(z);
2. descriptor Langevin from X, T steps (``model.py:116-121``): ``Y <- Y - (delta^2/2) (Y / sigma_d^2 - grad f(Y)) +
   delta eps``, eps ~ N(0, I), where ``grad f`` is the gradient of the sum of the descriptor's outputs;
3. optional (0 steps in ``main.py``) Langevin on z explaining Y under the generator (``model.py:132-140``):
   ``z <- z - (delta_g^2/2) (z + grad_z L) + delta_g eps`` with ``L = mean_chains sum_pixels ||Y - g(z)||^2 /
   (2 sigma_g^2)``, the generator loss itself (a batch mean: each chain's likelihood gradient carries 1/N);
4. descriptor update (``model.py:80-87``): minimise ``mean_chains F(Y) - mean_obs F(X_obs)``, ``F`` the sum of
   the ``n_out`` = 100 outputs (TF differentiates the 100-vector loss as the sum of its entries);
5. generator update (``model.py:92-100``): minimise ``mean_chains sum_pixels ||Y - g(z)||^2 / (2 sigma_g^2)`` with
   the z of step 3 and Y as data.

Both updates use TF1 Adam (``tf.train.AdamOptimizer(lr, beta1=0.5)``, beta2 0.999, epsilon 1e-8: ``model.py:83,97``;
:class:`~lebm_zoo.optim.AdamTF`), lr 0.007 (descriptor) and 1e-4 (generator), T = 15, delta = 0.002,
sigma_d = 0.016, delta_g = 0.1, sigma_g = 0.3, nz = 100 (``main.py:21-35``).

Identical to the reference by default: the nets at 28 px (its ``mnist`` nets) and 64 px (its ``scene`` nets) --
layers, TF ``SAME`` padding (asymmetric where TF's is), ``conv2d_transpose`` output sizes, LeakyReLU 0.2
(``custom_ops.py:8-10``), initialisers, BatchNorm as ``tf.contrib.layers.batch_norm`` defaults with
``is_training=True`` -- the Langevin updates of both nets (noise on in both), the loss reductions, the update order,
the optimiser, its learning rates and betas, and the scaling of the observed images. Options that deviate (each
defaults to the reference): ``adam="torch"`` (PyTorch's Adam), ``generator_langevin_grad="per_chain"``,
``data_scaling="none"`` for RGB images, ``descriptor_noise=False``, ``grad_clip_d``/``grad_clip_g``.

Not reproduced (outside the model): the reference feeds its training images in a fixed order every epoch
(``data_io.py:40-55``) where the zoo's datamodules shuffle; it trains on MNIST's 55,000-image ``train`` split of
``tf.contrib.learn`` (``data_io.py:22,63-64``). The 32 px nets (CIFAR-10) have no TF counterpart: the reference has
only its 28 px MNIST and 64 px scene nets (its MNIST generator's shapes are fixed to 4 -> 7 -> 14 -> 28, and its
scene nets need ``image_size // 16`` = 4); here 32 px uses the MNIST nets with 4 -> 8 -> 16 -> 32 up-sampling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lebm_zoo.models.base import EBMModule
from lebm_zoo.models.registry import register_family
from lebm_zoo.optim import AdamTF
from lebm_zoo.samplers import LangevinSampler
from lebm_zoo.utils import check_count, check_images, full_precision, in_training_loop

__all__ = ["CoopDescriptor", "CoopGenerator", "CoopNets"]

_SIZES = (28, 32, 64)
_ADAM = ("tf", "torch")
_GEN_GRAD = ("batch_mean", "per_chain")
_SCALING = ("reference", "minmax", "none")



# ------------------------------------------------------------------------------------------------ TF layers
def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF ``SAME`` padding of a convolution along one axis of length ``size``: ``(before, after)``.

    The output has ``ceil(size / stride)`` entries; the total padding ``max((out - 1) * stride + kernel - size, 0)``
    is split with the extra pixel of an odd total *after* (bottom/right), as TensorFlow does.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _SameConv2d(nn.Conv2d):
    """``tf.nn.conv2d(..., padding="SAME")``: zero padding from :func:`tf_same_padding`, asymmetric when TF's is."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__(in_channels, out_channels, kernel, stride, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        (top, bottom), (left, right) = (tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0]),
                                        tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1]))
        if bottom != top or right != left:  # the odd pixel of TF's padding: bottom/right only
            x = F.pad(x, (0, right - left, 0, bottom - top))
        return F.conv2d(x, self.weight, self.bias, self.stride, (top, left))


class _SameConvTranspose2d(nn.ConvTranspose2d):
    """``tf.nn.conv2d_transpose(..., output_shape, padding="SAME")``: the adjoint of a ``SAME`` conv2d that maps an
    ``out_size`` map to this layer's input (TF requires ``ceil(out_size / stride)`` = the input size).

    The full transposed convolution (length ``(in - 1) * stride + kernel``) is cropped to ``[before, before +
    out_size)`` with ``(before, after)`` the conv's :func:`tf_same_padding`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, out_size: int):
        super().__init__(in_channels, out_channels, kernel, stride, padding=0)
        self.out_size = out_size

    def forward(self, x: Tensor) -> Tensor:
        s, k, o = self.stride[0], self.kernel_size[0], self.out_size
        if x.shape[-1] != -(-o // s) or x.shape[-2] != -(-o // s):
            raise ValueError(f"a SAME conv2d_transpose to {o} px with stride {s} needs a {-(-o // s)} px input, got "
                             f"{tuple(x.shape[-2:])}")
        before, _ = tf_same_padding(o, k, s)
        y = F.conv_transpose2d(x, self.weight, self.bias, self.stride, before)  # crops `before` on both sides
        return y[..., :o, :o]  # and the extra `after - before` at the bottom/right


class _OffsetBatchNorm2d(nn.BatchNorm2d):
    """``tf.contrib.layers.batch_norm`` with its defaults as the reference calls it (``model.py:398,427``):
    ``center=True, scale=False`` (a learnable offset beta, init 0, no gamma), ``epsilon=1e-3``, ``is_training=True``.

    The reference normalises with the batch's statistics (biased variance) everywhere, in training, Langevin,
    sampling and interpolation (its generator is always built with ``is_training=True``). Its moving averages
    (``decay=0.999``, i.e. PyTorch momentum 0.001) are never used and never even updated (the update ops sit in
    ``UPDATE_OPS``, on which its train ops do not depend), so none are kept here: the layer uses batch statistics in
    train and eval mode alike.
    """

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-3, momentum=0.001, affine=False, track_running_stats=False)
        # momentum = 1 - TF's decay (unused: no running statistics); beta below, gamma = 1 in forward
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # gamma is passed as ones, not None: CUDA's batch-norm backward needs a weight whenever it has a bias
        # ("tensor does not have a device"); x * 1 is exact, so the values are those of gamma = None
        gamma = torch.ones_like(self.bias)
        return F.batch_norm(x, None, None, gamma, self.bias, True, 0.0, self.eps)


# ------------------------------------------------------------------------------------------------ networks
class CoopDescriptor(nn.Module):
    """CoopNets descriptor f(Y): a score (higher = more likely), the sum of ``n_out`` linear outputs.

    The reference's nets (``model.py:357-386``), every conv TF ``SAME``-padded, LeakyReLU(0.2) after each:

    * 28 px (its ``mnist`` net), and 32 px (no TF counterpart, same layers): Conv k4 s2 to ndf, 2ndf, 4ndf
      (28 -> 14 -> 7 -> 4 px, the last with TF's asymmetric padding; 32 -> 16 -> 8 -> 4);
    * 64 px (its ``scene`` net): Conv k5 s2 (ndf), Conv k3 s2 (2ndf), Conv k3 s1 (4ndf) (64 -> 32 -> 16 -> 16);

    then a fully-connected layer to ``n_out`` units (TF: a VALID conv whose kernel covers the map). Weights
    N(0, 0.01), biases 0 (``custom_ops.py:29-32``). 1,066,532 parameters at 28 px, 6,927,588 at 64 px (defaults).

    Args:
        channels: image channels, 1 or 3.
        img_size: 28, 32 or 64.
        ndf: width (reference: 64).
        n_out: outputs of the last layer, summed into the score (reference: 100).

    Shapes:
        ``x`` ``(B, channels, img_size, img_size)`` in [-1, 1] -> score ``(B,)``.

    Raises:
        ValueError: for an unsupported ``img_size``.
    """

    def __init__(self, channels: int = 3, img_size: int = 32, ndf: int = 64, n_out: int = 100):
        super().__init__()
        if img_size not in _SIZES:
            raise ValueError(f"img_size must be one of {_SIZES}, got {img_size}")
        if img_size == 64:
            convs = [(channels, ndf, 5, 2), (ndf, 2 * ndf, 3, 2), (2 * ndf, 4 * ndf, 3, 1)]
        else:
            convs = [(channels, ndf, 4, 2), (ndf, 2 * ndf, 4, 2), (2 * ndf, 4 * ndf, 4, 2)]
        layers: list[nn.Module] = []
        size = img_size
        for cin, cout, k, s in convs:
            layers += [_SameConv2d(cin, cout, k, s), nn.LeakyReLU(0.2)]
            size = -(-size // s)
        layers += [nn.Flatten(), nn.Linear(4 * ndf * size * size, n_out)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).sum(1)


class CoopGenerator(nn.Module):
    """CoopNets generator g(z) (``model.py:391-444``): ConvT k4 VALID from the 1x1 latent to 4 px, then TF ``SAME``
    ``conv2d_transpose`` up-samplings with stride 2; BatchNorm (:class:`_OffsetBatchNorm2d`: offset only, batch
    statistics always) and LeakyReLU(0.2) after every layer but the last, Tanh output.

    * 28 px (its ``mnist`` net): k4 everywhere, 4 -> 7 -> 14 -> 28 px, widths 8ngf, 4ngf, 2ngf (512, 256, 128);
    * 32 px (no TF counterpart): the same with 4 -> 8 -> 16 -> 32;
    * 64 px (its ``scene`` net): k5 up-samplings, 4 -> 8 -> 16 -> 32 -> 64, widths 8ngf, 4ngf, 2ngf, ngf
      (512, 256, 128, 64).

    Init N(0, 0.005) for ConvT weights, biases 0 (``custom_ops.py:66-70``), BatchNorm offsets 0. 3,444,481
    parameters at 28 px (1 channel), 5,126,723 at 64 px (3 channels), defaults.

    Args:
        nz: latent size (reference: 100).
        ngf: width (reference: 64).
        img_size: 28, 32 or 64.
        channels: output channels.

    Shapes:
        ``z`` ``(B, nz)`` -> images ``(B, channels, img_size, img_size)`` in [-1, 1]. BatchNorm couples the batch.

    Raises:
        ValueError: for an unsupported ``img_size``.
    """

    def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 32, channels: int = 3):
        super().__init__()
        if img_size not in _SIZES:
            raise ValueError(f"img_size must be one of {_SIZES}, got {img_size}")
        sizes, kernel = {28: ([7, 14, 28], 4), 32: ([8, 16, 32], 4), 64: ([8, 16, 32, 64], 5)}[img_size]
        widths = [8 * ngf // 2 ** i for i in range(len(sizes))]  # [8, 4, 2(, 1)] * ngf
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0)]
        for cin, cout, size in zip(widths, widths[1:] + [channels], sizes):
            layers += [_OffsetBatchNorm2d(cin), nn.LeakyReLU(0.2), _SameConvTranspose2d(cin, cout, kernel, 2, size)]
        layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        self.nz = nz
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, 0.005)
                nn.init.zeros_(m.bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


# ------------------------------------------------------------------------------------------------ the model
@register_family(tiny={
    "CoopNets": dict(img_size=28, channels=1, nz=8, ngf=4, ndf=4, n_out=4, n_chains=4, descriptor_steps=2),
})
class CoopNets(EBMModule):
    """Descriptor (EBM) plus generator trained cooperatively by MCMC teaching (Xie et al. 2018).

    Defaults are the reference TF code's (``main.py:15-35``, ``model/model.py`` at 04d5c32; see the module
    docstring for what is identical and which options deviate): ``nz=100``, 144 synthesised chains per observed
    batch, descriptor Langevin T=15, delta=0.002, sigma_d=0.016 with noise, generator inference off (0 steps;
    delta=0.1 with noise when on), sigma_g=0.3, TF Adam lr 0.007 (descriptor) and 1e-4 (generator), betas
    (0.5, 0.999).

    Args:
        img_size: 28 (the reference's MNIST nets), 32 (no TF counterpart) or 64 (its scene nets), pixels.
        channels: 1 or 3.
        nz: latent size of the generator.
        ngf: generator width (:class:`CoopGenerator`).
        ndf: descriptor width (:class:`CoopDescriptor`).
        n_out: outputs summed into the descriptor score (reference: 100).
        n_chains: synthesised chains per iteration (reference: 144; the observed batch is the datamodule's, 100).
        descriptor_steps, descriptor_step_size, descriptor_sigma: T, delta and sigma_d of the descriptor Langevin.
        descriptor_noise: inject the Langevin noise (reference: on; False deviates).
        generator_steps, generator_step_size: Langevin inference of z for the generator (reference: 0 = off, 0.1).
        generator_sigma: sigma_g of the generator's Gaussian likelihood, in [-1, 1] pixel units.
        generator_langevin_grad: the likelihood gradient of the z Langevin. ``"batch_mean"`` (reference): TF
            differentiates the batch-mean generator loss, so each chain's ``||Y_i - g(z_i)||^2 / (2 sigma_g^2)``
            gradient is scaled by ``1 / n_chains`` (the prior term ``z`` is not); ``"per_chain"`` (deviates): the
            gradient of each chain's own log-posterior, ``log p(Y_i | z_i) + log p(z_i)``.
        lr_d, lr_g: Adam learning rates of the descriptor and the generator.
        betas: Adam betas of both.
        adam: ``"tf"`` (reference): :class:`~lebm_zoo.optim.AdamTF`, TF1's update with epsilon 1e-8 added to
            ``sqrt(v_t)``; ``"torch"`` (deviates): ``torch.optim.Adam``, epsilon added to the bias-corrected root.
        data_scaling: how the observed images are scaled. ``"reference"``: as the reference's loader for this kind
            of data -- per-image min-max to [-1, 1] (over all pixels and channels) for 3-channel images, as it loads
            folders of images (``data_io.py:91-93``), and the datamodule's fixed ``x / 127.5 - 1`` for 1 channel, as
            its MNIST loader (``data_io.py:75``); ``"minmax"`` or ``"none"`` force one (``"none"`` deviates for RGB).
        grad_clip_d, grad_clip_g: optional max gradient norms (reference: off).
        compile_chains, compile_scope: run the Langevin chains through ``torch.compile`` (default None: eager), each
            step or each whole chain as one compiled region, as :class:`~lebm_zoo.LatentEBMPrior`'s (same chains up to
            float rounding; see :class:`~lebm_zoo.samplers.LangevinSampler`).
        capture_step: on a GPU, each training step's drafts, revisions, losses and backward as one CUDA graph, the
            updates eager (default False), as :class:`~lebm_zoo.LatentEBMPrior`'s
            (:meth:`EBMModule.forward_backward`).

    Images are ``(B, channels, img_size, img_size)`` in [-1, 1]; latents ``(B, nz)``.

    Raises:
        ValueError: for out-of-range or unknown option values.
    """

    #: layer sizes, each an integer >= 1 (checked when the hyperparameters are saved)
    size_hparams = ("nz", "ngf", "ndf", "n_chains")
    #: hyperparameters a resumed run may change (the others come from the checkpoint)
    resume_hparams = (
        "descriptor_steps", "descriptor_step_size", "descriptor_noise", "generator_steps", "generator_step_size",
        "lr_d", "lr_g", "betas", "grad_clip_d", "grad_clip_g", "compile_chains", "compile_scope",
        "capture_step")

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
        generator_langevin_grad: str = "batch_mean",
        lr_d: float = 0.007,
        lr_g: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        adam: str = "tf",
        data_scaling: str = "reference",
        grad_clip_d: float | None = None,
        grad_clip_g: float | None = None,
        compile_chains: bool | str | None = None,
        compile_scope: str = "step",
        capture_step: bool = False,
    ):
        super().__init__()
        self.check_capture_args(capture_step, compile_chains)
        if n_chains < 1:
            raise ValueError(f"n_chains must be >= 1, got {n_chains}")
        if descriptor_sigma <= 0 or generator_sigma <= 0:
            raise ValueError(f"descriptor_sigma and generator_sigma must be > 0, got {descriptor_sigma}, "
                             f"{generator_sigma}")
        for name, value, choices in (("adam", adam, _ADAM), ("generator_langevin_grad", generator_langevin_grad,
                                                               _GEN_GRAD), ("data_scaling", data_scaling, _SCALING)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        self.save_hyperparameters()
        self.descriptor = CoopDescriptor(channels=channels, img_size=img_size, ndf=ndf, n_out=n_out)
        self.generator = CoopGenerator(nz=nz, ngf=ngf, img_size=img_size, channels=channels)
        self.samplers = {
            "descriptor": LangevinSampler(descriptor_steps, descriptor_step_size,
                                          noise_scale=1.0 if descriptor_noise else 0.0, **self.chain_compile_kwargs()),
            "generator": LangevinSampler(generator_steps, generator_step_size,  # noise on (model.py:133,139)
                                         **self.chain_compile_kwargs()),
        }

    # ------------------------------------------------------------------------------------------------ densities
    def neg_energy(self, x: Tensor) -> Tensor:
        """The descriptor's negative energy f(Y) (the reference's score; higher = more likely): ``(B, C, H, W)`` in
        [-1, 1] -> ``(B,)``, fp32 or wider.

        Raises:
            DataShapeError: for images of another shape, an integer dtype or non-finite values (any finite value is
                accepted: revisions leave [-1, 1]).
        """
        if self.called_by_user():
            check_images(x, self.hparams.channels, self.hparams.img_size, where=f"{type(self).__name__}.neg_energy",
                         value_range=None)
        return full_precision(self.descriptor(x))

    def log_prob(self, x: Tensor) -> Tensor:
        """Descriptor's unnormalised log-density ``f(Y) - ||Y||^2 / (2 sigma_d^2)``, ``(B,)`` in nats."""
        sq_norm = full_precision(x).flatten(1).pow(2).sum(1)
        return self.neg_energy(x) - sq_norm / (2 * self.hparams.descriptor_sigma ** 2)

    def energy(self, x: Tensor) -> Tensor:
        """Descriptor energy ``-log_prob(x)`` (lower = more likely), ``(B,)``, up to the log-normaliser."""
        return -self.log_prob(x)

    def generator_log_joint(self, y: Tensor, z: Tensor, likelihood_scale: float = 1.0) -> Tensor:
        """``log p(Y, z) = -s ||Y - g(z)||^2 / (2 sigma_g^2) - ||z||^2 / 2`` up to constants, ``(B,)``; ``s`` is
        ``likelihood_scale`` (1: the true log joint; the z Langevin uses ``1 / n_chains`` by default)."""
        rec = (y - full_precision(self.generator(z))).flatten(1).pow(2).sum(1)
        return -likelihood_scale * rec / (2 * self.hparams.generator_sigma ** 2) - z.pow(2).sum(1) / 2

    def scale_observed(self, x: Tensor) -> Tensor:
        """The observed batch as the model trains on it (``data_scaling``): per-image min-max to [-1, 1] or as is.

        A constant image (max = min, a division by zero in the reference) maps to -1.
        """
        mode = self.hparams.data_scaling
        if mode == "none" or (mode == "reference" and self.hparams.channels == 1):
            return x
        flat = x.flatten(1)
        lo, hi = flat.amin(1), flat.amax(1)  # (B,)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (x - lo.view(shape)) / (hi - lo).clamp_min(1e-12).view(shape) * 2 - 1

    # ------------------------------------------------------------------------------------------------ sampling
    def revise(self, x: Tensor, n_steps: int | None = None) -> Tensor:
        """Descriptor Langevin revision of images ``(B, C, H, W)`` in [-1, 1] (T steps by default) -> same shape.

        Raises:
            DataShapeError: for images of another shape, an integer dtype, values outside [-1, 1] or non-finite ones
                (not checked in the training loop, which revises the generator's drafts).
        """
        if not in_training_loop(self):
            check_images(x, self.hparams.channels, self.hparams.img_size, where=f"{type(self).__name__}.revise")
        return self._revise(x, n_steps)

    def _revise(self, x: Tensor, n_steps: int | None = None) -> Tensor:
        """:meth:`revise` of images the model made (unchecked)."""
        return self.langevin(self.log_prob, full_precision(x), "descriptor", n_steps=n_steps)

    @torch.no_grad()
    def sample(self, n: int, refine: bool = True, n_steps: int | None = None, clamp: bool = True) -> Tensor:
        """Draw ``n`` images: the generator's draft g(z), z ~ N(0, I), revised by descriptor Langevin if ``refine``.

        The generator's BatchNorm uses the statistics of the batch being drawn (as the reference, which draws in
        batches of its 144 chains), so draw in batches of tens of images or more. The default revision length is
        T, that of the training-time revisions on which the reference computes its in-training inception score and
        Parzen estimate (``model.py:222,249,264``); its separate test-mode synthesis (``main.py:93``) uses 10.

        Args:
            n: number of images.
            refine: revise the drafts by ``n_steps`` descriptor Langevin steps (the model's samples); False returns
                the generator's drafts.
            n_steps: revision length (default: ``descriptor_steps``, as in training).
            clamp: clip the revised images to [-1, 1], the data range every image family's ``sample`` returns (the
                reference clips when it writes pixels); False returns the raw chain states, which overshoot a little.

        Returns:
            ``(n, C, H, W)`` images on the model's device, in [-1, 1] (unless ``clamp=False``).

        Raises:
            ValueError: for ``n`` < 1 or not an integer.
        """
        n = check_count(n, where=f"{type(self).__name__}.sample")
        z = torch.randn(n, self.hparams.nz, device=self.device, dtype=self.dtype)
        draft = full_precision(self.generator(z))
        if not refine:
            return draft
        y = self._revise(draft, n_steps)
        return y.clamp(-1, 1) if clamp else y

    # ------------------------------------------------------------------------------------------------ training
    def configure_optimizers(self):
        hp = self.hparams
        opt = AdamTF if hp.adam == "tf" else torch.optim.Adam
        return [self.adam(self.descriptor.parameters(), hp.lr_d, opt),
                self.adam(self.generator.parameters(), hp.lr_g, opt)]

    def training_step(self, batch, batch_idx: int) -> None:
        x_obs = self.scale_observed(self.data_from_batch(batch))  # (B, C, H, W) in [-1, 1]
        opt_d, opt_g = self.optimizers()
        logs = self.forward_backward(x_obs)  # with capture_step on a GPU: one CUDA graph replay
        if not self.check_finite({"loss_d": logs["loss_d"], "loss_g": logs["loss_g"]}):
            return
        opt_d.step()  # descriptor first, then generator (model.py:211-215; independent updates)
        self.step_uncounted(opt_g)
        self.log_train(logs, {"loss_g": logs["loss_g"], "gap": -logs["loss_d"]}, batch_size=x_obs.shape[0])

    def _forward_backward(self, x_obs: Tensor, backward) -> dict[str, Tensor]:
        """The training step but its two parameter updates: the drafts, the descriptor's revisions (and the
        generator's inference when ``generator_steps`` > 0), both losses, one backward into ``.grad`` and the
        gradients' norms (clipped with ``grad_clip_d`` / ``grad_clip_g``).

        Args:
            x_obs: the observed images ``(B, C, H, W)`` in [-1, 1], scaled (:meth:`scale_observed`).
            backward: ``loss -> None`` (``self.manual_backward`` or ``Tensor.backward``).

        Returns:
            detached 0-d tensors ``loss_d``, ``loss_g``, ``score_pos``, ``score_neg``, ``grad_norm_d``,
            ``grad_norm_g``, ``revision_rms``. No host reads; with ``capture_step`` on a GPU, one CUDA graph.
        """
        hp = self.hparams
        # 1. drafts (model.py:202-203)
        z = torch.randn(hp.n_chains, hp.nz, device=self.device, dtype=self.dtype)  # (N, nz)
        x_draft = self.generator(z)  # (N, C, H, W); its graph serves the generator loss below
        # 2. descriptor Langevin revisions, T steps (model.py:205-206)
        y = self.revise(x_draft.detach())  # (N, C, H, W)
        # 3. optional inference of z for the revisions (model.py:208-209; off in the reference)
        if hp.generator_steps > 0:
            scale = 1.0 / hp.n_chains if hp.generator_langevin_grad == "batch_mean" else 1.0
            z = self.langevin(lambda zz: self.generator_log_joint(y, zz, scale), z, "generator")
            x_draft = self.generator(z)

        # 4. and 5. the losses (model.py:80, 92-93)
        f_pos, f_neg = self.neg_energy(x_obs), self.neg_energy(y)  # (B,), (N,)
        loss_d = f_neg.mean() - f_pos.mean()  # descriptor: data up, revisions down
        loss_g = (y - full_precision(x_draft)).flatten(1).pow(2).sum(1).mean() / (2 * hp.generator_sigma ** 2)
        # f depends only on the descriptor and Y is detached; g(z) depends only on the generator: one backward of the
        # sum gives each network exactly its own loss's gradient.
        for opt in self.optimizers():
            opt.zero_grad(set_to_none=True)
        backward(loss_d + loss_g)
        logs = {"loss_d": loss_d, "loss_g": loss_g, "score_pos": f_pos.mean(), "score_neg": f_neg.mean(),
                "grad_norm_d": self.grad_norm_and_clip(self.descriptor.parameters(), hp.grad_clip_d),
                "grad_norm_g": self.grad_norm_and_clip(self.generator.parameters(), hp.grad_clip_g),
                # how far the descriptor moved the drafts: per-pixel RMS of Y - g(z)
                "revision_rms": (y - full_precision(x_draft.detach())).pow(2).mean().sqrt()}
        return {k: v.detach() for k, v in logs.items()}
