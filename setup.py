"""Packaging: all of it is in pyproject.toml except the package list, kept here because one package is optional.

``lebm_zoo.weights`` (the pretrained registry's published weights: JSON and safetensors, no code) is listed only where
its folder is present, so that a copy of the code without it still installs: the copy sent to the GPU machine leaves it
out to stay under 64 MiB, and its set-up installs the project with ``pip install --no-build-isolation .``.
"""
from pathlib import Path

from setuptools import setup

PACKAGES = ["lebm_zoo", "lebm_zoo.cli", "lebm_zoo.models", "lebm_zoo.callbacks", "lebm_zoo.assets", "lebm_zoo.recipes",
            "datamodules"]
if (Path(__file__).resolve().parent / "lebm_zoo" / "weights").is_dir():
    PACKAGES.append("lebm_zoo.weights")

setup(packages=PACKAGES)
