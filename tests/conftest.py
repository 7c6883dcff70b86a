"""Shared test set-up: real-data and FID-weights markers, their summary line, stand-in FID weights, fake MNIST files.

Plain helpers (the tiny trainer ``tiny_trainer`` / ``fit_steps``, ``fixed_batch``, ``uniform_images``,
``tensor_loader``, ``write_mnist``, ``recipe_fit_args``) live in ``_data.py``; test files import them from there.

* ``@pytest.mark.realdata("mnist/MNIST/raw", ...)``: the test reads these paths below ``_data.DATA_ROOT`` (the real
  data copies). Missing: the test is skipped with a reason naming the path, or fails when
  ``LEBM_ZOO_REQUIRE_REAL_DATA=1`` (``.ci/run`` sets it where the data exist, so no real-data test skips there).
* ``@pytest.mark.fid_weights``: the test needs the standard FID Inception weights (``_data.FID_WEIGHTS``, built by
  ``lebm-zoo fid-weights``); skipped, naming the path and the command, when they are not built.
* The terminal summary says how many of these tests ran and which paths were missing.
* ``fid_weights_file``: a weights file in torch-fidelity's layout for tests that only need the recipes' FID callback
  to set up: the real weights when built, else the same network with seeded random values (so FID values computed
  from it are meaningless; no test reads one).
* ``fake_mnist_dir``: a fresh folder holding fake MNIST files (``_data.write_mnist``: 24 random images per split) in
  torchvision's layout, for recipes trained through the CLI.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from unittest import mock

import pytest
from _data import DATA_ROOT, FID_WEIGHTS, write_mnist

_RUN: dict[str, list[str]] = {"realdata": [], "fid_weights": []}
_SKIPPED: dict[str, dict[str, str]] = {"realdata": {}, "fid_weights": {}}  # nodeid -> missing path


def pytest_configure(config):
    config.addinivalue_line("markers", "realdata(*paths): reads real data below DATA_ROOT; skipped when absent")
    config.addinivalue_line("markers", "fid_weights: needs the real FID Inception weights (lebm-zoo fid-weights)")


_DATA_HINT = "set LEBM_ZOO_TEST_DATA to the folder that holds mnist/, ptb/, zinc/, cifar10/, celeba/"
_WEIGHTS_HINT = "build them with `lebm-zoo fid-weights`, or set LEBM_ZOO_FID_WEIGHTS"


def _missing(item) -> tuple[str, Path] | None:
    """(marker, missing path) when a file the test needs is not there, else None."""
    for mark in item.iter_markers("realdata"):
        for rel in mark.args:
            if not (DATA_ROOT / rel).exists():
                return "realdata", DATA_ROOT / rel
    if item.get_closest_marker("fid_weights") and not FID_WEIGHTS.is_file():
        return "fid_weights", FID_WEIGHTS
    return None


def pytest_runtest_setup(item):
    hit = _missing(item)
    kinds = [k for k in _RUN if item.get_closest_marker(k)]
    if hit is None:
        for k in kinds:
            _RUN[k].append(item.nodeid)
        return
    kind, path = hit
    for k in kinds:
        _SKIPPED[k][item.nodeid] = str(path)
    if kind == "realdata":
        reason = f"real data not found: {path} ({_DATA_HINT})"
        if os.environ.get("LEBM_ZOO_REQUIRE_REAL_DATA") == "1":
            pytest.fail(f"LEBM_ZOO_REQUIRE_REAL_DATA=1 but {reason}", pytrace=False)
    else:
        reason = f"FID Inception weights not found: {path} ({_WEIGHTS_HINT})"
    pytest.skip(reason)


#: test files whose reference needs an optional package; where it is not installed (the GPU machine has no RDKit) the
#: file is not collected and the summary says so. Installed (`make install` has both), they run as usual.
_NEEDS = {"sklearn": ["test_anomaly.py", "test_anomaly_ink.py"], "rdkit": ["test_molecules.py"]}
collect_ignore = [f for module, files in _NEEDS.items() if importlib.util.find_spec(module) is None for f in files]


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if collect_ignore:
        tr.write_line(f"not collected (a package they need is not installed): {', '.join(collect_ignore)}")
    for kind, label, hint in (("realdata", f"real-data tests ({DATA_ROOT})", _DATA_HINT),
                              ("fid_weights", "FID-weights tests", _WEIGHTS_HINT)):
        ran, skipped = _RUN[kind], _SKIPPED[kind]
        if ran or skipped:
            missing = f"; missing: {', '.join(sorted(set(skipped.values())))} ({hint})" if skipped else ""
            tr.write_line(f"{label}: {len(ran)} ran, {len(skipped)} skipped{missing}")


def _inception_layout() -> dict:
    """torch-fidelity's FID Inception state dict with its random initial values (nothing downloaded or loaded)."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    torch.manual_seed(0)
    with mock.patch.object(torch, "load", lambda *a, **k: {}):
        return Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused").state_dict()


@pytest.fixture(scope="session")
def fid_weights_file(tmp_path_factory) -> Path:
    """The real FID weights if built, else stand-in weights of the same layout (random values; see module doc)."""
    if FID_WEIGHTS.is_file():
        return FID_WEIGHTS
    import torch

    path = tmp_path_factory.mktemp("fid") / "stand-in-inception-random.pth"
    torch.save(_inception_layout(), path)
    return path


@pytest.fixture
def fid_weights_env(fid_weights_file, monkeypatch) -> Path:
    """``LEBM_ZOO_FID_WEIGHTS`` pointed at :func:`fid_weights_file`, for recipes whose FID callback sets up."""
    monkeypatch.setenv("LEBM_ZOO_FID_WEIGHTS", str(fid_weights_file))
    return fid_weights_file


@pytest.fixture
def fake_mnist_dir(tmp_path) -> Path:
    """``tmp_path / "mnist"`` holding fake MNIST files (:func:`_data.write_mnist`'s defaults)."""
    data = tmp_path / "mnist"
    data.mkdir()
    write_mnist(data)
    return data
