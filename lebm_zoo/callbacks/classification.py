"""Classification metrics of models with a ``classify(x)`` method (:class:`~lebm_zoo.SymbolVectorLEBM`): accuracy on
labelled validation and test splits, and a plot of a 2-D model's class regions."""
from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lebm_zoo.callbacks._common import _epoch_stem, _run_dir
from lebm_zoo.samplers import as_normal_tensor
from lebm_zoo.utils import images_from_batch

__all__ = ["ClassRegionPlot2D", "ClassificationAccuracy", "plot_class_regions"]


def _labelled_batch(batch, who: str) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[1], Tensor):
        raise ValueError(f"{who} needs (x, y) batches with integer class labels y; got a batch of type "
                         f"{type(batch).__name__} without labels")
    return images_from_batch(batch), batch[1]


class ClassificationAccuracy(pl.Callback):
    """Accuracy of ``pl_module.classify(x)`` on labelled validation and test batches (the semi-supervised protocol's
    test accuracy).

    ``pl_module.classify(x)`` maps the batch's ``x`` to ``(B, C)`` class probabilities (or scores: the arg max is the
    prediction); the target is the batch's ``y`` ``(B,)``, integers in ``[0, C)``, C the model's ``n_classes``
    hyperparameter (else the width of the first output). The metric is torchmetrics' ``MulticlassAccuracy`` with
    ``average="micro"``: the fraction of items whose arg max is their label, in [0, 1] (chance: about 1 / C).
    Predictions are collected in ``on_validation_batch_end`` / ``on_test_batch_end`` (first dataloader only; never
    during the sanity check) on every rank and computed at epoch end over all ranks (torchmetrics syncs), then logged
    with ``sync_dist=True``. The model's classifier is random where its chains are (posterior Langevin): seed the
    run to repeat a value.

    Args:
        every_n_epochs: evaluate at the end of validation epochs where ``(epoch + 1) % every_n_epochs == 0`` (0:
            never).
        on_test: evaluate at test.
        max_images: items classified per validation epoch, the first ones in loader order (under DDP
            ``ceil(max_images / world_size)`` per rank); None: the whole split.
        max_test_images: the same at test (default None: the whole test split, the protocol).

    Attributes:
        last_accuracy: the latest value as a float (NaN before the first evaluation).

    Logs:
        ``val/accuracy``, ``test/accuracy``; higher is better.

    Raises:
        ValueError: for ``every_n_epochs < 0`` or a cap < 1; for batches without labels, or ``classify`` outputs of
            another shape than ``(B, C)``.
        TypeError: at setup, if the model has no ``classify`` method.
    """

    def __init__(self, every_n_epochs: int = 1, on_test: bool = True, max_images: int | None = None,
                 max_test_images: int | None = None):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        for name, cap in (("max_images", max_images), ("max_test_images", max_test_images)):
            if cap is not None and cap < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {cap}")
        self.every_n_epochs = every_n_epochs
        self.on_test = on_test
        self.max_images = max_images
        self.max_test_images = max_test_images
        self.accuracy: MulticlassAccuracy | None = None
        self.num_classes: int | None = None
        self.last_accuracy = math.nan
        self._active = False
        self._cap: int | None = None
        self._seen = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "classify", None)):
            raise TypeError(f"ClassificationAccuracy needs a model with a classify(x) method (data -> (B, C) class "
                            f"probabilities), e.g. SymbolVectorLEBM; {type(pl_module).__name__} has none.")
        hparams = getattr(pl_module, "hparams", {})
        n = hparams.get("n_classes") if hasattr(hparams, "get") else None
        if n is not None:
            self._build(int(n))

    def _build(self, n: int) -> None:
        self.num_classes = n
        self.accuracy = MulticlassAccuracy(num_classes=n, average="micro")

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, active: bool, cap: int | None) -> None:
        self._active = active
        self._seen = 0
        self._cap = None if cap is None else math.ceil(cap / trainer.world_size)
        if self.accuracy is not None:
            with torch.inference_mode(False):
                self.accuracy = self.accuracy.to(pl_module.device)
                self.accuracy.reset()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = (not trainer.sanity_checking and self.every_n_epochs > 0
               and (trainer.current_epoch + 1) % self.every_n_epochs == 0)
        self._start(trainer, pl_module, due, self.max_images)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, self.on_test, self.max_test_images)

    def _update(self, pl_module: pl.LightningModule, batch, dataloader_idx: int) -> None:
        if not self._active or dataloader_idx != 0 or (self._cap is not None and self._seen >= self._cap):
            return
        x, y = _labelled_batch(batch, "ClassificationAccuracy")
        if self._cap is not None:
            x, y = x[: self._cap - self._seen], y[: self._cap - self._seen]
        x, y = x.to(pl_module.device), y.to(pl_module.device).reshape(-1)
        probs = pl_module.classify(x)
        if probs.ndim != 2 or probs.shape[0] != x.shape[0]:
            raise ValueError(f"pl_module.classify returned shape {tuple(probs.shape)} for {x.shape[0]} items; expected "
                             f"({x.shape[0]}, n_classes)")
        if self.accuracy is None:
            self._build(probs.shape[1])
            with torch.inference_mode(False):
                self.accuracy = self.accuracy.to(pl_module.device)
        with torch.inference_mode(False), torch.no_grad():
            self.accuracy.update(as_normal_tensor(probs.detach().float()), as_normal_tensor(y.long()))
        self._seen += x.shape[0]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(pl_module, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(pl_module, batch, dataloader_idx)

    def _finish(self, pl_module: pl.LightningModule, split: str) -> None:
        if not self._active or self.accuracy is None:
            return
        self._active = False
        with torch.inference_mode(False), torch.no_grad():
            acc = self.accuracy.compute()  # every rank: gathers all ranks' counts
        self.last_accuracy = float(acc)
        pl_module.log(f"{split}/accuracy", acc, sync_dist=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(pl_module, "test")


@torch.no_grad()
def plot_class_regions(model, x: Tensor, path, y: Tensor | None = None, lim: float = 3.0, n: int = 200,
                       data_lim: float | None = None) -> Path:
    """Save a PNG of a 2-D classifier's view (e.g. :class:`~lebm_zoo.SymbolVectorLEBM` with ``dim=2``), two panels:

    * latent space: the class regions ``argmax_y F_y(z)`` (``model.logits``) on an ``n x n`` grid over
      ``[-lim, lim]^2`` of the first two latent coordinates (the others at 0 when ``nz > 2``), with the posterior
      latents of ``x`` (``model.infer_latent``) drawn on top, colored by ``y`` when given;
    * data space: the points ``x`` colored by the predicted class ``argmax model.classify(x)``.

    Args:
        model: with ``logits``, ``infer_latent``, ``classify`` and hyperparameters ``nz`` (>= 2), ``n_classes``.
        x: ``(N, 2)`` data points.
        path: the PNG file (its folder is created).
        y: optional ``(N,)`` true labels.
        lim: half-width of the latent square.
        n: grid points per axis.
        data_lim: half-width of the data square (default: fit to the points).

    Returns:
        the path.

    Raises:
        ValueError: for data that are not ``(N, 2)``, or a model with ``nz`` < 2.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"plot_class_regions draws 2-D data, got x of shape {tuple(x.shape)}")
    nz, c = int(model.hparams.nz), int(model.hparams.n_classes)
    if nz < 2:
        raise ValueError(f"plot_class_regions needs nz >= 2, the model has nz={nz}")
    was_training = model.training
    model.eval()
    try:
        xs = torch.linspace(-lim, lim, n, device=model.device)
        yy, xx = torch.meshgrid(xs, xs, indexing="ij")
        z = torch.zeros(n * n, nz, device=model.device)
        z[:, 0], z[:, 1] = xx.flatten(), yy.flatten()
        regions = torch.cat([model.logits(chunk).argmax(1) for chunk in z.split(10_000)]).view(n, n).cpu()
        x = x.to(model.device)
        z_post = model.infer_latent(x).cpu()
        pred = model.classify(x).argmax(1).cpu()
    finally:
        model.train(was_training)
    colors = plt.get_cmap("tab10" if c <= 10 else "tab20")(range(c))
    cmap, norm = ListedColormap(colors), BoundaryNorm(torch.arange(c + 1).sub(0.5).tolist(), c)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    axes[0].imshow(regions.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap=cmap, norm=norm, alpha=0.45,
                   interpolation="nearest")
    if y is None:
        axes[0].scatter(z_post[:, 0], z_post[:, 1], s=3, c="k")
    else:
        axes[0].scatter(z_post[:, 0], z_post[:, 1], s=3, c=y.cpu().numpy(), cmap=cmap, norm=norm, edgecolors="none")
    axes[0].set_xlim(-lim, lim)
    axes[0].set_ylim(-lim, lim)
    axes[0].set_title("latent space: argmax F(z), posterior z of the data" + (" (true class)" if y is not None else ""),
                      fontsize=9)
    xc = x.cpu()
    axes[1].scatter(xc[:, 0], xc[:, 1], s=3, c=pred.numpy(), cmap=cmap, norm=norm, edgecolors="none")
    if data_lim is not None:
        axes[1].set_xlim(-data_lim, data_lim)
        axes[1].set_ylim(-data_lim, data_lim)
    axes[1].set_title("data colored by predicted class", fontsize=9)
    for ax in axes:
        ax.set_aspect("equal")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


class ClassRegionPlot2D(pl.Callback):
    """After validation epochs (and at test), save :func:`plot_class_regions` of up to ``max_points`` validation (test)
    points: ``<run folder>/classes/epoch=NNNN.png`` (``test.png`` at test). For a 2-D
    :class:`~lebm_zoo.SymbolVectorLEBM` on ``EightGaussiansDataModule(labels=True)`` (or its semi-supervised wrapper).
    Rank zero plots; nothing during the sanity check.

    Args:
        every_n_epochs: plot after validation epochs where ``(epoch + 1) % every_n_epochs == 0`` (0: never during fit).
        on_test: plot at test.
        max_points: points plotted (the first ones in loader order).
        lim: half-width of the latent square.
        n: grid points per axis.

    Attributes:
        last_path: the latest PNG written (None before the first).
    """

    def __init__(self, every_n_epochs: int = 1, on_test: bool = True, max_points: int = 2000, lim: float = 3.0,
                 n: int = 200):
        if every_n_epochs < 0 or max_points < 1:
            raise ValueError(f"every_n_epochs must be >= 0 and max_points >= 1, got {every_n_epochs}, {max_points}")
        self.every_n_epochs, self.on_test, self.max_points = every_n_epochs, on_test, max_points
        self.lim, self.n = lim, n
        self.last_path: Path | None = None
        self._xs: list[Tensor] = []
        self._ys: list[Tensor] = []
        self._active = False
        self._stems: set[str] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not all(callable(getattr(pl_module, m, None)) for m in ("classify", "logits", "infer_latent")):
            raise TypeError(f"ClassRegionPlot2D needs a model with classify, logits and infer_latent (e.g. "
                            f"SymbolVectorLEBM); {type(pl_module).__name__} lacks one.")

    def _start(self, active: bool) -> None:
        self._active, self._xs, self._ys = active, [], []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(not trainer.sanity_checking and self.every_n_epochs > 0
                    and (trainer.current_epoch + 1) % self.every_n_epochs == 0)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(self.on_test)

    def _collect(self, batch, dataloader_idx: int) -> None:
        have = sum(len(t) for t in self._xs)
        if not self._active or dataloader_idx != 0 or have >= self.max_points:
            return
        x = images_from_batch(batch)[: self.max_points - have]
        self._xs.append(x.detach().cpu())
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
            self._ys.append(batch[1][: len(x)].detach().cpu())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(batch, dataloader_idx)

    def _plot(self, trainer, pl_module, stem: str) -> None:
        if not self._active or not self._xs:
            return
        self._active = False
        folder = _run_dir(trainer) / "classes"  # every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        x = as_normal_tensor(torch.cat(self._xs))
        y = as_normal_tensor(torch.cat(self._ys)) if len(self._ys) == len(self._xs) else None
        with torch.inference_mode(False):
            self.last_path = plot_class_regions(pl_module, x, folder / f"{stem}.png", y=y, lim=self.lim, n=self.n)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._active:
            self._plot(trainer, pl_module, _epoch_stem(trainer, self._stems))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._plot(trainer, pl_module, "test")
