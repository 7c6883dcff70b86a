"""The ``lebm-zoo`` command: LightningCLI plus paper recipes.

::

    lebm-zoo recipes                                   # list the recipes
    lebm-zoo fit  --recipe svhn_prior [overrides]      # any --trainer.* / --model.* / --data.* override
    lebm-zoo test --recipe svhn_prior --ckpt_path last # the recipe's test metrics on a trained checkpoint

``--recipe NAME`` stands for ``--config <the shipped recipes/NAME.yaml>`` (a path to a YAML file works too) and is
placed before the other arguments, so overrides win. ``--ckpt_path last`` resolves to the newest ``last.ckpt`` of the
same recipe under the run folder (``lightning_logs/`` by default), so a run can be resumed or tested.
"""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from lebm_zoo.models.base import DataShapeError, EBMModule
from lebm_zoo.pretrained import CheckpointError, read_checkpoint

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


def _last_checkpoint(trainer: pl.Trainer, recipe: str | None) -> Path | None:
    """Newest ``last*.ckpt`` under the trainer's run folder, written by the same recipe when one is given."""
    roots = {Path(trainer.default_root_dir)}
    for lg in trainer.loggers:
        if lg.save_dir:
            roots.add(Path(lg.save_dir))
    found = sorted({p for r in roots if r.exists() for p in r.rglob("last*.ckpt")},
                   key=lambda p: p.stat().st_mtime, reverse=True)
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


class LebmCLI(LightningCLI):
    """LightningCLI that tags checkpoints with their recipe, resolves ``--ckpt_path last`` and checks checkpoints."""

    recipe: str | None = None

    def _before(self) -> None:
        sub = self.subcommand
        if isinstance(self.model, EBMModule):
            self.model.recipe = self.recipe
        cfg = self.config_init[sub]
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            found = _last_checkpoint(self.trainer, self.recipe)
            if found is None:
                where = Path(self.trainer.default_root_dir).resolve()
                msg = f"--ckpt_path last: no last.ckpt{' of recipe ' + self.recipe if self.recipe else ''} under {where}"
                if sub != "fit":
                    raise CheckpointError(msg + "; train first or pass a checkpoint path.")
                print(msg + "; starting from scratch.", file=sys.stderr)
                cfg["ckpt_path"] = None
            else:
                print(f"--ckpt_path last: using {found}", file=sys.stderr)
                cfg["ckpt_path"] = ckpt = str(found)
        if ckpt and ckpt not in ("best", "last", "hpc"):
            # check the file before Lightning does, so that a wrong file gives a clear message
            from lebm_zoo.pretrained import _model_class

            path = Path(ckpt)
            if not path.is_file():
                raise CheckpointError(f"--ckpt_path {ckpt}: no such file.")
            cls = _model_class(read_checkpoint(path), path)
            if not (issubclass(cls, type(self.model)) or issubclass(type(self.model), cls)):
                raise CheckpointError(f"--ckpt_path {ckpt} holds a {cls.__name__} checkpoint but the recipe builds a "
                                      f"{type(self.model).__name__}.")

    before_fit = before_validate = before_test = before_predict = _before


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
    from datamodules import DatasetNotFoundError

    try:
        args, recipe = _expand_recipe(args)
        LebmCLI.recipe = recipe
        cli = LebmCLI(
            EBMModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": "lebm-zoo: energy-based generative models. `lebm-zoo recipes` lists the "
                                          "paper recipes; use `--recipe NAME`."},
        )
    except (RecipeError, CheckpointError, DatasetNotFoundError, DataShapeError) as e:
        print(f"lebm-zoo: error: {e}", file=sys.stderr)
        return 2
    model = getattr(cli, "model", None)
    if getattr(model, "divergence", None):
        print(f"lebm-zoo: error: {model.divergence}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
