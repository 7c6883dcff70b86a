"""Networks shared by the families: plain ``nn.Module`` s, no Lightning.

Architectures follow the reference code (``families.md`` §1): the SVHN generator of
bpucla/latent-space-EBM-prior (``train_svhn.py``) and its latent energy MLP.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvGenerator", "EnergyMLP", "xavier_init_convs", "count_parameters"]

# (kernel, stride, padding) of each transposed convolution after the first (k4 s1 p0: 1 -> 4 px), per image size
_UPSAMPLING = {
    28: [(3, 2, 1), (4, 2, 1), (4, 2, 1)],  # 4 -> 7 -> 14 -> 28
    32: [(4, 2, 1), (4, 2, 1), (4, 2, 1)],  # 4 -> 8 -> 16 -> 32 (the reference SVHN net)
    64: [(4, 2, 1), (4, 2, 1), (4, 2, 1), (4, 2, 1)],  # 4 -> 8 -> 16 -> 32 -> 64
}


def xavier_init_convs(module: nn.Module) -> None:
    """Xavier-normal weights for every layer whose class name contains "Conv"; biases keep PyTorch's default.

    This is the reference code's ``weights_init_xavier``.
    """
    for m in module.modules():
        if "Conv" in type(m).__name__ and getattr(m, "weight", None) is not None:
            nn.init.xavier_normal_(m.weight)


class ConvGenerator(nn.Module):
    """Generator G(z): transposed-convolution stack, LeakyReLU, Tanh output, no normalisation, all layers biased.

    For ``img_size=32, channels=3, nz=100, ngf=64`` it is exactly the SVHN generator of Pang et al. (2020):
    ConvT(100->512, k4 s1 p0) -> ConvT(512->256) -> ConvT(256->128) -> ConvT(128->3), 3,447,683 parameters.
    ``img_size=28`` swaps the first upsampling kernel to k3 (4 -> 7 px); ``img_size=64`` adds one layer and starts
    from ``16 * ngf`` channels (the CelebA-64 net of the LEBM-style reimplementations).

    Args:
        nz: latent size.
        ngf: width; channel counts are ``ngf * (8, 4, 2)`` (``ngf * (16, 8, 4, 2)`` at 64 px).
        img_size: 28, 32 or 64.
        channels: output channels, 1 or 3.
        leak: LeakyReLU slope (the reference uses 0.2).

    Shapes:
        ``z`` ``(B, nz)`` or ``(B, nz, 1, 1)`` -> images ``(B, channels, img_size, img_size)`` in [-1, 1].

    Raises:
        ValueError: for an unsupported ``img_size``.
    """

    def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 32, channels: int = 3, leak: float = 0.2):
        super().__init__()
        if img_size not in _UPSAMPLING:
            raise ValueError(f"img_size must be one of {sorted(_UPSAMPLING)}, got {img_size}")
        ups = _UPSAMPLING[img_size]
        widths = [ngf * 2 ** (len(ups) - i) for i in range(len(ups))]  # e.g. [512, 256, 128]
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0), nn.LeakyReLU(leak)]
        for (k, s, p), cin, cout in zip(ups, widths, widths[1:] + [channels]):
            layers += [nn.ConvTranspose2d(cin, cout, k, s, p), nn.LeakyReLU(leak)]
        layers[-1] = nn.Tanh()
        self.net = nn.Sequential(*layers)
        self.nz = nz
        xavier_init_convs(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


class EnergyMLP(nn.Module):
    """Latent energy E(z): MLP ``nz -> ndf -> ndf -> 1`` with GELU (the reference netE), outputs the energy.

    Lower energy = more likely. Spectral norm is off, as in the reference; PyTorch's default Linear init.

    Args:
        nz: latent size.
        ndf: hidden width (reference: 200).
        activation: ``"gelu"`` (reference default) or ``"lrelu"`` (LeakyReLU 0.2).

    Shapes:
        ``z`` ``(B, nz)`` (or ``(B, nz, 1, 1)``) -> energy ``(B,)``.
    """

    def __init__(self, nz: int = 100, ndf: int = 200, activation: str = "gelu"):
        super().__init__()
        acts = {"gelu": nn.GELU, "lrelu": lambda: nn.LeakyReLU(0.2)}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        act = acts[activation]
        self.net = nn.Sequential(nn.Linear(nz, ndf), act(), nn.Linear(ndf, ndf), act(), nn.Linear(ndf, 1))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.flatten(1)).squeeze(-1)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
