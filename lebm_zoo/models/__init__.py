"""Model families, one file each: every module here that defines a family registers it with
:func:`~lebm_zoo.models.registry.register_family`, and this package exports what is registered (as
``lebm_zoo.models.<Family>`` and ``lebm_zoo.<Family>``). Every EBM family subclasses :class:`EBMModule`."""
import importlib
import pkgutil

from lebm_zoo.errors import DataShapeError, TrainingDivergedError
from lebm_zoo.models.base import EBMModule
from lebm_zoo.models.latent_prior import LatentPriorBase
from lebm_zoo.models.registry import FAMILIES, register_family

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
globals().update(FAMILIES)

__all__ = ["DataShapeError", "EBMModule", "FAMILIES", "LatentPriorBase", "TrainingDivergedError", "register_family",
           *FAMILIES]
