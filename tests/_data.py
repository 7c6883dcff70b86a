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


def write_mnist(root: Path, n: int = 24, seed: int = 0, labels=None) -> None:
    """MNIST's real on-disk format (IDX files) in torchvision's layout, ``MNIST/raw/``: random uint8 images.

    ``labels``: optional ``(train_labels, test_labels)`` digit sequences; each file then holds as many images as its
    labels (``n`` is ignored). Default: ``n`` images per file with random digits.
    """
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for i, prefix in enumerate(("train", "t10k")):
        size = n if labels is None else len(labels[i])
        imgs = rng.integers(0, 256, size=(size, 28, 28), dtype=np.uint8)
        digits = rng.integers(0, 10, size=n, dtype=np.uint8) if labels is None else np.asarray(labels[i], np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0x803, size, 28, 28], dtype=">i4").tobytes() + imgs.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([0x801, size], dtype=">i4").tobytes() + digits.tobytes())
