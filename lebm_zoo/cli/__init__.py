"""The ``lebm-zoo`` command, one module per subcommand::

    lebm-zoo recipes                                   # list the recipes                       (cli/fit.py)
    lebm-zoo fit  --recipe svhn_prior [overrides]      # LightningCLI with a paper recipe       (cli/fit.py)
    lebm-zoo test --recipe svhn_prior --ckpt_path last # the recipe's test metrics              (cli/fit.py)
    lebm-zoo pretrained                                # the shipped weights                    (cli/pretrained.py)
    lebm-zoo sample lebm-mnist-quickstart -n 64        # samples of a shipped name, folder, ...  (cli/pretrained.py)
    lebm-zoo env                                       # this machine: devices, CPU, precision  (cli/env.py)
    lebm-zoo fid-weights                               # build the FID Inception weights        (cli/fid_weights.py)

Every subcommand returns its exit code: 0 ok, 1 training diverged, 2 bad input (one line on stderr), 143 / 130
stopped by SIGTERM / SIGINT after writing ``last.ckpt``.
"""
from __future__ import annotations

import sys

from lebm_zoo.cli.fit import list_recipes, recipe_path
from lebm_zoo.errors import RecipeError

__all__ = ["main", "list_recipes", "recipe_path", "RecipeError"]


def main(args: list[str] | None = None) -> int:
    """Entry point of ``lebm-zoo``: runs the subcommand named first in ``args`` (default ``sys.argv[1:]``) and returns
    its exit code."""
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["recipes"]:
        from lebm_zoo.cli.fit import print_recipes

        print_recipes()
        return 0
    if args[:1] == ["env"]:
        from lebm_zoo.cli.env import main as env_main

        return env_main(args[1:])
    if args[:1] == ["fid-weights"]:
        from lebm_zoo.cli.fid_weights import main as fid_weights_main

        return fid_weights_main(args[1:])
    if args[:1] == ["pretrained"]:
        from lebm_zoo.cli.pretrained import main_pretrained

        return main_pretrained(args[1:])
    if args[:1] == ["sample"]:
        from lebm_zoo.cli.pretrained import main_sample

        return main_sample(args[1:])
    from lebm_zoo.cli.fit import main as fit_main

    return fit_main(args)
