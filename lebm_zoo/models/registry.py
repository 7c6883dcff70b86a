"""The zoo's one list of model families: each family's module registers its class with :func:`register_family`.

From this registry come the exports of :mod:`lebm_zoo` and :mod:`lebm_zoo.models` and the tiny instances the test
suite builds of every family, so adding a family touches its own file (and its tests) only.
"""
from __future__ import annotations

import copy
from typing import Callable, TypeVar

__all__ = ["FAMILIES", "register_family", "tiny_models"]

T = TypeVar("T", bound=type)

#: every model family of the zoo, class name -> class, in the order their modules were imported
FAMILIES: dict[str, type] = {}
#: name -> (class, keyword arguments of its smallest instance): what tests of every family build
_TINY: dict[str, tuple[type, dict]] = {}


def register_family(tiny: dict[str, dict] | None = None) -> Callable[[T], T]:
    """Class decorator: add a model family to the zoo.

    Args:
        tiny: the family's smallest instances, name -> keyword arguments of the class (plain values), e.g.
            ``{"LatentEBMPrior": {"img_size": 28, "channels": 1, "nz": 8, ...}}``; the test suite builds each of them
            (its train, sample, checkpoint, resume, device and metric tests). More than one name gives variants
            (``"FlowContrastiveEBM-2d"``).

    Raises:
        ValueError: if a family or a tiny instance of that name is already registered.
    """
    def add(cls: T) -> T:
        if cls.__name__ in FAMILIES:
            raise ValueError(f"a model family named {cls.__name__} is already registered")
        FAMILIES[cls.__name__] = cls
        for name, kwargs in (tiny or {}).items():
            if name in _TINY:
                raise ValueError(f"a tiny model named {name} is already registered")
            _TINY[name] = (cls, kwargs)
        return cls
    return add


def tiny_models() -> dict[str, Callable[[], object]]:
    """name -> a function building that tiny instance afresh (a deep copy of its arguments each time)."""
    return {name: (lambda cls=cls, kwargs=kwargs: cls(**copy.deepcopy(kwargs))) for name, (cls, kwargs) in
            _TINY.items()}
