"""Anomaly detection metrics, AUPRC and AUROC, of a model's anomaly score (Pang et al. 2020, anomaly detection)."""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryPrecisionRecallCurve

from lebm_zoo.samplers import as_normal_tensor
from lebm_zoo.utils import images_from_batch

__all__ = ["AnomalyDetectionCallback", "anomaly_auprc", "anomaly_auroc"]


class _RawScores:
    """Mixin for torchmetrics' exact binary curve metrics (``thresholds=None``): store the scores as given.

    Their own ``update`` passes a batch through a sigmoid when any of its scores is outside [0, 1], which breaks the
    ranking across batches (Lightning-AI/torchmetrics#2329) and ties large scores (sigmoid(20) == 1 in float32).
    Anomaly scores are unbounded; ``compute`` ranks the stored scores without any transform.
    """

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.preds.append(preds.flatten())
        self.target.append(target.flatten())


class _AP(_RawScores, BinaryAveragePrecision):
    """``BinaryAveragePrecision`` of raw scores (scikit-learn's ``average_precision_score``)."""


class _AUPRC(_RawScores, BinaryPrecisionRecallCurve):
    """The trapezoidal area under the precision-recall curve of raw scores: scikit-learn's
    ``auc(recall, precision)`` of ``precision_recall_curve(labels, scores)``, what the protocol's code computes
    (houssamzenati/Efficient-GAN-Anomaly-Detection ``utils/evaluations.py`` lines 19-20; the same in
    ritheshkumar95/energy_based_generative_models ``scripts/train/anomaly_mnist.py``)."""

    def compute(self) -> Tensor:
        precision, recall, _ = super().compute()  # recall falls from 1 to 0, as scikit-learn's
        return torch.trapezoid(precision, recall).abs()


class _AUROC(_RawScores, BinaryAUROC):
    """``BinaryAUROC`` of raw scores."""


def _of_scores(metric, scores: Tensor, labels: Tensor) -> float:
    metric.update(scores.detach().double().cpu(), labels.detach().long().cpu())
    return float(metric.compute())


def anomaly_auprc(scores: Tensor, labels: Tensor) -> float:
    """The protocol's AUPRC of anomaly ``scores``: the trapezoidal area under the exact precision-recall curve, as
    :class:`AnomalyDetectionCallback` logs it (``test/auprc``).

    Args:
        scores: ``(N,)`` real scores, higher = more anomalous (any range; ranked as they are, no sigmoid).
        labels: ``(N,)`` 1 = anomaly (the positive class), 0 = normal; both classes present.

    Returns:
        The AUPRC in [0, 1].
    """
    return _of_scores(_AUPRC(), scores, labels)


def anomaly_auroc(scores: Tensor, labels: Tensor) -> float:
    """The AUROC in [0, 1] of anomaly ``scores`` ``(N,)`` (higher = more anomalous) against ``labels`` ``(N,)`` (1 =
    anomaly), as :class:`AnomalyDetectionCallback` logs it (``test/auroc``)."""
    return _of_scores(_AUROC(), scores, labels)


class AnomalyDetectionCallback(pl.Callback):
    """Area under the precision-recall curve (AUPRC) and under the ROC curve (AUROC) of ``pl_module.anomaly_score``.

    Every image of the evaluated split is scored with ``pl_module.anomaly_score(x)`` (``x`` ``(B, C, H, W)`` in
    [-1, 1] -> ``(B,)`` real scores, higher = more anomalous); its label is the batch's ``y`` (1 = anomaly, the
    positive class; 0 = normal), e.g. the batches of :class:`~datamodules.MNISTAnomalyDataModule`. AUPRC is the
    protocol's: the trapezoidal area under the exact precision-recall curve (scikit-learn's ``auc(recall,
    precision)`` of ``precision_recall_curve``, as the code of Zenati et al. 2018 and Kumar et al. 2019 computes it;
    torchmetrics ``BinaryPrecisionRecallCurve``, no threshold binning). The step-wise average precision
    (scikit-learn's ``average_precision_score``, torchmetrics ``BinaryAveragePrecision``) is logged beside it as
    ``ap``; the two differ by about 1e-3 on MNIST splits. AUROC is ``BinaryAUROC``. All are in [0, 1] and computed on
    the raw scores (without the sigmoid torchmetrics applies batch by batch to scores outside [0, 1]). The AUPRC of a
    random score is about the fraction of anomalies in the split; the AUROC of a random score is 0.5.

    Scores are collected in ``on_test_batch_end`` (and ``on_validation_batch_end``; first dataloader only, never
    during the sanity check) into the metric objects on every rank, and computed at epoch end on every rank
    (torchmetrics gathers the scores of all ranks), then logged with ``sync_dist=True``. Under DDP, Lightning's
    distributed sampler may repeat a few images to give every rank the same number of batches.

    Validation is evaluated only at epochs where ``every_n_epochs`` says so, and only if the validation labels hold
    both classes (a validation split of normal images only, as MNISTAnomalyDataModule's, is skipped with one warning).
    The test split must hold both classes, otherwise the metrics are undefined: a warning is issued and nothing is
    logged.

    Args:
        every_n_epochs: evaluate at the end of validation epochs where ``(epoch + 1) % every_n_epochs == 0`` (0:
            never).
        on_test: evaluate at test.
        max_images: images scored per epoch, the first ones in loader order (under DDP ``ceil(max_images /
            world_size)`` per rank); None: the whole split. MNISTAnomalyDataModule's test split lists its normal
            images first, so a cap below their number scores no anomaly there.

    Attributes:
        last_auprc, last_ap, last_auroc: the latest values as floats (NaN before the first evaluation).

    Logs:
        ``test/auprc``, ``test/ap``, ``test/auroc`` (and ``val/...``); higher is better.

    Raises:
        ValueError: for ``every_n_epochs < 0`` or ``max_images < 1``; for labels other than 0 and 1, or scores of a
            shape other than ``(B,)`` or not finite.
        TypeError: at setup, if the model has no ``anomaly_score`` method.
    """

    def __init__(self, every_n_epochs: int = 0, on_test: bool = True, max_images: int | None = None):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
        self.every_n_epochs = every_n_epochs
        self.on_test = on_test
        self.max_images = max_images
        self.auprc = _AUPRC()
        self.ap = _AP()
        self.auroc = _AUROC()
        self.last_auprc = math.nan
        self.last_ap = math.nan
        self.last_auroc = math.nan
        self._active = False
        self._seen = 0
        self._class_counts = torch.zeros(2, dtype=torch.long)  # normals, anomalies scored on this rank
        self._warned_one_class = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "anomaly_score", None)):
            raise TypeError(f"AnomalyDetectionCallback needs a model with an anomaly_score(x) method (images (B, C, H, "
                            f"W) -> (B,) scores, higher = more anomalous); {type(pl_module).__name__} has none.")

    def _start(self, pl_module: pl.LightningModule, active: bool) -> None:
        self._active = active
        self._seen = 0
        self._class_counts = torch.zeros(2, dtype=torch.long, device=pl_module.device)
        with torch.inference_mode(False):
            self.auprc = self.auprc.to(pl_module.device)
            self.ap = self.ap.to(pl_module.device)
            self.auroc = self.auroc.to(pl_module.device)
            for metric in (self.auprc, self.ap, self.auroc):
                metric.reset()

    def _val_due(self, trainer: pl.Trainer) -> bool:
        return (not trainer.sanity_checking and self.every_n_epochs > 0
                and (trainer.current_epoch + 1) % self.every_n_epochs == 0)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module, self._val_due(trainer))

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module, self.on_test)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, dataloader_idx: int) -> None:
        if not self._active or dataloader_idx != 0:
            return
        cap = None if self.max_images is None else math.ceil(self.max_images / trainer.world_size)
        if cap is not None and self._seen >= cap:
            return
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[1], torch.Tensor):
            raise ValueError("AnomalyDetectionCallback needs (x, y) batches with y = 1 for an anomaly, 0 for a normal "
                             f"image; got a batch of type {type(batch).__name__} without labels")
        x, y = images_from_batch(batch), batch[1]
        if cap is not None:
            x, y = x[: cap - self._seen], y[: cap - self._seen]
        x, y = x.to(pl_module.device), y.to(pl_module.device).reshape(-1)
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(f"AnomalyDetectionCallback needs labels 0 (normal) and 1 (anomaly), got values "
                             f"{sorted(set(y.tolist()))}")
        y = y.long()
        scores = pl_module.anomaly_score(x)
        if scores.shape != (x.shape[0],):
            raise ValueError(f"pl_module.anomaly_score returned shape {tuple(scores.shape)} for {x.shape[0]} images; "
                             f"expected ({x.shape[0]},)")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("pl_module.anomaly_score returned non-finite scores (NaN or inf): AUPRC and AUROC need "
                             "finite ones; check the model's weights and sampler settings")
        with torch.inference_mode(False), torch.no_grad():
            scores, y = as_normal_tensor(scores.detach().float()), as_normal_tensor(y)
            for metric in (self.auprc, self.ap, self.auroc):
                metric.update(scores, y)
            self._class_counts = self._class_counts + torch.bincount(y, minlength=2)
        self._seen += x.shape[0]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, pl_module, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, pl_module, batch, dataloader_idx)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        if not self._active:
            return
        self._active = False
        counts = trainer.strategy.reduce(self._class_counts, reduce_op="sum")  # every rank: a collective under DDP
        if not bool((counts > 0).all()):
            if split == "test" or not self._warned_one_class:
                rank_zero_warn(f"AnomalyDetectionCallback: the {split} split has {int(counts[0])} normal and "
                               f"{int(counts[1])} anomalous images scored; AUPRC and AUROC need both, so "
                               f"{split}/auprc and {split}/auroc are not logged.")
            self._warned_one_class = self._warned_one_class or split == "val"
            return
        with torch.inference_mode(False), torch.no_grad():
            # every rank: gathers all ranks' scores
            auprc, ap, auroc = self.auprc.compute(), self.ap.compute(), self.auroc.compute()
        self.last_auprc, self.last_ap, self.last_auroc = float(auprc), float(ap), float(auroc)
        pl_module.log(f"{split}/auprc", auprc, sync_dist=True)
        pl_module.log(f"{split}/ap", ap, sync_dist=True)
        pl_module.log(f"{split}/auroc", auroc, sync_dist=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")
