"""Small data the tests write themselves (shared by several test files)."""
from pathlib import Path

import numpy as np
import torch


def fixed_batch(n=16, c=1, s=28, seed=0):
    """Bright digit-like blobs: a data distribution the U[-1, 1] starting noise is far from."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, c, s, s)
    x[:, :, s // 4: 3 * s // 4, s // 3: 2 * s // 3] = 0.8
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def write_mnist(root: Path, n: int = 24, seed: int = 0) -> None:
    """MNIST's real on-disk format (IDX files) in torchvision's layout, ``MNIST/raw/``."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0x803, n, 28, 28], dtype=">i4").tobytes() + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([0x801, n], dtype=">i4").tobytes() + labels.tobytes())
