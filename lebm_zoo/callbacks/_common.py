"""Private helpers shared by the callbacks (and the CLI's end-of-fit summary): where a run's files go, how they are
named, and how an image reaches the loggers. One module, so that no callback imports another one's private names."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

__all__: list[str] = []  # private: import the names explicitly


def _epoch_stem(trainer: pl.Trainer, used: set[str]) -> str:
    """``epoch=NNNN``, or ``epoch=NNNN-step=S`` for a second validation within the same epoch (mid-epoch
    ``val_check_interval``), so that earlier files are not overwritten. ``used`` collects the stems handed out."""
    stem = f"epoch={trainer.current_epoch:04d}"
    if stem in used:
        stem = f"{stem}-step={trainer.global_step}"
    used.add(stem)
    return stem


def _run_dir(trainer: pl.Trainer) -> Path:
    """The run's own folder, where the callbacks write their files. Collective under DDP: call on all ranks.

    * first logger a ``TensorBoardLogger`` or ``CSVLogger``: its ``log_dir`` (``<save_dir>/<name>/version_N``), i.e.
      ``trainer.log_dir``;
    * another logger (``WandbLogger``, ``MLFlowLogger``, ...): ``<save_dir>/<name>/<version>`` (``save_dir``:
      ``default_root_dir`` when the logger has none), e.g. ``<save_dir>/<project>/<run id>/`` for W&B: the folder
      where ``ModelCheckpoint`` puts its ``checkpoints/`` for such a logger. (``trainer.log_dir`` is the logger's
      ``save_dir`` there, shared by every run, so a second run would overwrite the first one's files.)
    * no logger: ``default_root_dir`` (no run to tell apart; give the callbacks a ``dirpath`` to separate runs).
    """
    if not trainer.loggers or isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger)):
        return Path(trainer.log_dir or trainer.default_root_dir)
    logger = trainer.loggers[0]
    if logger.version is None and trainer.is_global_zero:
        logger.experiment  # noqa: B018 - a logger that starts its run lazily (W&B) gets its id here
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    path = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    return Path(trainer.strategy.broadcast(path))


def _hwc_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] (or uint8) -> ``(H, W, 3)`` uint8 numpy, rounded as ``save_image`` rounds, so
    the logged image has the PNG's pixels."""
    if image.dtype != torch.uint8:
        image = image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return image.permute(1, 2, 0).cpu().numpy()


def _log_image(trainer: pl.Trainer, tag: str, image: torch.Tensor) -> None:
    """Send a ``(3, H, W)`` image (float in [0, 1], or uint8) to the trainer's loggers that take images.

    * ``TensorBoardLogger``: ``experiment.add_image(tag, image, global_step)`` (TensorBoard scales floats itself);
    * ``WandbLogger``: ``log_image(key=tag, images=[(H, W, 3) uint8 array], step=global_step)``; W&B renders a float
      tensor in [0, 1] as a black image;
    * another logger with a ``log_image`` method: ``log_image(key=tag, images=[image])`` (with ``step`` when it takes
      one);
    * others are ignored.
    """
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, trainer.global_step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[_hwc_uint8(image)], step=trainer.global_step)
        elif callable(getattr(logger, "log_image", None)):
            kwargs = {"step": trainer.global_step} if "step" in inspect.signature(logger.log_image).parameters else {}
            logger.log_image(key=tag, images=[image], **kwargs)
