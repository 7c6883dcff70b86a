"""Semi-supervised data: :class:`SemiSupervisedDataModule`, a labelled datamodule with only a few labels kept."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torchdata.stateful_dataloader.sampler import RandomSampler

from datamodules.loaders import ShuffleStateMixin, make_loader

__all__ = ["SemiSupervisedDataModule", "dataset_labels"]


def dataset_labels(ds: Dataset) -> torch.Tensor | None:
    """The labels ``(len(ds),)`` int64 of a dataset of ``(x, y)`` items, without reading its images where it can:
    ``Subset`` (of any of these), ``TensorDataset`` (its second tensor), torchvision datasets (``targets``, or
    ``labels`` as SVHN's); otherwise the ``y`` of every item, read one by one. None when the items carry no labels.

    Raises:
        ValueError: for labels that are not integers (e.g. floats or vectors).
    """
    if isinstance(ds, Subset):
        base = dataset_labels(ds.dataset)
        return None if base is None else base[torch.as_tensor(ds.indices, dtype=torch.long)]
    if isinstance(ds, TensorDataset):
        return _as_labels(ds.tensors[1]) if len(ds.tensors) >= 2 else None
    for attr in ("targets", "labels"):
        v = getattr(ds, attr, None)
        if v is not None and not callable(v):
            t = torch.as_tensor(np.asarray(v))
            if t.ndim == 1 and len(t) == len(ds):
                return _as_labels(t)
    if len(ds) == 0:
        return None
    first = ds[0]
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        return None
    return _as_labels(torch.as_tensor([int(ds[i][1]) for i in range(len(ds))]))


def _as_labels(t: torch.Tensor) -> torch.Tensor:
    if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"the training labels must be a 1-D integer tensor of class indices, got dtype {t.dtype} and "
                         f"shape {tuple(t.shape)}")
    return t.long()


class SemiSupervisedDataModule(ShuffleStateMixin, pl.LightningDataModule):
    """A labelled datamodule of ours (``MNISTDataModule``, ``SVHNDataModule``, ``CIFAR10DataModule``,
    ``EightGaussiansDataModule(labels=True)``, ...) with only ``labels_per_class`` labels per class kept, for
    semi-supervised training (e.g. :class:`~lebm_zoo.SymbolVectorLEBM`).

    After the inner datamodule's ``setup``, a class-balanced labelled subset of exactly ``labels_per_class`` items per
    class is drawn from the inner TRAINING split only (``train_set``; its validation hold-out and test split are never
    used), with a NumPy generator seeded with ``seed``.

    Batches:

    * training: ``(x_unlabelled, x_labelled, y_labelled)``: ``x_unlabelled`` ``(B, ...)`` from the inner training loader
      (the whole training split, labelled items included, its labels dropped; B the inner batch size),
      ``x_labelled`` ``(B_l, ...)`` and ``y_labelled`` ``(B_l,)`` int64 from the labelled subset. The labelled loader
      is reshuffled at every pass and cycled (Lightning's ``max_size_cycle``): labelled items repeat across the
      unlabelled epoch. If ``B_l`` exceeds the subset's size, each labelled batch is drawn with replacement.
      ``train_dataloader()`` returns the two loaders ``[unlabelled, labelled]`` (resumable ``StatefulDataLoader`` s);
      Lightning combines them into ``[(x_u, y_u), (x_l, y_l)]`` and :meth:`on_before_batch_transfer` turns that into the
      triple above.
    * validation, test, predict: the inner datamodule's loaders, ``(x, y)`` batches with every label.

    Args:
        datamodule: the inner datamodule; its training items must be ``(x, y)`` with integer labels.
        labels_per_class: labelled items per class (>= 1); every class of the training split keeps exactly this many.
        labelled_batch_size: ``B_l`` (default: the inner datamodule's ``batch_size``).
        seed: seed of the labelled subset's choice.
        data_dir: if given, the inner datamodule's ``data_dir`` (so ``--data.data_dir`` works as for every recipe;
            ``--data.datamodule.data_dir`` too).

    Attributes:
        datamodule: the inner datamodule.
        labelled_indices: ``(num_labelled,)`` int64, sorted positions in the inner ``train_set`` of the labelled items
            (None before ``setup``).
        num_labelled: ``labels_per_class * len(classes)``.
        classes: the sorted class values of the training split (a list of ints).
        labelled_set: the labelled subset (a ``Subset`` of the inner ``train_set``).
        channels, img_size, dim, train_set, val_set, test_set: the inner datamodule's (AttributeError where it has
            none).

    Raises:
        ValueError: for ``labels_per_class`` < 1, a bad ``labelled_batch_size``, or a ``data_dir`` for an inner
            datamodule that reads none; in ``setup``: a training split
            without labels, with fewer than two classes, negative labels, or a class with fewer than
            ``labels_per_class`` items (all such classes named).
        TypeError: for an inner object that is not a LightningDataModule.
    """

    def __init__(self, datamodule: pl.LightningDataModule, labels_per_class: int,
                 labelled_batch_size: int | None = None, seed: int = 0, data_dir: str | None = None):
        super().__init__()
        if not isinstance(datamodule, pl.LightningDataModule):
            raise TypeError(f"datamodule must be a LightningDataModule, got {type(datamodule).__name__}")
        if data_dir is not None:  # --data.data_dir, as for every other recipe
            if not hasattr(datamodule, "data_dir"):
                raise ValueError(f"data_dir: the inner {type(datamodule).__name__} reads no data folder")
            datamodule.data_dir = Path(data_dir).expanduser()
        if isinstance(labels_per_class, bool) or not isinstance(labels_per_class, int) or labels_per_class < 1:
            raise ValueError(f"labels_per_class must be an integer >= 1, got {labels_per_class!r}")
        if labelled_batch_size is not None and (isinstance(labelled_batch_size, bool) or
                                                not isinstance(labelled_batch_size, int) or labelled_batch_size < 1):
            raise ValueError(f"labelled_batch_size must be an integer >= 1 or None, got {labelled_batch_size!r}")
        self.datamodule = datamodule
        # the inner datamodule is not a plain value: checkpoints (loaded weights-only) keep only these
        self.save_hyperparameters(ignore=["datamodule"])
        self.labelled_indices: torch.Tensor | None = None
        self.labelled_set: Subset | None = None
        self.classes: list[int] | None = None

    # ------------------------------------------------------------------------------------- the inner datamodule's
    @property
    def channels(self):
        return self.datamodule.channels

    @property
    def img_size(self):
        return self.datamodule.img_size

    @property
    def dim(self):
        return self.datamodule.dim

    @property
    def train_set(self):
        return self.datamodule.train_set

    @property
    def val_set(self):
        return self.datamodule.val_set

    @property
    def test_set(self):
        return self.datamodule.test_set

    @property
    def num_labelled(self) -> int:
        return 0 if self.labelled_indices is None else len(self.labelled_indices)

    def _inner_option(self, name: str, default=None):
        value = getattr(self.datamodule, name, None)
        if value is None:
            value = getattr(self.datamodule, "hparams", {}).get(name, None)
        return default if value is None else value

    # ------------------------------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """The inner ``setup``, then (once) the labelled subset of its training split.

        Raises:
            ValueError: see the class docstring.
        """
        if self.trainer is not None:
            self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        if self.labelled_indices is None:
            self._choose_labelled()

    def _choose_labelled(self) -> None:
        inner = type(self.datamodule).__name__
        train = getattr(self.datamodule, "train_set", None)
        if train is None:
            raise ValueError(f"{inner} has no train_set after setup: SemiSupervisedDataModule needs a datamodule with "
                             "a labelled training split")
        labels = dataset_labels(train)
        if labels is None:
            hint = " (pass labels: true to EightGaussiansDataModule)" if inner == "EightGaussiansDataModule" else ""
            raise ValueError(f"{inner}'s training split has no labels (its items are not (x, y) pairs): "
                             f"SemiSupervisedDataModule needs labelled data{hint}")
        y = labels.numpy()
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"{inner}'s training split has {len(classes)} class "
                             f"({', '.join(map(str, classes.tolist()))}): semi-supervised classification needs >= 2")
        if classes[0] < 0:
            raise ValueError(f"{inner}'s training labels must be class indices >= 0, got {int(classes[0])}")
        k = self.hparams.labels_per_class
        counts = {int(c): int((y == c).sum()) for c in classes}
        short = {c: n for c, n in counts.items() if n < k}
        if short:
            raise ValueError(f"labels_per_class={k} but {inner}'s training split has fewer images in class(es) "
                             + ", ".join(f"{c} ({n})" for c, n in short.items())
                             + f"; lower labels_per_class to at most {min(short.values())}")
        rng = np.random.default_rng(self.hparams.seed)
        chosen = [rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c in classes]
        self.labelled_indices = torch.from_numpy(np.sort(np.concatenate(chosen))).long()
        self.labelled_set = Subset(train, self.labelled_indices.tolist())
        self.classes = [int(c) for c in classes]

    def teardown(self, stage: str | None = None) -> None:
        self.datamodule.teardown(stage)

    def _labelled_loader(self):
        b = self.hparams.labelled_batch_size or self._inner_option("batch_size")
        if b is None:
            raise ValueError(f"{type(self.datamodule).__name__} has no batch_size: pass labelled_batch_size")
        workers = int(self._inner_option("num_workers", 0))
        common = dict(batch_size=int(b), num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available())
        if b > self.num_labelled:  # a batch larger than the subset: draw each batch with replacement
            sampler = RandomSampler(self.labelled_set, replacement=True, num_samples=int(b))
            return make_loader(self.labelled_set, sampler=sampler, **common)
        return make_loader(self.labelled_set, shuffle=True, drop_last=True, **common)

    def train_dataloader(self):
        """``[unlabelled loader, labelled loader]`` (see the class docstring for the batches they make)."""
        if self.labelled_set is None:
            raise RuntimeError("SemiSupervisedDataModule: call setup() before asking for a dataloader")
        return self.track_train_loaders([self.datamodule.train_dataloader(), self._labelled_loader()])

    def val_dataloader(self):
        return self.datamodule.val_dataloader()

    def test_dataloader(self):
        return self.datamodule.test_dataloader()

    def predict_dataloader(self):
        return self.datamodule.predict_dataloader()

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """A combined training batch ``[(x_u, y_u), (x_l, y_l)]`` -> ``(x_u, x_l, y_l)`` (the unlabelled part's labels
        dropped); any other batch (validation, test) unchanged."""
        if (isinstance(batch, (list, tuple)) and len(batch) == 2
                and all(isinstance(b, (list, tuple)) and len(b) >= 1 for b in batch) and len(batch[1]) >= 2):
            unlabelled, labelled = batch
            return unlabelled[0], labelled[0], labelled[1]
        return batch


