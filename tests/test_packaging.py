"""Packaging: the project builds into a wheel with the recipes and, where the folder is present, the registry's weights;
and it still builds without ``lebm_zoo/weights``, which is moved aside when the code is copied to the GPU machine (its
set-up installs the project with ``pip install --no-build-isolation .``)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: one registry entry is enough to show the weights are packed (all of them would make a 54 MB wheel)
ENTRY = sorted(p.name for p in (ROOT / "lebm_zoo" / "weights").iterdir() if p.is_dir())[0]


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
    if with_weights:
        (dst / "lebm_zoo" / "weights").mkdir()
        shutil.copy(ROOT / "lebm_zoo" / "weights" / "index.json", dst / "lebm_zoo" / "weights" / "index.json")
        shutil.copytree(ROOT / "lebm_zoo" / "weights" / ENTRY, dst / "lebm_zoo" / "weights" / ENTRY)
    return dst


def _wheel_names(src: Path, out: Path) -> list[str]:
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (wheel,) = out.glob("lebm_zoo-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


@pytest.mark.parametrize("with_weights", [True, False], ids=["with-weights", "without-weights"])
def test_the_wheel_holds_code_recipes_and_the_weights_that_are_there(tmp_path, with_weights):
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
        files = sorted(p.name for p in (ROOT / "lebm_zoo" / "weights" / ENTRY).iterdir())
        assert weights == {"lebm_zoo/weights/index.json"} | {f"lebm_zoo/weights/{ENTRY}/{f}" for f in files}
        assert any(f.endswith(".safetensors") for f in files)
    else:
        assert weights == set()
