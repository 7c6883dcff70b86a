"""Every shipped recipe parses and builds its model, datamodule and callbacks (no data, no training).

A ``class_path`` typo, an unknown or ill-typed init argument, or a constructor that rejects the recipe's values fails
here in seconds instead of at the start of a multi-hour run. The CLI is built as ``lebm-zoo fit --recipe NAME`` builds
it (:class:`lebm_zoo.cli.LebmCLI`, subclass mode for model and data), with ``run=False``. The models are built at
full size (the largest takes under a second on a CPU), so no width is overridden; ``data_dir`` points at an empty
folder and the FID callback resolves its weights only at ``setup``, so nothing is read.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections import Counter

import pytest
import pytorch_lightning as pl
import yaml

from lebm_zoo.cli import list_recipes, recipe_path
from lebm_zoo.cli.fit import LebmCLI, _RunStarted

RECIPES = sorted(list_recipes())


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_recipes_are_found():
    """Guard against a parametrisation over nothing (a packaging or path change that hides the recipes)."""
    assert len(list_recipes()) >= 23, sorted(list_recipes())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds(name, tmp_path, monkeypatch):
    path = recipe_path(name)
    cfg = yaml.safe_load(path.read_text())
    data_args = cfg["data"].get("init_args") or {}
    args = ["--config", str(path), "--trainer.default_root_dir", str(tmp_path)]
    if "data_dir" in data_args:  # an empty folder: building a datamodule must not read its data
        args += ["--data.data_dir", str(tmp_path / "data")]
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # restored after the test; seed_everything sets it
    monkeypatch.setattr(sys, "argv", ["lebm-zoo"])  # else LightningCLI warns of both sys.argv (pytest's) and args

    cli = LebmCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  save_config_kwargs={"overwrite": True}, run=False, args=args)

    assert isinstance(cli.model, _import(cfg["model"]["class_path"]))
    assert isinstance(cli.datamodule, _import(cfg["data"]["class_path"]))
    assert not (tmp_path / "data").exists(), "the datamodule's constructor touched data_dir"

    # the recipe's callbacks, each built once and on the trainer (Lightning adds its own: SaveConfigCallback, the
    # progress bar, the model summary; the CLI its marker of where the run starts)
    want = Counter(_import(c["class_path"]) for c in cfg["trainer"].get("callbacks") or [])
    assert Counter(type(c) for c in cli.trainer.callbacks if type(c) in want) == want
    extra = [type(c) for c in cli.trainer.callbacks if type(c) not in want]
    assert all(c.__module__.startswith("pytorch_lightning.") or c is _RunStarted for c in extra), extra

    seed = cfg["seed_everything"]
    assert isinstance(seed, int) and not isinstance(seed, bool)
    assert cli.config["seed_everything"] == seed
    assert os.environ["PL_GLOBAL_SEED"] == str(seed)


@pytest.mark.parametrize("name", RECIPES)
def test_image_recipes_turn_on_cudnn_benchmark(name):
    """The fixed-shape image recipes ask for ``cudnn.benchmark`` (the authors' setting; no effect on a CPU); the
    sequence, trajectory and 2-D recipes, whose shapes vary or whose nets have no convolution, do not."""
    cfg = yaml.safe_load(recipe_path(name).read_text())
    sequences = _import(cfg["model"]["class_path"]).__name__ in ("SequenceLatentEBMPrior", "LSTMLanguageModel",
                                                                 "TrajectoryLEBM")
    images = not sequences and not (cfg["model"].get("init_args") or {}).get("dim")
    assert cfg["trainer"].get("benchmark", False) is images, name
