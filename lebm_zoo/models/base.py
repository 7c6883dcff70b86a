"""``EBMModule``: the base class every family subclasses.

It is a ``pytorch_lightning.LightningModule`` with:

* the shared samplers (:class:`~lebm_zoo.samplers.SamplerMixin`: ``self.langevin`` / ``self.hmc``);
* manual optimisation (EBM training steps interleave chains and several optimisers);
* a divergence guard (:meth:`check_finite`) that skips a bad update, stops the trainer cleanly and keeps the last
  good weights, instead of a crash dump;
* checkpoints that record which class wrote them, so :func:`lebm_zoo.load_pretrained` can rebuild the model and
  refuse a checkpoint of another model with a clear error.

To add a model, subclass it, call ``self.save_hyperparameters()`` in ``__init__`` (plain values only: checkpoints are
loaded weights-only), implement ``training_step`` and the public methods your callbacks use (``sample`` for
:class:`~lebm_zoo.callbacks.FIDCallback` and :class:`~lebm_zoo.callbacks.SampleGrid`, ``reconstruct`` for
:class:`~lebm_zoo.callbacks.ReconstructionMSE`). See README "Adding a model".
"""
from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lebm_zoo.samplers import SamplerMixin

__all__ = ["DataShapeError", "EBMModule", "TrainingDivergedError"]


class DataShapeError(ValueError):
    """The data does not have the shape the model was configured for."""


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite or exploding loss and was stopped (the last good weights are kept)."""


class EBMModule(SamplerMixin, pl.LightningModule):
    """Base LightningModule of the zoo (manual optimisation, shared samplers, divergence guard, tagged checkpoints).

    Attributes:
        samplers: dict name -> sampler, filled by the subclass (used by ``self.langevin`` / ``self.hmc``).
        divergence: ``None`` while training is healthy; the message of the divergence that stopped training.
        explode_threshold: a loss whose magnitude exceeds this is treated as diverged (default 1e8).
    """

    explode_threshold: float = 1e8

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.samplers = {}
        self.divergence: str | None = None
        self.recipe: str | None = None  # set by `lebm-zoo` to the recipe name; stored in checkpoints

    # ----------------------------------------------------------------------------------------------- public API
    def sample(self, n: int) -> Tensor:  # pragma: no cover - abstract
        """Draw ``n`` samples from the model. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement sample(n)")

    @classmethod
    def load_pretrained(cls, name_or_path: str, map_location: str | torch.device = "cpu"):
        """Load a checkpoint of this class (or a subclass); see :func:`lebm_zoo.load_pretrained`.

        Raises:
            lebm_zoo.pretrained.CheckpointError: if the file holds another model, is corrupt or is no checkpoint.
        """
        from lebm_zoo.pretrained import load_pretrained

        return load_pretrained(name_or_path, map_location=map_location, expected_class=cls)

    # ----------------------------------------------------------------------------------------- divergence guard
    def check_finite(self, losses: dict[str, Tensor], limits: dict[str, float] | None = None) -> bool:
        """Return True if every loss is finite and within bounds; otherwise stop training cleanly.

        On failure the caller must skip its optimiser steps. This sets :attr:`divergence` to a message naming the
        losses, step and epoch, asks the trainer to stop after this batch (the checkpoint callbacks then save the last
        good weights) and warns; ``lebm-zoo fit`` turns it into an error message and a non-zero exit.
        One host-device synchronisation per call.

        Args:
            losses: scalar tensors by name.
            limits: optional bound on some losses' magnitude, by name; every loss is also bounded by
                :attr:`explode_threshold`.
        """
        limits = limits or {}
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()]).cpu()  # one sync
        bounds = torch.tensor([min(limits.get(k, math.inf), self.explode_threshold) for k in losses])
        ok = bool((values.isfinite() & (values.abs() <= bounds)).all())
        if ok:
            return True
        bound_txt = ", ".join(f"|{k}| <= {b:.3g}" for k, b in zip(losses, bounds.tolist()))
        vals = ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, values.tolist()))
        message = (
            f"{type(self).__name__} training diverged at epoch {self.current_epoch}, step {self.global_step}: "
            f"{vals} (expected finite values with {bound_txt}). The update was skipped and training stopped; the "
            "last good weights are in the last checkpoint. Try smaller learning rates or Langevin step sizes, gradient "
            "clipping, or fp32 precision.")
        self.stop_training(message)
        return False

    def stop_training(self, message: str) -> None:
        """Stop training cleanly after this batch: record ``message`` as :attr:`divergence` and warn.

        The checkpoint callbacks then save the last weights; ``lebm-zoo fit`` prints the message and exits with 1.
        """
        self.divergence = message
        rank_zero_warn(message)
        if self._trainer is not None:
            self.trainer.should_stop = True

    # ---------------------------------------------------------------------------------------------- plumbing
    def on_train_end(self) -> None:
        """Write the final weights to every ``ModelCheckpoint(save_last=True)``'s ``last.ckpt``.

        Lightning saves ``last.ckpt`` only when a checkpoint is due, so a run stopped by ``max_time``, ``max_steps``
        or the divergence guard between two saves would lose its latest steps.
        """
        from pytorch_lightning.callbacks import ModelCheckpoint

        for cb in self.trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                self.trainer.save_checkpoint(path)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from lebm_zoo._version import __version__

        cls = type(self)
        checkpoint["lebm_zoo"] = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "version": __version__,
                                  "recipe": self.recipe}

    def setup(self, stage: str) -> None:
        """Refuse a datamodule whose ``channels`` / ``img_size`` differ from the model's hyperparameters of that name.

        Raises:
            DataShapeError: naming the attribute, both values and the ``--model.*`` flag that fixes it.
        """
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr in ("channels", "img_size"):
            have, want = getattr(dm, attr, None), self.hparams.get(attr)
            if have is not None and want is not None and have != want:
                raise DataShapeError(f"the datamodule yields {attr}={have} but the model has {attr}={want}: set "
                                     f"--model.{attr} {have} (or change the data's {attr}).")

    def check_data_shape(self, x: Tensor, expected: tuple[int, ...], hint: str = "") -> None:
        """Raise a clear :class:`DataShapeError` if a batch's per-item shape differs from ``expected``."""
        if tuple(x.shape[1:]) != tuple(expected):
            raise DataShapeError(f"{type(self).__name__} expects items of shape {tuple(expected)} but the data has "
                             f"{tuple(x.shape[1:])}. {hint}".strip())

    @staticmethod
    def grad_norm_and_clip(params, max_norm: float | None) -> Tensor:
        """Total L2 norm of the gradients of ``params``; clips them to ``max_norm`` when it is set."""
        return torch.nn.utils.clip_grad_norm_(list(params), math.inf if max_norm is None else max_norm)

    def step_uncounted(self, optimizer) -> None:
        """Step a secondary optimiser without advancing ``trainer.global_step``.

        Lightning counts every optimiser step of a manual-optimisation module in ``global_step``; a family with
        several optimisers steps all but the first one through this, so that ``global_step`` and ``max_steps`` count
        training iterations. The step still goes through the strategy and precision plugin.
        """
        opt = getattr(optimizer, "optimizer", optimizer)  # unwrap LightningOptimizer
        self.trainer.strategy.optimizer_step(opt, closure=lambda: None)

    def step_schedulers(self) -> None:
        """Step every LR scheduler once (manual optimisation: call at epoch end)."""
        scheds = self.lr_schedulers()
        if scheds is None or self.divergence:
            return
        for s in scheds if isinstance(scheds, list) else [scheds]:
            s.step()
