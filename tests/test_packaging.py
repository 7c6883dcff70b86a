"""Packaging: the project builds into a wheel with the recipes and, where the folder is present, the registry's weights;
and it still builds without ``lebm_zoo/weights``, which is moved aside when the code is copied to the GPU machine (its
set-up installs the project with ``pip install --no-build-isolation .``)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "lebm_zoo" / "weights"


def _project_copy(dst: Path, with_weights: bool) -> Path:
    """What a build reads (pyproject.toml, setup.py, README.md and the three source trees), without the registry's
    weights, or with its index and one entry."""
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "recipes", dst / "recipes", ignore=skip)
    shutil.copytree(ROOT / "datamodules", dst / "datamodules", ignore=skip)
    no_weights = shutil.ignore_patterns("__pycache__", "*.pyc", "weights")
    shutil.copytree(ROOT / "lebm_zoo", dst / "lebm_zoo", ignore=no_weights)
    if with_weights:  # one registry entry is enough to show they are packed (all of them make a 54 MB wheel)
        (dst / "lebm_zoo" / "weights").mkdir()
        shutil.copy(WEIGHTS / "index.json", dst / "lebm_zoo" / "weights" / "index.json")
        shutil.copytree(WEIGHTS / _entry(), dst / "lebm_zoo" / "weights" / _entry())
    return dst


def _entry() -> str:
    return sorted(p.name for p in WEIGHTS.iterdir() if p.is_dir())[0]


def _wheel_names(src: Path, out: Path) -> list[str]:
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (wheel,) = out.glob("lebm_zoo-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


@pytest.mark.parametrize("with_weights", [True, False], ids=["with-weights", "without-weights"])
def test_the_wheel_holds_code_recipes_and_the_weights_that_are_there(tmp_path, with_weights):
    if with_weights and not WEIGHTS.is_dir():  # as in the copy sent to the GPU machine
        pytest.skip(f"no registry weights at {WEIGHTS} in this copy of the project")
    (tmp_path / "src").mkdir()
    src = _project_copy(tmp_path / "src", with_weights)
    names = _wheel_names(src, tmp_path / "wheel")
    recipes = {Path(n).name for n in names if n.startswith("lebm_zoo/recipes/") and n.endswith(".yaml")}
    assert recipes == {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    for module in ("lebm_zoo/cli/__init__.py", "lebm_zoo/models/__init__.py", "datamodules/__init__.py"):
        assert module in names
    assert any(n.startswith("lebm_zoo-") and n.endswith("/entry_points.txt") for n in names)  # the lebm-zoo command
    weights = {n for n in names if n.startswith("lebm_zoo/weights/")}
    if with_weights:
        entry = _entry()
        files = sorted(p.name for p in (WEIGHTS / entry).iterdir())
        assert weights == {"lebm_zoo/weights/index.json"} | {f"lebm_zoo/weights/{entry}/{f}" for f in files}
        assert any(f.endswith(".safetensors") for f in files)
    else:
        assert weights == set()


@pytest.mark.parametrize("editable_finder", [False, True], ids=["plain-install", "editable-install-elsewhere"])
def test_recipes_are_found_from_a_checkout_that_shadows_the_install(tmp_path, editable_finder):
    """``python3 -m lebm_zoo.cli ...`` or a benchmark script run in a checkout imports the checkout's ``lebm_zoo``,
    ahead of any installed copy; there ``lebm_zoo.recipes`` is not a package (the recipes are top-level ``recipes/``,
    packed as ``lebm_zoo.recipes`` only when installed). The GPU machine runs every command so, over a plain install.
    The checkout's own recipes are found, also where another checkout is installed editable (this environment's
    install maps ``lebm_zoo.recipes`` to this repository's ``recipes/`` for any ``lebm_zoo``)."""
    src = tmp_path / "checkout"
    src.mkdir()
    for tree in ("lebm_zoo", "datamodules", "recipes"):
        shutil.copytree(ROOT / tree, src / tree, ignore=shutil.ignore_patterns("__pycache__", "weights"))
    shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    shutil.copy(src / "recipes" / "mnist_prior.yaml", src / "recipes" / "only_in_this_checkout.yaml")
    drop = "" if editable_finder else \
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)]\n"
    code = (drop + "import lebm_zoo, json; from lebm_zoo.cli.fit import list_recipes, recipe_path\n"
            "print(json.dumps([lebm_zoo.__file__, sorted(list_recipes()), str(recipe_path('mnist_prior'))]))")
    p = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    where, names, path = json.loads(p.stdout.strip().splitlines()[-1])
    assert Path(where).parent == src / "lebm_zoo"  # the checkout's copy, not the installed one
    assert names == sorted([p.stem for p in (ROOT / "recipes").glob("*.yaml")] + ["only_in_this_checkout"])
    assert Path(path) == src / "recipes" / "mnist_prior.yaml"
