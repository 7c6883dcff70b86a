"""``lebm-zoo fit / validate / test / predict`` and ``lebm-zoo recipes``: LightningCLI plus paper recipes.

::

    lebm-zoo recipes                                   # list the recipes
    lebm-zoo fit  --recipe svhn_prior [overrides]      # any --trainer.* / --model.* / --data.* override
    lebm-zoo test --recipe svhn_prior --ckpt_path last # the recipe's test metrics on a trained checkpoint
    lebm-zoo test --recipe mnist_prior --ckpt_path lebm-mnist   # ... or on published weights, by name

``--recipe NAME`` stands for ``--config <the shipped recipes/NAME.yaml>`` (a path to a YAML file works too) and is
placed before the other arguments, so overrides win. ``--ckpt_path last`` resolves to the newest ``last.ckpt`` of the
same recipe under the run folder (``lightning_logs/`` by default), so a run can be resumed or tested. A name of
``lebm-zoo pretrained`` (test, validate, predict) evaluates those published weights on the recipe's protocol.

At start-up the command keeps freed CPU memory in the heap (:func:`lebm_zoo.utils.tune_cpu_allocator`), which makes
the chains' steps faster on CPU; ``LEBM_ZOO_CPU_ALLOCATOR=default`` leaves the C allocator as it is.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI

from lebm_zoo.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    class_path,
    find_best_checkpoint,
    find_last_checkpoint,
    model_class,
    read_checkpoint,
    write_record,
)
from lebm_zoo.errors import DataShapeError, RecipeError, StoppedBySignal, TrainingDivergedError
from lebm_zoo.utils import tune_cpu_allocator

_DIVERGED = f"{TrainingDivergedError.__module__}.{TrainingDivergedError.__qualname__}"  # as a traceback names it

__all__ = ["LebmCLI", "list_recipes", "main", "print_recipes", "recipe_path"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")


#: the folder above the package: a source checkout where it holds pyproject.toml and recipes/
_CHECKOUT = Path(__file__).resolve().parents[2]


def _recipe_files() -> dict[str, Path]:
    # the package imported from a source checkout (``python -m lebm_zoo.cli`` or a benchmark script in it, as on the
    # GPU machine, even where another copy is installed): that checkout's recipes/; installed: lebm_zoo.recipes
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "recipes" / "__init__.py").is_file():
        root = _CHECKOUT / "recipes"
    else:
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
    if p.suffix in (".yaml", ".yml"):
        if p.is_file():
            return p
        raise RecipeError(f"--recipe {name}: no such file ({p.expanduser().absolute()}); a recipe is a shipped name "
                          f"({', '.join(sorted(files))}) or the path of a YAML file.")
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
    """Resolve ``--ckpt_path last`` / ``best`` and check that a checkpoint file given by path exists
    (:class:`LebmCLI` reads and checks it, once, right after parsing).

    ``last`` becomes the newest ``last.ckpt`` of the same recipe under ``--trainer.default_root_dir`` (default: the
    current folder). For ``fit`` a missing one means starting from scratch; for the other subcommands it is an error.
    ``best`` (``test``, ``validate``, ``predict``) becomes the checkpoint that run's monitored checkpoint callback kept
    as its best (:func:`~lebm_zoo.checkpoint.find_best_checkpoint`; the ETH-UCY LB-EBM recipes keep the lowest
    ``val/ade``'s).

    Raises:
        CheckpointError: a missing checkpoint; ``best`` given to ``fit``, or for a run that keeps no best checkpoint.
    """
    hit = _option(args, "--ckpt_path")
    if hit is None or hit[1] in ("", "null", "None", "hpc"):
        return args
    if hit[1] == "best" and args[:1] == ["fit"]:
        raise CheckpointError("--ckpt_path best is for test, validate and predict (a run's best checkpoint on "
                              "validation); to resume training use --ckpt_path last.")
    i, value = hit
    args = list(args)
    if value in ("last", "best"):
        root_opt = _option(args, "--trainer.default_root_dir")
        root = Path(root_opt[1] if root_opt else ".").resolve()
        skipped: list[tuple[Path, str]] = []
        found = find_last_checkpoint(root, recipe, skipped)
        for path, why in skipped:  # newer than the one used: say so, never pass over a run's newest silently
            print(f"--ckpt_path {value}: skipping {path}: {why}", file=sys.stderr)
        if found is None:
            msg = f"--ckpt_path {value}: no last.ckpt{' of recipe ' + recipe if recipe else ''} under {root}"
            if args[:1] != ["fit"]:
                raise CheckpointError(msg + "; train first or pass a checkpoint path.")
            print(msg + "; starting from scratch.", file=sys.stderr)
            args[i] = "null" if args[i] == "last" else "--ckpt_path=null"
            return args
        if value == "best":  # the run's own choice on validation, recorded in its last.ckpt
            found, monitor, score = find_best_checkpoint(found)
            print(f"--ckpt_path best: using {found} (its {monitor} was {score:.6g})" if score is not None else
                  f"--ckpt_path best: using {found} (chosen on {monitor})", file=sys.stderr)
        else:
            print(f"--ckpt_path last: using {found}", file=sys.stderr)
        args[i] = str(found) if args[i] == value else f"--ckpt_path={found}"
        value = str(found)
    if not Path(value).is_file():
        published = _published_checkpoint(value, args[:1], recipe)
        if published is None:
            raise CheckpointError(f"--ckpt_path {value}: no such file.")
        args[i] = str(published) if args[i] == value else f"--ckpt_path={published}"
    return args


def _published_checkpoint(name: str, sub: list[str], recipe: str | None) -> Path | None:
    """For ``lebm-zoo test|validate|predict --ckpt_path NAME`` with NAME a name of ``lebm-zoo pretrained`` (or
    ``hf://...``): the published weights as a Lightning checkpoint in a temporary folder (removed at exit), which the
    run then reads through the checked reader like any other. None when ``name`` is not a published name.

    Raises:
        CheckpointError: a published name given to ``fit``, or one trained by another recipe than ``recipe``.
    """
    from lebm_zoo.pretrained import list_pretrained, load_pretrained

    names = {e.name: e for e in list_pretrained()}
    if name not in names and not name.startswith("hf://"):
        return None
    if sub == ["fit"]:
        raise CheckpointError(f"--ckpt_path {name} is a published model: `lebm-zoo test --recipe RECIPE --ckpt_path "
                              f"{name}` evaluates it; fit resumes training checkpoints (.ckpt) only.")
    entry = names.get(name)
    if entry is not None and recipe is not None and entry.recipe not in (None, recipe):
        raise CheckpointError(f"--ckpt_path {name} was trained by recipe {entry.recipe}, not {recipe}: use "
                              f"`--recipe {entry.recipe}` to evaluate it on its own protocol.")
    model = load_pretrained(name)
    folder = Path(tempfile.mkdtemp(prefix="lebm-zoo-published-"))
    atexit.register(shutil.rmtree, folder, True)
    hparams = {**dict(model.hparams), "_class_path": class_path(type(model)),  # what LightningCLI's own checkpoints
               "_instantiator": "pytorch_lightning.cli.instantiate_module"}  # record of a subclass-mode model
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": hparams, "epoch": 0,
            "global_step": int(model.pretrained_config.get("training_steps") or 0),
            "pytorch-lightning_version": pl.__version__}
    write_record(ckpt, model)
    ckpt["lebm_zoo"]["recipe"] = model.recipe
    path = folder / f"{name.replace('/', '_').replace(':', '_')}.ckpt"
    torch.save(ckpt, path)
    print(f"--ckpt_path {name}: the published weights ({model.pretrained_config.get('training_steps')} training "
          "steps)", file=sys.stderr)
    return path


def _explicit_model_keys(args: list[str]) -> set[str]:
    """The model hyperparameters given on the command line (``--model.K V``, ``--model.init_args.K=V``)."""
    keys = set()
    for a in args:
        if a.startswith("--model.") and not a.startswith("--model.help"):
            key = a[len("--model."):].split("=", 1)[0]
            keys.add(key[len("init_args."):] if key.startswith("init_args.") else key)
    return keys - {"class_path"}


class _RunStarted(pl.Callback):
    """Marks where the model's own code starts to run (the sanity check or the first loop): a ValueError, TypeError or
    OSError before it comes from the user's input (the data set, a hyperparameter, the run folder, ``--ckpt_path``)
    and is one line with exit code 2; after it, a traceback.

    Attributes:
        started: False until the run starts.
    """

    def __init__(self) -> None:
        self.started = False

    def _started(self, *args) -> None:
        self.started = True

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = on_predict_start = _started


class LebmCLI(LightningCLI):
    """LightningCLI that tags checkpoints with their recipe, writes them atomically, refuses a checkpoint of another
    model class, and merges a checkpoint's hyperparameters with the command line's explicitly.

    With ``ckpt_path`` (``--ckpt_path`` or a ``--config`` file's), the checkpoint is read once, through the checked
    reader (:func:`~lebm_zoo.checkpoint.read_checkpoint`), right after the arguments are parsed; the model is built
    from its hyperparameters, except those given on the command line that the family may change on resume
    (``resume_hparams``: chains, step sizes, learning rates...). Lightning's own merge puts the checkpoint's values
    over the command line silently (and its class over the recipe's); here a checkpoint of another model class is
    refused, naming both, and an explicit override of an architectural hyperparameter is refused, naming the keys
    that come from the checkpoint.

    Args:
        *args, **kwargs: LightningCLI's.
        recipe: the recipe's name (stored in the model's checkpoints), None for a plain ``--config``.
        explicit_model_keys: the model hyperparameters given on the command line (``--model.K``).

    Raises:
        CheckpointError: an unreadable or foreign checkpoint, another model class, or a command-line value for a
            hyperparameter fixed by the checkpoint.
    """

    def __init__(self, *args, recipe: str | None = None, explicit_model_keys: frozenset[str] = frozenset(),
                 **kwargs):
        self.recipe = recipe
        self.explicit_model_keys = frozenset(explicit_model_keys)
        self.checkpoint_class: type | None = None  # the class the checkpoint (if any) was written by
        self._model_config = None  # the model's configuration merged with the checkpoint's, applied before it is built
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs):
        """The trainer, with :class:`~lebm_zoo.checkpoint.AtomicCheckpointIO` unless plugins were given."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if not config["trainer"].get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        """Lightning's parsing, then the checkpoint read once and merged into the model's configuration (applied in
        :meth:`before_instantiate_classes`, over whatever Lightning's own merge of it made)."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path in (None, "", "last", "best", "hpc"):
            return
        self._model_config = self._merge_checkpoint(str(ckpt_path), self.config[sub]["model"])

    def _merge_checkpoint(self, ckpt_path: str, model_cfg):
        """A copy of the model's configuration with the checkpoint's hyperparameters (see the class docstring)."""
        import copy

        from jsonargparse import Namespace

        ckpt = read_checkpoint(ckpt_path)
        cls = model_class(ckpt, Path(ckpt_path))
        self.checkpoint_class = cls
        model_cfg = copy.deepcopy(model_cfg)
        want = _import_class(model_cfg["class_path"]) if isinstance(model_cfg, Namespace) else None
        if want is not None and not (issubclass(cls, want) or issubclass(want, cls)):
            what = f"recipe {self.recipe}" if self.recipe else "the configuration"
            raise CheckpointError(f"--ckpt_path {ckpt_path} holds a {cls.__name__} checkpoint but {what} builds a "
                                  f"{want.__name__}; pass a checkpoint of a {want.__name__} (or the matching recipe).")
        stored = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
        init_args = model_cfg.get("init_args") if isinstance(model_cfg, Namespace) else None
        if init_args is None:
            return model_cfg
        refused = []
        for key, value in stored.items():
            if key not in init_args:
                continue
            given = init_args[key]
            if key in self.explicit_model_keys and _as_plain(given) != _as_plain(value):
                if key in getattr(cls, "resume_hparams", ()):
                    print(f"lebm-zoo: resuming with --model.{key} {given} (the checkpoint has {value})",
                          file=sys.stderr)
                    continue
                refused.append(f"{key} (checkpoint: {value}, command line: {given})")
                continue
            init_args[key] = value
        if refused:
            raise CheckpointError(f"--ckpt_path {ckpt_path}: these hyperparameters come from the checkpoint and cannot "
                                  f"change when resuming: {'; '.join(refused)}. Drop those flags, or start a new run "
                                  "without --ckpt_path. (Chain lengths, step sizes, learning rates, schedules, "
                                  "clipping and loss weights may change.)")
        return model_cfg

    def before_instantiate_classes(self) -> None:
        if self._model_config is not None:
            self.config[self.subcommand]["model"] = self._model_config

    def _before(self) -> None:
        if hasattr(self.model, "recipe"):
            self.model.recipe = self.recipe
        cls = self.checkpoint_class
        if cls is not None and not (issubclass(cls, type(self.model)) or issubclass(type(self.model), cls)):
            raise CheckpointError(f"--ckpt_path {self.config_init[self.subcommand].get('ckpt_path')} holds a "
                                  f"{cls.__name__} checkpoint but the recipe builds a {type(self.model).__name__}.")

    def before_fit(self) -> None:
        self._before()
        from lebm_zoo.precision import warn_if_emulated_bf16

        msg = warn_if_emulated_bf16(str(self.trainer.precision), self.trainer.strategy.root_device.type, emit=False)
        if msg and self.trainer.is_global_zero:
            print(f"lebm-zoo: warning: {msg}", file=sys.stderr)

    def before_test(self) -> None:
        self._before()
        if not self.config_init[self.subcommand].get("ckpt_path") and self.trainer.is_global_zero:
            print("lebm-zoo: warning: no --ckpt_path: testing the recipe's untrained model (pass --ckpt_path last or a "
                  "checkpoint for a trained one)", file=sys.stderr)

    before_validate = before_predict = _before

    def after_fit(self) -> None:
        """Say where the run's samples and checkpoint are, and what to run next (rank zero, clean runs only)."""
        from lebm_zoo.callbacks._common import _run_dir

        trainer = self.trainer
        if getattr(self.model, "divergence", None):
            return
        run = _run_dir(trainer)  # every rank asks: a collective under DDP
        if not trainer.is_global_zero:
            return
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


def _parse_error(message: str) -> str:
    """jsonargparse's multi-line parse error as one line: the key, the class and what was wrong, without the lists of
    the types it tried."""
    boilerplate = ("Subtypes:", "Errors:", "Given value", "Does not validate against any",
                   "- Expected a <class 'NoneType'>")
    lines = (ln.strip() for ln in message.splitlines())
    return " ".join(ln.lstrip("- ") for ln in lines if ln and not ln.startswith(boilerplate))


def _pretty(path: Path) -> str:
    """``path`` relative to the current folder when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _import_class(path: str) -> type:
    """The class named by a dotted ``class_path`` (``lebm_zoo.LatentEBMPrior``)."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _one_line(e: BaseException) -> str:
    """An exception as one line. A model's or datamodule's own message (e.g. ``llhd_sigma must be > 0, got -1.0``)
    is taken out of jsonargparse's wrapping, which lists every subtype it tried, and named by its class."""
    import re

    text = " ".join(str(e).split())
    if "Errors: - " in text:
        cause = text.split("Errors: - ", 1)[1].split(" - Expected a", 1)[0].strip()
        cls = re.search(r"class_path='([^']+)'", text)
        return f"{cls.group(1).rsplit('.', 1)[-1]}: {cause}" if cls else cause
    return f"{type(e).__name__}: {text}" if isinstance(e, OSError) else text


def _preflight_root_dir(args: list[str]) -> Path:
    """The run folder (``--trainer.default_root_dir``, default the current folder), checked to be a writable folder.

    Raises:
        RecipeError: it is a file, or cannot be created or written.
    """
    hit = _option(args, "--trainer.default_root_dir")
    root = Path(hit[1]).expanduser() if hit else Path(".")
    if root.exists() and not root.is_dir():
        raise RecipeError(f"--trainer.default_root_dir {root}: a file, not a folder.")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"--trainer.default_root_dir {root}: cannot create it ({e.strerror}).") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RecipeError(f"--trainer.default_root_dir {root}: not writable; pick a folder you can write to.")
    return root


def _version_dirs(root: Path | None) -> set[Path]:
    return set((root / "lightning_logs").glob("version_*")) if root is not None else set()


def _remove_empty_runs(root: Path | None, before: set[Path]) -> None:
    """Remove the ``lightning_logs/version_N`` folders a failed start created that hold nothing of the run: no file,
    or only what the logger and the CLI write as it starts (TensorBoard events, ``config.yaml``, ``hparams.yaml``)."""
    import shutil

    def started_only(p: Path) -> bool:
        return p.name.startswith("events.out.tfevents") or p.name in ("config.yaml", "hparams.yaml")

    for d in _version_dirs(root) - before:
        if d.is_dir() and all(started_only(p) for p in d.rglob("*") if p.is_file()):
            shutil.rmtree(d, ignore_errors=True)


def _as_plain(v):
    """A hyperparameter value in a comparable form (tuples and lists alike)."""
    return list(v) if isinstance(v, (list, tuple)) else v


def print_recipes() -> None:
    """Print every shipped recipe with its one-line description."""
    recipes = list_recipes()
    width = max(map(len, recipes), default=0)
    print("Recipes (lebm-zoo fit --recipe NAME):")
    for name, desc in recipes.items():
        print(f"  {name:<{width}}  {desc}")


def main(args: list[str]) -> int:
    """``lebm-zoo fit | validate | test | predict``: LightningCLI with a recipe. Returns the process exit code (0 ok,
    1 training diverged, 2 bad input, 143 / 130 stopped by SIGTERM / SIGINT after writing ``last.ckpt``)."""
    from datamodules import DatasetNotFoundError
    from lebm_zoo.callbacks import FIDWeightsNotFoundError

    if os.environ.get("LEBM_ZOO_CPU_ALLOCATOR", "tuned") != "default":
        tune_cpu_allocator()

    root = None
    run_started = _RunStarted()
    try:
        args, recipe = _expand_recipe(args)
        root = _preflight_root_dir(args)
        before = _version_dirs(root)
        for d in before:  # the temporaries of runs killed while writing a checkpoint (beside it, in checkpoints/)
            if (d / "checkpoints").is_dir():
                AtomicCheckpointIO.remove_stale_temporaries(d / "checkpoints")
        args = _preflight_checkpoint(args, recipe)
        with warnings.catch_warnings():
            # args= is LightningCLI's way to run from Python; it warns when sys.argv holds arguments too, as it does
            # under the `lebm-zoo` command, which hands them over here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = LebmCLI(
                pl.LightningModule,  # the zoo's models (EBMModule subclasses) and the LSTMLanguageModel of text metrics
                pl.LightningDataModule,
                args=args,
                recipe=recipe,
                explicit_model_keys=_explicit_model_keys(args),
                subclass_mode_model=True,
                subclass_mode_data=True,
                trainer_defaults={"callbacks": [run_started]},
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"description": "lebm-zoo: energy-based generative models. `lebm-zoo recipes` lists "
                                              "the paper recipes; use `--recipe NAME`. `lebm-zoo pretrained` lists "
                                              "the shipped weights, `lebm-zoo sample NAME` samples one.",
                               "exit_on_error": False},  # a bad flag or config: our one line, not 50 of usage
            )
    except argparse.ArgumentError as e:  # an unknown flag or key, a bad value, a YAML syntax error
        _remove_empty_runs(root, before if root is not None else set())
        helper = f"lebm-zoo {args[0]} --help" if args and not args[0].startswith("-") else "lebm-zoo --help"
        print(f"lebm-zoo: error: {_parse_error(str(e))} (see `{helper}`)", file=sys.stderr)
        return 2
    except StoppedBySignal as e:  # SIGTERM / SIGINT while training: last.ckpt is written
        print(f"lebm-zoo: {e.message}", file=sys.stderr)
        return int(e.code)
    except TrainingDivergedError as e:  # a divergence found after its update (SyncEvery's deferred reads)
        from lebm_zoo.models.base import leave_process_group

        leave_process_group()  # ddp: every rank took the same decision and raised it
        print(f"lebm-zoo: error: {e}", file=sys.stderr)
        return 1
    except torch.multiprocessing.ProcessRaisedException as e:  # ddp_spawn: a worker's error, as text
        diverged = [line for line in str(e).splitlines() if line.startswith(f"{_DIVERGED}: ")]
        if not diverged:
            raise
        print(f"lebm-zoo: error: {diverged[-1][len(_DIVERGED) + 2:]}", file=sys.stderr)
        return 1
    except (RecipeError, CheckpointError, DatasetNotFoundError, DataShapeError, FIDWeightsNotFoundError) as e:
        _remove_empty_runs(root, before if root is not None else set())
        print(f"lebm-zoo: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as e:
        if run_started.started:  # raised while training: not an input error, keep the traceback
            raise
        _remove_empty_runs(root, before if root is not None else set())
        print(f"lebm-zoo: error: {_one_line(e)}", file=sys.stderr)
        return 2
    from lebm_zoo.models.base import leave_process_group

    leave_process_group()  # ddp: every rank ran main(); ddp_spawn workers left in EBMModule.teardown
    model = getattr(cli, "model", None)
    if getattr(model, "divergence", None):
        print(f"lebm-zoo: error: {model.divergence}", file=sys.stderr)
        return 1
    return 0

