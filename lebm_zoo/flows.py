"""Normalizing flows for flow contrastive estimation, from the maintained ``zuko`` library behind one small interface.

Why zuko for images too: the issue suggested a Glow-style multiscale flow from ``normflows``; normflows is less
active, and a Glow needs dozens of hand-wired blocks around it. zuko (actively maintained, tested) provides RealNVP
affine coupling flows with MLP conditioners, which we apply to flattened images. This gives exact log-densities and
one-pass reparameterised sampling, which is all FCE needs; it is a weaker image model than Glow's convolutional
couplings (FCE's image numbers in the paper used Glow, so ours are not comparable). Swapping in another flow means
implementing :class:`Flow`'s two methods.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Flow"]

_KINDS = ("maf", "realnvp")


class Flow(nn.Module):
    """A normalizing flow q(x) on tensors of a fixed shape, with exact ``log_prob`` and reparameterised ``rsample``.

    Args:
        shape: the shape of one item, e.g. ``(2,)`` or ``(1, 28, 28)``; the flow acts on the flattened item.
        kind: ``"maf"`` (masked autoregressive flow: best density for small dimensions, sampling is sequential in the
            dimension) or ``"realnvp"`` (affine coupling: one-pass sampling, for images).
        transforms: number of flow blocks.
        hidden: width of the conditioner MLPs (two hidden layers).

    Raises:
        ValueError: for an unknown ``kind``.
    """

    def __init__(self, shape: tuple[int, ...], kind: str = "maf", transforms: int = 5, hidden: int = 100):
        super().__init__()
        import zuko

        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.shape = tuple(int(s) for s in shape)
        self.dim = math.prod(self.shape)
        cls = zuko.flows.MAF if kind == "maf" else zuko.flows.RealNVP
        self.flow = cls(features=self.dim, transforms=transforms, hidden_features=(hidden, hidden))

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log q(x): ``(B, *shape) -> (B,)`` fp32, in nats."""
        return self.flow().log_prob(x.float().reshape(x.shape[0], self.dim))

    def rsample(self, n: int) -> Tensor:
        """``n`` reparameterised samples ``(n, *shape)`` (differentiable w.r.t. the flow's parameters)."""
        return self.flow().rsample((n,)).reshape(n, *self.shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` samples ``(n, *shape)``, without gradients."""
        return self.rsample(n)
