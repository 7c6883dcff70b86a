"""The ``lebm-zoo`` command: LightningCLI plus paper recipes.

::

    lebm-zoo recipes                                   # list the recipes
    lebm-zoo fit  --recipe svhn_prior [overrides]      # any --trainer.* / --model.* / --data.* override
    lebm-zoo test --recipe svhn_prior --ckpt_path last # the recipe's test metrics on a trained checkpoint

``--recipe NAME`` stands for ``--config <the shipped recipes/NAME.yaml>`` (a path to a YAML file works too) and is
placed before the other arguments, so overrides win. ``--ckpt_path last`` resolves to the newest ``last.ckpt`` of the
same recipe under the run folder (``lightning_logs/`` by default), so a run can be resumed or tested.

At start-up the command keeps freed CPU memory in the heap (:func:`lebm_zoo.utils.tune_cpu_allocator`), which makes
the chains' steps faster on CPU; ``LEBM_ZOO_CPU_ALLOCATOR=default`` leaves the C allocator as it is.
"""
from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from lebm_zoo.models.base import DataShapeError
from lebm_zoo.pretrained import CheckpointError, read_checkpoint
from lebm_zoo.utils import tune_cpu_allocator

__all__ = ["main", "list_recipes", "recipe_path", "RecipeError"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class RecipeError(ValueError):
    """An unknown recipe name or an unreadable recipe file."""


def _recipe_files() -> dict[str, Path]:
    root = resources.files("lebm_zoo.recipes")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def _description(path: Path) -> str:
    """The recipe's one-line description: its first ``# `` comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def list_recipes() -> dict[str, str]:
    """Recipe name -> one-line description, for every recipe shipped with the package."""
    return {name: _description(path) for name, path in sorted(_recipe_files().items())}


def recipe_path(name: str) -> Path:
    """Path of a shipped recipe, or of a YAML file given by path.

    Raises:
        RecipeError: for an unknown name, listing the valid ones.
    """
    files = _recipe_files()
    if name in files:
        return files[name]
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    raise RecipeError(f"unknown recipe {name!r}. Valid recipes: {', '.join(sorted(files))} "
                      "(run `lebm-zoo recipes` for descriptions), or pass a path to a YAML file.")


def _expand_recipe(args: list[str]) -> tuple[list[str], str | None]:
    """Replace ``--recipe NAME`` by ``--config PATH`` right after the subcommand; return (args, recipe name)."""
    out, name, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == "--recipe" or a.startswith("--recipe="):
            if a == "--recipe":
                if i + 1 >= len(args):
                    raise RecipeError("--recipe needs a name; run `lebm-zoo recipes` to list them.")
                name, i = args[i + 1], i + 2
            else:
                name, i = a.split("=", 1)[1], i + 1
            continue
        out.append(a)
        i += 1
    if name is None:
        return out, None
    path = recipe_path(name)
    at = 1 if out and out[0] in SUBCOMMANDS else 0
    return out[:at] + ["--config", str(path)] + out[at:], Path(name).stem


def _last_checkpoint(root: Path, recipe: str | None) -> Path | None:
    """Newest ``last*.ckpt`` below ``root``, written by the same recipe when one is given."""
    found = sorted(root.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() else []
    for p in found:
        if recipe is None:
            return p
        try:
            meta = read_checkpoint(p).get("lebm_zoo", {})
        except CheckpointError:
            continue
        if meta.get("recipe") == recipe:
            return p
    return None


def _option(args: list[str], name: str) -> tuple[int, str] | None:
    """Index and value of ``--name VALUE`` / ``--name=VALUE`` in ``args`` (the last one wins)."""
    hit = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            hit = (i + 1, args[i + 1])
        elif a.startswith(name + "="):
            hit = (i, a.split("=", 1)[1])
    return hit


def _preflight_checkpoint(args: list[str], recipe: str | None) -> list[str]:
    """Resolve ``--ckpt_path last`` and check a checkpoint file before Lightning reads it.

    ``last`` becomes the newest ``last.ckpt`` of the same recipe under ``--trainer.default_root_dir`` (default: the
    current folder). For ``fit`` a missing one means starting from scratch; for the other subcommands it is an error.

    Raises:
        CheckpointError: missing, corrupt or foreign checkpoint.
    """
    from lebm_zoo.pretrained import _model_class

    hit = _option(args, "--ckpt_path")
    if hit is None or hit[1] in ("", "null", "None", "best", "hpc"):
        return args
    i, value = hit
    args = list(args)
    if value == "last":
        root_opt = _option(args, "--trainer.default_root_dir")
        root = Path(root_opt[1] if root_opt else ".").resolve()
        found = _last_checkpoint(root, recipe)
        if found is None:
            msg = f"--ckpt_path last: no last.ckpt{' of recipe ' + recipe if recipe else ''} under {root}"
            if args[:1] != ["fit"]:
                raise CheckpointError(msg + "; train first or pass a checkpoint path.")
            print(msg + "; starting from scratch.", file=sys.stderr)
            args[i] = "null" if args[i] == "last" else "--ckpt_path=null"
            return args
        print(f"--ckpt_path last: using {found}", file=sys.stderr)
        args[i] = str(found) if args[i] == "last" else f"--ckpt_path={found}"
        value = str(found)
    path = Path(value)
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path {value}: no such file.")
    _model_class(read_checkpoint(path), path)
    return args


class LebmCLI(LightningCLI):
    """LightningCLI that tags checkpoints with their recipe and refuses a checkpoint of another model class."""

    recipe: str | None = None

    def _before(self) -> None:
        from lebm_zoo.pretrained import _model_class

        if hasattr(self.model, "recipe"):
            self.model.recipe = self.recipe
        ckpt = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt and Path(ckpt).is_file():
            cls = _model_class(read_checkpoint(ckpt), Path(ckpt))
            if not (issubclass(cls, type(self.model)) or issubclass(type(self.model), cls)):
                raise CheckpointError(f"--ckpt_path {ckpt} holds a {cls.__name__} checkpoint but the recipe builds a "
                                      f"{type(self.model).__name__}.")

    def before_fit(self) -> None:
        self._before()
        from lebm_zoo.env import warn_if_emulated_bf16

        msg = warn_if_emulated_bf16(str(self.trainer.precision), self.trainer.strategy.root_device.type, emit=False)
        if msg and self.trainer.is_global_zero:
            print(f"lebm-zoo: warning: {msg}", file=sys.stderr)

    before_validate = before_test = before_predict = _before

    def after_fit(self) -> None:
        """Say where the run's samples and checkpoint are, and what to run next (rank zero, clean runs only)."""
        trainer = self.trainer
        if not trainer.is_global_zero or getattr(self.model, "divergence", None):
            return
        run = Path(trainer.log_dir or trainer.default_root_dir)
        ckpt = next(iter(sorted(run.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)), None)
        images = sorted((p for p in run.rglob("*.png")), key=lambda p: p.stat().st_mtime)
        recipe = f"--recipe {self.recipe}" if self.recipe else "--config <your config>"
        lines = [f"lebm-zoo: trained to step {trainer.global_step}; run folder {_pretty(run)}"]
        if images:
            lines.append(f"  samples and plots: {_pretty(images[-1].parent)}/ (newest: {images[-1].name})")
        if ckpt is not None:
            lines.append(f"  checkpoint: {_pretty(ckpt)}")
            lines.append(f"  next: `lebm-zoo test {recipe} --ckpt_path last` for the test metrics, or "
                         f"`lebm-zoo fit {recipe} --ckpt_path last` to train on")
        print("\n".join(lines))


def _pretty(path: Path) -> str:
    """``path`` relative to the current folder when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _print_recipes() -> None:
    recipes = list_recipes()
    width = max(map(len, recipes), default=0)
    print("Recipes (lebm-zoo fit --recipe NAME):")
    for name, desc in recipes.items():
        print(f"  {name:<{width}}  {desc}")


def main(args: list[str] | None = None) -> int:
    """Entry point of ``lebm-zoo``. Returns the process exit code (0 ok, 1 training diverged, 2 bad input)."""
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["recipes"]:
        _print_recipes()
        return 0
    if args[:1] == ["env"]:
        from lebm_zoo.env import main as env_main

        return env_main(args[1:])
    if args[:1] == ["fid-weights"]:
        from lebm_zoo.fid_weights import main as fid_weights_main

        return fid_weights_main(args[1:])
    from datamodules import DatasetNotFoundError
    from lebm_zoo.callbacks import FIDWeightsNotFoundError

    if os.environ.get("LEBM_ZOO_CPU_ALLOCATOR", "tuned") != "default":
        tune_cpu_allocator()

    try:
        args, recipe = _expand_recipe(args)
        args = _preflight_checkpoint(args, recipe)
        LebmCLI.recipe = recipe
        saved_argv = sys.argv
        sys.argv = [saved_argv[0] if saved_argv else "lebm-zoo", *args]  # LightningCLI reads sys.argv
        try:
            cli = LebmCLI(
                pl.LightningModule,  # the zoo's models (EBMModule subclasses) and the LSTMLanguageModel of text metrics
                pl.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"description": "lebm-zoo: energy-based generative models. `lebm-zoo recipes` lists "
                                              "the paper recipes; use `--recipe NAME`."},
            )
        finally:
            sys.argv = saved_argv
    except (RecipeError, CheckpointError, DatasetNotFoundError, DataShapeError, FIDWeightsNotFoundError) as e:
        print(f"lebm-zoo: error: {e}", file=sys.stderr)
        return 2
    model = getattr(cli, "model", None)
    if getattr(model, "divergence", None):
        print(f"lebm-zoo: error: {model.divergence}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
