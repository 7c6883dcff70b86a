"""Helpers shared by several test files: small data the tests write themselves or read from ``tests/fixtures``, where
the real data copies are, and the tiny CPU trainer the training tests use.

* Data: :func:`fixed_batch` (digit-like blobs), :func:`uniform_images` (U[lo, hi] noise), :func:`tensor_loader`
  ((x, label) batches of a tensor), :func:`write_mnist` (MNIST's IDX files; ``conftest.py``'s ``fake_mnist_dir``
  fixture writes them into a fresh folder).
* Training: :func:`tiny_trainer` (a quiet CPU ``pl.Trainer``) and :func:`fit_steps` (fit it for some steps).
* The CLI: :func:`recipe_fit_args` (``lebm-zoo fit --recipe ...`` on fake MNIST for two steps).
* Models: :data:`TINY_MODELS`, the smallest instance of each class (tests of every family build them).

``DATA_ROOT`` is the folder holding the real data sets (``mnist/``, ``ptb/``, ``zinc/``, ``cifar10/``, ``celeba/``):
``$LEBM_ZOO_TEST_DATA`` if set, else ``../shared/data`` beside the checkout. Tests that read it carry
``@pytest.mark.realdata("relative/path", ...)``; ``conftest.py`` skips them, naming the missing path, when it is not
there (or fails them when ``LEBM_ZOO_REQUIRE_REAL_DATA=1``, as CI sets).
"""
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.text import Vocabulary
from lebm_zoo.models.registry import tiny_models

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


def uniform_images(n=32, c=1, s=28, seed=0, lo=-1.0, hi=1.0):
    """``n`` images of ``c`` x ``s`` x ``s`` pixels, uniform in [lo, hi], from their own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, c, s, s, generator=g)


def tensor_loader(x, batch_size=8, shuffle=False, labels=None) -> DataLoader:
    """A DataLoader of ``(x[i], labels[i])`` pairs; ``labels`` defaults to float zeros (the families ignore them)."""
    labels = torch.zeros(len(x)) if labels is None else labels
    return DataLoader(TensorDataset(x, labels), batch_size=batch_size, shuffle=shuffle)


def tiny_trainer(tmp_path=None, callbacks=(), *, progress_bar=False, **kw) -> pl.Trainer:
    """A quiet CPU ``pl.Trainer`` for tests: one CPU device, no logger, no checkpointing, no model summary, and no
    progress bar unless ``progress_bar``; ``default_root_dir`` is ``tmp_path`` when given (else Lightning's default,
    the working directory). ``kw`` goes to ``pl.Trainer`` and overrides any of these (``max_steps``, ``logger=...``,
    ``enable_checkpointing=True``, ``devices=2``, ...); ``callbacks`` is copied, not appended to."""
    cfg = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=progress_bar,
               enable_model_summary=False, callbacks=list(callbacks))
    if tmp_path is not None:
        cfg["default_root_dir"] = tmp_path
    cfg.update(kw)
    return pl.Trainer(**cfg)


def fit_steps(model, data, steps, tmp_path=None, *, batch_size=8, shuffle=True, callbacks=(), **kw) -> pl.Trainer:
    """Fit ``model`` for ``steps`` optimisation steps (``max_steps``) on a :func:`tiny_trainer` and return the trainer.

    ``data``: an image tensor (served by :func:`tensor_loader` in batches of ``batch_size``, shuffled unless
    ``shuffle=False``), or anything ``Trainer.fit`` takes second (a DataLoader, a LightningDataModule). ``kw`` goes to
    :func:`tiny_trainer`."""
    t = tiny_trainer(tmp_path, callbacks, max_steps=steps, **kw)
    if isinstance(data, torch.Tensor):
        data = tensor_loader(data, batch_size, shuffle=shuffle)
    t.fit(model, data)
    return t


def recipe_fit_args(recipe: str, data_dir: Path, root: Path, *overrides: str) -> list[str]:
    """``lebm-zoo fit`` arguments: ``recipe`` on the (fake) MNIST in ``data_dir`` (4 validation images, batches of 8,
    no workers), two steps with one validation batch, no progress bar, outputs below ``root``; then ``overrides``."""
    return ["fit", "--recipe", recipe, "--data.data_dir", str(data_dir), "--data.download", "false",
            "--data.val_size", "4", "--data.batch_size", "8", "--data.num_workers", "0",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), *overrides]


def fit_recipe_and_load(recipe: str, data_dir: Path, root: Path, capsys, *overrides: str):
    """Run ``lebm-zoo fit`` as :func:`recipe_fit_args` sets it up; assert it exits 0 (else show its stderr) and wrote
    a ``last.ckpt`` at step 2; return the model :func:`lebm_zoo.load_pretrained` rebuilds from it."""
    import lebm_zoo
    from lebm_zoo.cli import main

    code = main(recipe_fit_args(recipe, data_dir, root, *overrides))
    assert code == 0, capsys.readouterr().err
    (last,) = Path(root).rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2
    return lebm_zoo.load_pretrained(last)


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


TINY_VOCAB = Vocabulary(["a", "b", "c"]).to_list()  # 7 tokens with the specials
#: the smallest model of each family (and the 2-D FCE), by name, from each family's `register_family(tiny=...)`
TINY_MODELS = tiny_models()
