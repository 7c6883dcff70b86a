"""Small helpers shared by models, callbacks and datamodules."""
from __future__ import annotations

import torch


def images_from_batch(batch) -> torch.Tensor:
    """Return the image tensor of a batch.

    Args:
        batch: either a tensor ``(B, C, H, W)`` or a ``(x, y, ...)`` tuple/list as torchvision datasets yield.

    Returns:
        the images, ``(B, C, H, W)``.

    Raises:
        TypeError: if the batch holds no tensor in first position.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("x"), torch.Tensor):
        return batch["x"]
    raise TypeError(f"expected a batch of images (a tensor or an (x, y) pair), got {type(batch).__name__}")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] (any float dtype) to uint8 in [0, 255], rounding to nearest."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
