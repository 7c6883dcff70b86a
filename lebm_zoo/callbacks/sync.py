"""``SyncEvery``: training steps that do not wait for the GPU."""
from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

__all__ = ["SyncEvery"]


class SyncEvery(Callback):
    """Let ``steps`` training batches pass between two host-device synchronisations of the divergence guard.

    By default the guard (:meth:`~lebm_zoo.EBMModule.check_finite`) reads the losses on the host at every training
    step, before the parameter updates, so that a non-finite loss is never applied; on a GPU that read waits for the
    step's kernels, and the host cannot queue the next step while the GPU works on this one. With this callback the
    losses stay on the device and are read once every ``steps`` batches (and at each epoch's last batch, before every
    checkpoint, when training ends): the steps in between have no synchronisation, and a divergence is found up to
    ``steps - 1`` batches late; ``fit`` then ends with :class:`~lebm_zoo.TrainingDivergedError` (``lebm-zoo fit``:
    exit code 1), with no checkpoint written from the bad step on (:meth:`~lebm_zoo.EBMModule.check_finite`).

    The progress bar reads its values on the host too, at every refresh: for steps with no synchronisation at all,
    give it the same period (``--trainer.callbacks+=TQDMProgressBar --trainer.callbacks.refresh_rate 50``) or turn
    it off (``--trainer.enable_progress_bar false``).

    Example: ``lebm-zoo fit --recipe svhn_prior --trainer.callbacks+=lebm_zoo.callbacks.SyncEvery
    --trainer.callbacks.steps 50``.

    Args:
        steps: batches per read, an integer >= 1 (1: the default guard, which reads at every check).

    Raises:
        ValueError: ``steps`` is not an integer >= 1.
        TypeError: at setup, for a module that is not a :class:`~lebm_zoo.EBMModule`.
    """

    def __init__(self, steps: int = 50) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"SyncEvery: steps must be an integer >= 1, got {steps!r}")
        self.steps = steps
        self._before: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "flush_checks"):
            raise TypeError(f"SyncEvery needs a lebm_zoo EBMModule, got {type(pl_module).__name__}")
        self._before, pl_module.sync_every = pl_module.sync_every, self.steps

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._before is not None:  # a later fit without this callback reads at every check again
            pl_module.sync_every, self._before = self._before, None
