"""Small data the tests write themselves or read from ``tests/fixtures`` (shared by several test files), and where
the real data copies are.

``DATA_ROOT`` is the folder holding the real data sets (``mnist/``, ``ptb/``, ``zinc/``, ``cifar10/``, ``celeba/``):
``$LEBM_ZOO_TEST_DATA`` if set, else ``../shared/data`` beside the checkout. Tests that read it carry
``@pytest.mark.realdata("relative/path", ...)``; ``conftest.py`` skips them, naming the missing path, when it is not
there (or fails them when ``LEBM_ZOO_REQUIRE_REAL_DATA=1``, as CI sets).
"""
import os
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
DATA_ROOT = Path(os.environ.get("LEBM_ZOO_TEST_DATA") or TESTS.parents[1] / "shared" / "data").absolute()
#: the standard FID Inception weights where `lebm-zoo fid-weights` puts them by default
FID_WEIGHTS = Path(os.environ.get("LEBM_ZOO_FID_WEIGHTS") or
                   Path.home() / ".cache" / "lebm_zoo" / "weights-inception-2015-12-05-pool3-only.pth")


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
