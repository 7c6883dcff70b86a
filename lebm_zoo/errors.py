"""Every error class of the package, in one module at the bottom of its layering (nothing here imports lebm_zoo).

The modules that raise them import them from here; their historic homes (``lebm_zoo.models.base``,
``lebm_zoo.checkpoint``, ``lebm_zoo.callbacks``, ``lebm_zoo.cli``) import the same classes, so ``except`` clauses
written against either name catch them. ``datamodules.DatasetNotFoundError`` belongs to the data package.
"""
from __future__ import annotations

import signal

__all__ = ["CheckpointError", "DataShapeError", "FIDWeightsBuildError", "FIDWeightsNotFoundError",
           "LayoutMismatchError", "RecipeError", "StoppedBySignal", "TrainingDivergedError", "UsageError"]


class DataShapeError(ValueError):
    """The data does not have the shape the model was configured for."""


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite or exploding loss and was stopped (no checkpoint is written at that stop)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, corrupt, not from lebm-zoo, or of another model class."""


class RecipeError(ValueError):
    """An unknown recipe name or an unreadable recipe file."""


class FIDWeightsNotFoundError(FileNotFoundError):
    """The FID Inception weights are not on disk (torchmetrics would download them, which is impossible offline), or
    the file there is not the standard weights (unreadable, another state dict, or a pickle that would run code)."""


class FIDWeightsBuildError(RuntimeError):
    """The FID Inception weights could not be built; the message says what failed in each route tried."""


class LayoutMismatchError(ValueError):
    """A source state dict does not map layer for layer onto the target layout (count, names or shapes)."""


class UsageError(ValueError):
    """A wrong argument or input file of a script in ``benchmarks/``: it prints the message on one line and exits
    with code 2 (:func:`exit_on_usage_error`)."""


def exit_on_usage_error(main, script: str) -> None:
    """Run a script's ``main()`` and exit with its return code; a :class:`UsageError` is one line on stderr and
    exit code 2."""
    import sys

    try:
        code = main()
    except UsageError as e:
        print(f"{script}: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


class StoppedBySignal(SystemExit):
    """A run stopped by SIGTERM or SIGINT after writing ``last.ckpt`` where it stopped
    (:class:`~lebm_zoo.models.base.StopCheckpoint`).

    A ``SystemExit`` whose code is the shell's for that signal (143 for SIGTERM, 130 for SIGINT), so that a cluster's
    scheduler and a shell see an interrupted job, not a success; ``message`` says where it stopped and what was saved.
    """

    def __init__(self, signum: int, step: int, paths: list[str]):
        super().__init__(128 + signum)
        name = signal.Signals(signum).name
        saved = (f"last.ckpt written: {', '.join(paths)}" if paths
                 else "no ModelCheckpoint(save_last=True): nothing saved")
        self.message = f"stopped by {name} after step {step}; {saved} (resume with --ckpt_path last)"
