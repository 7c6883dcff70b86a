"""Trajectory prediction metrics: ADE and FDE, best of K, on the protocol of LB-EBM's reference; and a picture of
predicted futures over the observed pasts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from lebm_zoo.callbacks._common import _epoch_stem, _run_dir

__all__ = ["TrajectoryMetrics", "demo_pasts", "plot_trajectories"]


class TrajectoryMetrics(pl.Callback):
    """ADE and FDE, best of K, of ``pl_module.best_of_k_errors(windows, k, mask)`` (:class:`~lebm_zoo.TrajectoryLEBM`)
    on the validation and test windows (``windows, mask = pl_module.windows_from_batch(batch)``): per window, the
    best of K sampled plans (nearest the true plan), FDE the distance of its final point to the true final position,
    ADE the mean distance over the predicted steps of the future completed from it; both averaged over all windows
    (summed, then divided by their number, as the reference). In the data's units: metres on ETH-UCY, pixels on
    Stanford Drone. Lower is better.

    Under DDP the sums and counts are reduced over the ranks before the division.

    Args:
        k: samples per window (None: the model's ``n_values``, 20 in the paper).
        every_n_epochs: evaluate at the end of validation epochs where ``(epoch + 1) % every_n_epochs == 0`` (0:
            never; the sanity check never counts).
        on_test: evaluate at test.
        plot: save a PNG of predictions for the first test (and evaluated validation) batch under
            ``<run>/trajectories/``. The numbers of each evaluation are written there too (``test.json``,
            ``val-epoch=NNNN.json``: ade, fde, windows, k, epoch, step).

    Attributes:
        last: the latest ``{"ade": float, "fde": float}`` per split name (``"val"``, ``"test"``).

    Logs:
        ``val/ade``, ``val/fde``, ``test/ade``, ``test/fde``.

    Raises:
        ValueError: ``k < 1`` or ``every_n_epochs < 0``.
        TypeError: at setup, for a model without ``best_of_k_errors`` and ``windows_from_batch``.
    """

    def __init__(self, k: int | None = None, every_n_epochs: int = 1, on_test: bool = True, plot: bool = True):
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1 or None, got {k}")
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        self.k, self.every_n_epochs, self.on_test, self.plot = k, every_n_epochs, on_test, plot
        self.last: dict[str, dict[str, float]] = {}
        self._active = False
        self._sums: Tensor | None = None
        self._plotted = False
        self._stems: set[str] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not all(callable(getattr(pl_module, f, None)) for f in ("best_of_k_errors", "windows_from_batch")):
            raise TypeError(f"TrajectoryMetrics needs a model with best_of_k_errors(windows, k, mask) and "
                            f"windows_from_batch(batch), e.g. TrajectoryLEBM; {type(pl_module).__name__} lacks them.")

    def _start(self, trainer, active: bool) -> None:
        self._active, self._sums, self._plotted = active, None, False
        self._dir = _run_dir(trainer) / "trajectories" if active else None  # collective: every rank calls it

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, not trainer.sanity_checking and self.every_n_epochs > 0
                    and (trainer.current_epoch + 1) % self.every_n_epochs == 0)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, self.on_test)

    def _update(self, trainer, pl_module, batch, dataloader_idx: int, split: str) -> None:
        if not self._active or dataloader_idx != 0:
            return
        windows, mask = pl_module.windows_from_batch(batch)
        ade, fde = pl_module.best_of_k_errors(windows, self.k, mask)
        sums = torch.stack([ade.sum(), fde.sum(), torch.tensor(float(len(ade)), device=ade.device, dtype=ade.dtype)])
        self._sums = sums.double() if self._sums is None else self._sums + sums.double()
        if self.plot and not self._plotted and trainer.is_global_zero:
            self._plotted = True
            stem = "test" if split == "test" else _epoch_stem(trainer, self._stems)
            plot_trajectories(pl_module, windows[:16], self._dir / f"{stem}.png",
                              mask=None if mask is None else mask[:16, :16])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, pl_module, batch, dataloader_idx, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, pl_module, batch, dataloader_idx, "test")

    def _finish(self, trainer, pl_module, split: str) -> None:
        if not self._active:
            return
        self._active = False
        sums = self._sums if self._sums is not None else torch.zeros(3, dtype=torch.float64)
        sums = trainer.strategy.reduce(sums.to(pl_module.device), reduce_op="sum")
        n = float(sums[2])
        ade, fde = (float(sums[0]) / n, float(sums[1]) / n) if n > 0 else (math.nan, math.nan)
        self.last[split] = {"ade": ade, "fde": fde}
        if trainer.is_global_zero:  # the numbers beside the picture, for scripts
            record = {"split": split, "ade": ade, "fde": fde, "windows": int(n), "k": self.k or
                      pl_module.hparams.get("n_values"), "epoch": trainer.current_epoch, "step": trainer.global_step}
            self._dir.mkdir(parents=True, exist_ok=True)
            stem = "test" if split == "test" else f"val-epoch={trainer.current_epoch:04d}"
            (self._dir / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
        pl_module.log(f"{split}/ade", ade)
        pl_module.log(f"{split}/fde", fde)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")


@torch.no_grad()
def plot_trajectories(model, windows: Tensor, path, n_samples: int = 20, mask: Tensor | None = None,
                      cols: int = 4) -> Path:
    """Save a PNG of predicted futures over observed pasts, one panel per window (at most 16): the past (black), the
    true future (green) and ``n_samples`` predicted futures (translucent red), in the data's units.

    Args:
        model: with ``predict(past, n_samples, mask)`` and hyperparameters ``past_length``, ``future_length``.
        windows: ``(B, past_length + future_length, 2)`` positions, or pasts ``(B, past_length, 2)`` alone.
        path: the PNG file (its folder is created).
        n_samples: predicted futures per window.
        mask: optional ``(B, B)`` social mask of the windows.
        cols: panels per row.

    Returns:
        the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = model.hparams.past_length
    windows = windows[:16].detach()
    past = windows[:, :p]
    was_training = model.training
    model.eval()
    try:
        pred = model.predict(past, n_samples, mask).float().cpu()  # (S, B, F, 2)
    finally:
        model.train(was_training)
    windows = windows.float().cpu()
    b = windows.shape[0]
    rows = math.ceil(b / cols)
    fig, axes = plt.subplots(rows, min(cols, b), figsize=(3 * min(cols, b), 3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= b:
            ax.axis("off")
            continue
        for s in range(pred.shape[0]):
            track = torch.cat([windows[i, p - 1:p], pred[s, i]])
            ax.plot(track[:, 0], track[:, 1], color="tab:red", alpha=0.25, lw=1)
        ax.plot(windows[i, :p, 0], windows[i, :p, 1], "k.-", lw=1.5, label="observed")
        if windows.shape[1] > p:
            ax.plot(windows[i, p - 1:, 0], windows[i, p - 1:, 1], "g.-", lw=1.5, label="true future")
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"{type(model).__name__}: {pred.shape[0]} predicted futures (red) per pedestrian", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def demo_pasts(past_length: int = 8, dt: float = 0.4) -> Tensor:
    """Eight made-up observed pasts ``(8, past_length, 2)`` in metres, ending at the origin, at ``dt`` seconds per
    step (2.5 fps): walks at 1.3 m/s east, north-east, north and west, a slow walk (0.5 m/s), a left and a right turn,
    and a pedestrian standing still. What ``lebm-zoo sample`` draws predictions for when it is given no data."""
    t = torch.arange(past_length - 1, -1, -1, dtype=torch.float64) * dt  # seconds before the last observation
    pasts = []
    for speed, angle in ((1.3, 0.0), (1.3, 45.0), (1.3, 90.0), (1.3, 180.0), (0.5, 0.0)):
        a = torch.deg2rad(torch.tensor(angle, dtype=torch.float64))
        pasts.append(-speed * t[:, None] * torch.stack([a.cos(), a.sin()]))
    for turn in (1.0, -1.0):  # a walk whose heading turns by 60 degrees over the observation
        heading = torch.deg2rad(turn * torch.linspace(-60, 0, past_length, dtype=torch.float64))
        v = 1.3 * dt * torch.stack([heading.cos(), heading.sin()], 1)
        pos = torch.cat([torch.zeros(1, 2, dtype=torch.float64), v[1:].cumsum(0)])
        pasts.append(pos - pos[-1])
    pasts.append(torch.zeros(past_length, 2, dtype=torch.float64))
    return torch.stack(pasts).float()
