"""Density plots of 2-D models: data, EBM density and flow density side by side."""
from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch

from lebm_zoo.callbacks._common import _run_dir

__all__ = ["DensityPlot2D", "grid_log_density"]


@torch.no_grad()
def grid_log_density(log_prob, lim: float = 3.0, n: int = 200, device=None) -> tuple[torch.Tensor, float]:
    """Evaluate a 2-D log-density on an ``n x n`` grid over ``[-lim, lim]^2``, normalised numerically on the grid.

    Args:
        log_prob: ``(B, 2) -> (B,)``.
        lim: half-width of the square.
        n: grid points per axis.

    Returns:
        ``(log_density (n, n), cell_area)``: row i is y = ys[i], column j is x = xs[j]; ``exp(log_density)`` sums to
        one over the grid when multiplied by ``cell_area``.
    """
    xs = torch.linspace(-lim, lim, n, device=device)
    yy, xx = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    lp = torch.cat([log_prob(chunk).float() for chunk in pts.split(10_000)]).view(n, n)
    area = (xs[1] - xs[0]).item() ** 2
    return lp - torch.logsumexp(lp.flatten(), 0) - math.log(area), area


class DensityPlot2D(pl.Callback):
    """After validation epochs and at the end of fit, save a PNG of three panels: a histogram of held-out data, the
    model's EBM density ``exp(log_prob(x, "ebm"))`` and its flow density ``exp(log_prob(x, "flow"))`` (both normalised
    on the plotted grid). For 2-D models with ``log_prob(x, model)``, e.g. :class:`~lebm_zoo.FlowContrastiveEBM` on
    :class:`~datamodules.EightGaussiansDataModule`. Files: ``<trainer.log_dir>/density/epoch=NNNN.png`` and
    ``final.png``.

    Args:
        lim: the plot shows ``[-lim, lim]^2``.
        n: grid points per axis.
        every_n_epochs: plot after validation epochs where ``(epoch + 1) % every_n_epochs == 0`` (0: only at the end).
    """

    def __init__(self, lim: float = 3.0, n: int = 200, every_n_epochs: int = 1):
        self.lim, self.n, self.every_n_epochs = lim, n, every_n_epochs
        self.last_path: Path | None = None

    def plot(self, trainer: pl.Trainer, pl_module, name: str) -> Path | None:
        folder = _run_dir(trainer) / "density"
        if not trainer.is_global_zero:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        was_training = pl_module.training
        pl_module.eval()
        panels = [("EBM exp(-f(x)) (normalised)", "ebm"), ("flow q(x)", "flow")]
        dens = [grid_log_density(lambda p, m=m: pl_module.log_prob(p, m), self.lim, self.n, pl_module.device)[0]
                .exp().cpu() for _, m in panels]
        pl_module.train(was_training)
        dm = trainer.datamodule
        data = dm.val_set.tensors[0] if dm is not None and hasattr(dm, "val_set") else None
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        ext = (-self.lim, self.lim, -self.lim, self.lim)
        if data is not None:
            axes[0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=self.n // 2, range=[ext[:2], ext[2:]])
        axes[0].set_title("held-out data")
        for ax, (title, _), d in zip(axes[1:], panels, dens):
            ax.imshow(d.numpy(), origin="lower", extent=ext)
            ax.set_title(title)
        for ax in axes:
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"step {trainer.global_step}")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        self.last_path = path
        return path

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0 or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.plot(trainer, pl_module, f"epoch={trainer.current_epoch:04d}")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.plot(trainer, pl_module, "final")
