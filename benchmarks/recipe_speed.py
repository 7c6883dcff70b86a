#!/usr/bin/env python3
"""Seconds per training iteration and peak memory of the GPU-scale recipes, on random data of each recipe's shape.

For each recipe the model and datamodule are built from the shipped YAML (LightningCLI, no run), the datamodule's
images are replaced by random ones of its shape and labels (so that no data set is needed), and a fresh
``pl.Trainer`` trains ``--warmup`` + ``--iters`` iterations in each precision. Reported per recipe and precision:
the median seconds per iteration after the warm-up (CUDA synchronised at each iteration's start and end; with
``--sync-every N`` above 1, one synchronised span over the timed iterations instead, rows saying ``"timing":
"span"``), the peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: not measured), and the implied time of
the recipe's full schedule: its ``max_steps``, else ``max_epochs`` times the iterations of one epoch of the real
training split (``TRAIN_IMAGES`` below, less ``val_size``, in the recipe's batches), at the measured speed. That
counts training only (no validation, FID or checkpointing). A recipe that fails is recorded with its error and the
others go on.

``--real-data DIR`` measures instead the data pipeline of ``cifar10_prior`` on real images: the CIFAR-10 datamodule
on DIR (a folder, a ``.zip`` or a folder holding one ``.zip``), one pass of its training loader (images per second
with ``--workers`` loader processes; ``--max-images`` stops it early), then ``--warmup`` + ``--iters`` training
iterations on those images.

``--chain-steps N`` caps each of the model's Langevin chains at N steps (smoke runs, such as the GPU check's dry run:
the code paths, not the recipe's speed); rows record it as ``chain_steps``.

``--set KEY=VALUE`` (repeatable) overrides the model's ``KEY`` in every run (``--model.KEY VALUE``), and
``--sync-every N`` adds the ``SyncEvery(N)`` callback; each row names its ``variant`` (``"eager"``: the recipe as
shipped).

Each row is appended to ``--out`` (JSON lines) as soon as it is measured, so a run cut short keeps what it did.

    python benchmarks/recipe_speed.py --device cuda --out speed.jsonl               # every GPU-scale recipe
    python benchmarks/recipe_speed.py --device cuda --real-data data/cifar10 --precisions bf16-mixed
    python benchmarks/recipe_speed.py --device cpu --batch 2 --iters 1 --warmup 0 --precisions 32-true  # smoke
    python benchmarks/recipe_speed.py --device cuda --recipes svhn_prior --warmup 5 --set capture_step=true \
        --sync-every 50                                                  # a variant: the step as one CUDA graph
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from torch.utils.data import TensorDataset

from lebm_zoo.callbacks import SyncEvery
from lebm_zoo.cli import list_recipes, recipe_path

#: measured first: the chain-heavy recipes whose eager GPU speed issue 33 gives (a run cut short by its time limit, as
#: the GPU check's step can be, keeps them)
FIRST = ("svhn_prior", "cifar10_prior", "celeba64_prior", "cifar10_shortrun", "cifar10_hierarchical")
#: the GPU-scale recipes (issue 29): SVHN, CIFAR-10 and CelebA 64, in the order measured: :data:`FIRST`, the others,
#: then diffusion recovery likelihood's (the slowest: about 1.5 s an iteration on an H200)
GPU_RECIPES = tuple(sorted(
    (r for r in list_recipes() if r == "svhn_prior" or r.startswith(("cifar10_", "celeba64_"))),
    key=lambda r: (r not in FIRST, r.endswith("_drl"), FIRST.index(r) if r in FIRST else 0, r.startswith("celeba64"),
                   r)))
#: training images of each data set's train split (SVHN train, CIFAR-10 train, CelebA's official train split)
TRAIN_IMAGES = {"SVHNDataModule": 73_257, "CIFAR10DataModule": 50_000, "CelebA64DataModule": 162_770}


class IterationTimer(pl.Callback):
    """Seconds per training iteration, one of two ways.

    - Per batch (``span_from=None``): each batch's own time, the GPU synchronised at its start and end; ``seconds``
      holds them (the caller takes the median after the warm-up, robust to a slow batch).
    - One span (``span_from=W``, ``last=N``): from the start of batch W (0-based) to the end of batch N-1,
      synchronised only there; ``span`` is its mean seconds per batch. A step that does not synchronise (``SyncEvery``,
      ``capture_step``) lets the host queue the next step while the GPU runs this one; a synchronisation per batch
      would hide that gain.
    """

    def __init__(self, span_from: int | None = None, last: int | None = None):
        if span_from is not None and (last is None or last <= span_from):
            raise ValueError(f"IterationTimer: last ({last}) must be above span_from ({span_from})")
        self.seconds: list[float] = []
        self.span: float | None = None
        self.batches = 0
        self._t0 = 0.0
        self.span_from, self.last = span_from, last

    @staticmethod
    def _sync(module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.span_from is None or self.batches == self.span_from:
            self._sync(pl_module)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.span_from is None:
            self._sync(pl_module)
            self.seconds.append(time.perf_counter() - self._t0)
        elif self.batches == self.last:
            self._sync(pl_module)
            self.span = (time.perf_counter() - self._t0) / (self.last - self.span_from)


def build(recipe: str, model_args: dict[str, str] | None = None):
    """The recipe's model and datamodule (its YAML through LightningCLI, nothing run), with ``model_args`` given as
    ``--model.KEY VALUE`` overrides."""
    extra = [a for k, v in (model_args or {}).items() for a in (f"--model.{k}", v)]
    cli = LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, save_config_callback=None,
                       args=["--config", str(recipe_path(recipe)), "--trainer.logger", "false", *extra])
    return cli.model, cli.datamodule, cli.config


#: the models' chain-length arguments (``--chain-steps`` caps them)
CHAIN_LENGTHS = ("prior_steps", "posterior_steps", "n_steps", "descriptor_steps", "generator_steps", "mcmc_steps",
                 "e_l_steps")


def chain_caps(model, n: int) -> dict[str, str]:
    """The ``--model.KEY N`` overrides that cap each of ``model``'s chains longer than ``n`` steps (its
    :data:`CHAIN_LENGTHS` hyperparameters); empty when none is longer."""
    return {k: str(n) for k, v in model.hparams.items() if k in CHAIN_LENGTHS and isinstance(v, int) and v > n}


def _image_module(dm):
    """The datamodule that reads the images (the inner one of a semi-supervised wrapper)."""
    return getattr(dm, "datamodule", dm)


def use_random_images(dm, n: int, seed: int = 0) -> None:
    """Make the datamodule serve ``n`` random images of its shape (labels 0..9 in turn) for train and test."""
    inner = _image_module(dm)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, inner.channels, inner.img_size, inner.img_size, generator=g) * 2 - 1
    ds = TensorDataset(x, torch.arange(n) % 10)
    inner._present = lambda: True
    inner._load = lambda: (ds, ds)


def schedule_iterations(config, dm) -> int | None:
    """Training iterations of the recipe's full schedule (``max_steps``, else epochs x one epoch's iterations)."""
    t = config.trainer
    if t.max_steps and t.max_steps > 0:
        return int(t.max_steps)
    inner = _image_module(dm)
    n = TRAIN_IMAGES.get(type(inner).__name__)
    if n is None or not t.max_epochs or t.max_epochs < 0:
        return None
    val = getattr(inner, "val_size", 0)
    n -= val if isinstance(val, int) else round(val * n)
    return int(t.max_epochs) * math.ceil(n / inner.batch_size)


def measure(recipe: str, device: str, precision: str, iters: int, warmup: int, batch: int | None,
            real_data: str | None = None, workers: int = 0, max_images: int | None = None,
            model_args: dict[str, str] | None = None, sync_every: int = 1, chain_steps: int | None = None) -> dict:
    torch.manual_seed(0)
    model, dm, config = build(recipe, model_args)
    if chain_steps is not None:  # rebuilt with each longer chain capped, as --model.KEY N overrides
        caps = chain_caps(model, chain_steps)
        if caps:
            torch.manual_seed(0)
            model, dm, config = build(recipe, {**(model_args or {}), **caps})
    inner = _image_module(dm)
    semisup = dict(getattr(dm, "hparams", {})) if dm is not inner else {}  # SemiSupervisedDataModule's settings
    total = schedule_iterations(config, dm)  # at the recipe's own batch size
    if batch:
        inner.batch_size = batch
        if semisup.get("labelled_batch_size"):
            dm.hparams.labelled_batch_size = batch
    inner.num_workers = workers
    out = {"recipe": recipe, "precision": precision, "batch_size": inner.batch_size, "model": type(model).__name__,
           "variant": variant_label(model_args, sync_every)}
    if chain_steps is not None:
        out["chain_steps"] = chain_steps
    if real_data is None:
        labelled = 20 * semisup.get("labels_per_class", 0)  # twice the labelled set: every class keeps enough
        val = getattr(inner, "val_size", 0)
        use_random_images(dm, inner.batch_size * (iters + warmup + 1) + labelled + (val if isinstance(val, int) else 0))
    else:
        inner.data_dir = Path(real_data).expanduser()
        dm.prepare_data()
        dm.setup("fit")
        loader, n, t0 = dm.train_dataloader(), 0, time.perf_counter()
        for x, _ in loader:
            n += x.shape[0]
            if max_images and n >= max_images:
                break
        out["loader"] = {"images": n, "workers": workers, "images_per_s": n / (time.perf_counter() - t0)}
    # with SyncEvery (no synchronisation in most steps) one synchronised span over the timed iterations, else each
    # iteration synchronised and timed on its own
    timer = IterationTimer(warmup, warmup + iters) if sync_every > 1 else IterationTimer()
    out["timing"] = "span" if sync_every > 1 else "median of per-iteration times"
    out["cudnn_benchmark"] = config.trainer.benchmark
    if device == "cuda":
        gc.collect()  # an earlier run's trainer and model refer to each other: free their memory before the reset
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # the recipe's cudnn.benchmark (the fixed-shape image recipes set it, as the authors' scripts do), given to this
    # Trainer as the recipe gives it to its own (which build() also made, and which already set it)
    trainer = pl.Trainer(accelerator=device, devices=1, precision=precision, max_steps=warmup + iters, logger=False,
                         benchmark=config.trainer.benchmark, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[timer] + ([SyncEvery(sync_every)] if sync_every > 1 else []))
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    out["fit_seconds"] = time.perf_counter() - t0
    timed = timer.seconds[warmup:] or timer.seconds
    out["iterations"] = timer.batches
    out["s_per_iter"] = timer.span if sync_every > 1 else statistics.median(timed) if timed else None
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    out["schedule_iterations"] = total
    out["implied_schedule_hours"] = (total * out["s_per_iter"] / 3600 if total and out["s_per_iter"] and not batch
                                     else None)  # only at the recipe's own batch size
    return out


def variant_label(model_args: dict[str, str] | None, sync_every: int = 1) -> str:
    """``"eager"`` for the recipe as shipped, else its overrides, e.g. ``"capture_step=true, SyncEvery(50)"``."""
    parts = [f"{k}={v}" for k, v in (model_args or {}).items()] + ([f"SyncEvery({sync_every})"] if sync_every > 1
                                                                     else [])
    return ", ".join(parts) or "eager"


def _key_value(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--recipes", nargs="+", default=list(GPU_RECIPES), help="default: the GPU-scale recipes")
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    p.add_argument("--iters", type=int, default=10, help="timed iterations (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first iterations (cuDNN autotuning, allocator)")
    p.add_argument("--batch", type=int, default=None, help="override the recipes' batch size (smoke runs)")
    p.add_argument("--real-data", default=None, help="instead: cifar10_prior on the real CIFAR-10 images here")
    p.add_argument("--workers", type=int, default=8, help="loader processes of the real-data run")
    p.add_argument("--max-images", type=int, default=None, help="stop the real-data loader pass after this many")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a model override, as --model.KEY VALUE (e.g. capture_step=true; repeatable)")
    p.add_argument("--sync-every", type=int, default=1,
                   help="read the divergence guard every N batches (the SyncEvery callback; default 1: every batch)")
    p.add_argument("--chain-steps", type=int, default=None,
                   help="cap each Langevin chain at this many steps (smoke runs: the code paths, not the speed)")
    p.add_argument("--out", default=None, help="append the rows here, one JSON object per line")
    a = p.parse_args(argv)
    if a.sync_every < 1:
        p.error(f"--sync-every must be >= 1, got {a.sync_every}")
    if a.chain_steps is not None and a.chain_steps < 1:
        p.error(f"--chain-steps must be >= 1, got {a.chain_steps}")
    unknown = sorted(set(a.recipes) - set(list_recipes()))
    if unknown:
        print(f"recipe_speed.py: error: unknown recipe(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("recipe_speed.py: error: no CUDA device visible to torch (use --device cpu)", file=sys.stderr)
        return 2
    failed = 0
    jobs = [(r, prec, None) for r in a.recipes for prec in a.precisions]
    if a.real_data:
        jobs = [("cifar10_prior", prec, a.real_data) for prec in a.precisions]
    common = {"device": a.device, "device_name": torch.cuda.get_device_name() if a.device == "cuda" else None,
              "torch": torch.__version__, "iters": a.iters, "warmup": a.warmup}
    for recipe, prec, real in jobs:
        t0 = time.perf_counter()
        try:
            row = measure(recipe, a.device, prec, a.iters, a.warmup, a.batch, real, a.workers if real else 0,
                          a.max_images, dict(a.set), a.sync_every, a.chain_steps)
            row["rc"] = 0
        except Exception as e:  # noqa: BLE001 - one failing recipe must not hide the others' numbers
            failed += 1
            row = {"recipe": recipe, "precision": prec, "variant": variant_label(dict(a.set), a.sync_every), "rc": 1,
                   "error": f"{type(e).__name__}: {e}"[:500]}
            traceback.print_exc()
        row.update(real_data=real is not None, wall_seconds=time.perf_counter() - t0, **common)
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
