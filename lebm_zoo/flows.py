"""Normalizing flows for flow contrastive estimation, from maintained libraries behind one small interface.

Three kinds, all with exact log-densities and one-pass reparameterised sampling (what FCE needs):

- ``"maf"`` (zuko's masked autoregressive flow on flattened vectors): the 2-D toy's flow;
- ``"realnvp"`` (zuko's affine couplings with MLP conditioners on flattened pixels): cheap, but a weak image model;
- ``"glow"`` (``normflows``' multiscale Glow: squeeze, K Glow blocks per level (a coupling with a conv net,
  invertible 1x1 conv, actnorm), half the channels factored out after each level): the flow the FCE paper used for
  images (Gao et al., CVPR 2020, Sec. 4). Two choices of ours, for samples that stay finite: pixels in [-1, 1] are
  mapped to [0, 1] and through RealNVP's logit transform (Dinh et al. 2017, Sec. 4.1; ``alpha`` 0.05), so the flow
  models unbounded values and its samples land in [-1.11, 1.11]; and the couplings are additive (Glow's additive
  variant, Kingma & Dhariwal 2018, Sec. 3.3; actnorm and the 1x1 convolutions still scale). With Glow's affine
  coupling (a sigmoid scale that divides in the sampling direction), FCE's first flow samples after the MLE warm-up
  on MNIST overflowed, with and without the logit (a few blocks took values from 60 to 1e8, then to inf); with the
  scale multiplying in the sampling direction instead, the MLE warm-up itself diverged. ``affine=True`` (in
  :func:`_multiscale_glow`) restores Glow's affine coupling. normflows is pinned in ``pyproject.toml``; its multiscale
  model is assembled here from its blocks the way its documentation assembles one.

Swapping in another flow means implementing :class:`Flow`'s ``log_prob`` and ``rsample``.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

__all__ = ["Flow"]

_KINDS = ("maf", "realnvp", "glow")


class Flow(nn.Module):
    """A normalizing flow q(x) on tensors of a fixed shape, with exact ``log_prob`` and reparameterised ``rsample``.

    Args:
        shape: the shape of one item, e.g. ``(2,)`` or ``(1, 28, 28)``. ``maf`` and ``realnvp`` act on the flattened
            item; ``glow`` needs ``(C, H, W)`` with H and W divisible by ``2 ** levels``.
        kind: ``"maf"`` (best density for small dimensions; sampling is sequential in the dimension), ``"realnvp"``
            (affine coupling on flattened pixels) or ``"glow"`` (multiscale Glow with conv couplings, for images).
        transforms: number of flow blocks (for ``glow``: Glow blocks per level, the paper's K).
        hidden: width of the conditioners (MLP width for maf/realnvp; hidden channels of Glow's coupling nets).
        levels: number of Glow levels (the paper's L); None picks the largest of 1-3 that divides H and W.

    Raises:
        ValueError: for an unknown ``kind``, or a ``glow`` shape that is not ``(C, H, W)`` divisible by
            ``2 ** levels``.
    """

    def __init__(self, shape: tuple[int, ...], kind: str = "maf", transforms: int = 5, hidden: int = 100,
                 levels: int | None = None):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.shape = tuple(int(s) for s in shape)
        self.dim = math.prod(self.shape)
        self.kind = kind
        if kind == "glow":
            self.flow = _multiscale_glow(self.shape, transforms, hidden, levels)
            return
        import zuko

        cls = zuko.flows.MAF if kind == "maf" else zuko.flows.RealNVP
        self.flow = cls(features=self.dim, transforms=transforms, hidden_features=(hidden, hidden))

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log q(x): ``(B, *shape) -> (B,)`` fp32, in nats."""
        if self.kind == "glow":  # u = (x + 1) / 2 has log |du/dx| = -D log 2
            u = (x.float().reshape(x.shape[0], *self.shape) + 1) / 2
            return self.flow.log_prob(u, None) - self.dim * math.log(2.0)
        return self.flow().log_prob(x.float().reshape(x.shape[0], self.dim))

    def rsample(self, n: int) -> Tensor:
        """``n`` reparameterised samples ``(n, *shape)`` (differentiable w.r.t. the flow's parameters)."""
        if self.kind == "glow":
            return self.flow.sample(n)[0] * 2 - 1
        return self.flow().rsample((n,)).reshape(n, *self.shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` samples ``(n, *shape)``, without gradients."""
        return self.rsample(n)


def _multiscale_glow(shape: tuple[int, ...], blocks: int, hidden: int, levels: int | None,
                     affine: bool = False) -> nn.Module:
    """normflows' multiscale Glow for items ``(C, H, W)`` in [0, 1] (behind a logit transform), unconditional, with a
    learned per-channel Gaussian base.

    Level i (0 = coarsest) sees ``C * 2 ** (L + 1 - i)`` channels at ``H / 2 ** (L - i)``; after each finer level half
    of the channels are factored out to their own base distribution (Dinh et al. 2017; Kingma & Dhariwal 2018).
    """
    import normflows as nf

    # normflows' invertible 1x1 conv calls torch.lu, deprecated in torch; nothing a user of ours can act on
    warnings.filterwarnings("ignore", message=r"torch\.lu is deprecated", category=UserWarning)
    if len(shape) != 3:
        raise ValueError(f"a glow flow needs an image shape (C, H, W), got {shape}")
    c, h, w = shape
    if levels is None:
        levels = next(L for L in (3, 2, 1, 0) if h % 2 ** L == 0 and w % 2 ** L == 0)
    if levels < 1 or h % 2 ** levels or w % 2 ** levels:
        raise ValueError(f"glow needs H and W divisible by 2 ** levels (levels >= 1); got {shape} and levels={levels}")
    q0, flows, merges = [], [], []
    for i in range(levels):
        flows.append([nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=affine)
                      for _ in range(blocks)] + [nf.flows.Squeeze()])
        if i == 0:
            latent = (c * 2 ** (levels + 1), h // 2 ** levels, w // 2 ** levels)
        else:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        q0.append(nf.distributions.GlowBase(latent))
    return nf.MultiscaleFlow(q0, flows, merges, transform=nf.transforms.Logit(alpha=0.05), class_cond=False)
