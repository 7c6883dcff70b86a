"""The one registration of the model families: exports, tiny test models, size and resume hyperparameters."""
import importlib
import inspect
import pkgutil

import pytest

import lebm_zoo
import lebm_zoo.models as models
from lebm_zoo.models.base import EBMModule
from lebm_zoo.models.registry import FAMILIES, register_family, tiny_models


def _defined_families() -> set[str]:
    """The public LightningModule classes defined in the files of lebm_zoo/models/ (not imported there)."""
    import pytorch_lightning as pl

    found = set()
    for info in pkgutil.iter_modules(models.__path__):
        module = importlib.import_module(f"lebm_zoo.models.{info.name}")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and obj.__module__ == module.__name__ and issubclass(obj, pl.LightningModule)
                    and not name.startswith("_") and obj not in (EBMModule, models.LatentPriorBase)):
                found.add(name)
    return found


def test_every_family_is_registered_and_exported():
    assert set(FAMILIES) == _defined_families()
    assert len(FAMILIES) >= 10
    for name, cls in FAMILIES.items():
        assert getattr(lebm_zoo, name) is cls and getattr(models, name) is cls
        assert name in lebm_zoo.__all__ and name in models.__all__


def test_every_family_has_a_tiny_model_that_builds():
    tiny = tiny_models()
    assert {type(build()).__name__ for build in tiny.values()} == set(FAMILIES)
    a, b = tiny["LatentEBMPrior"](), tiny["LatentEBMPrior"]()
    assert a is not b and dict(a.hparams) == dict(b.hparams)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_declared_hyperparameters_are_the_familys_own(name):
    cls = FAMILIES[name]
    params = set(inspect.signature(cls.__init__).parameters)
    assert set(cls.resume_hparams) <= params, set(cls.resume_hparams) - params
    assert set(getattr(cls, "size_hparams", ())) <= params
    assert not set(cls.resume_hparams) & set(getattr(cls, "size_hparams", ()))  # a size never changes on resume


@pytest.mark.parametrize("name", sorted(n for n, c in FAMILIES.items() if issubclass(c, EBMModule)))
def test_each_declared_size_is_checked(name):
    cls = FAMILIES[name]
    build = tiny_models()[name]
    tiny_kwargs = build().hparams
    for key in cls.size_hparams:
        if tiny_kwargs.get(key) is None:  # e.g. dim of an image model: not set, nothing to check
            continue
        kwargs = {k: v for k, v in tiny_kwargs.items() if not k.startswith("_")}
        value = kwargs[key]
        kwargs[key] = [0, *value[1:]] if isinstance(value, (list, tuple)) else 0  # per-layer sizes: one bad layer
        with pytest.raises(ValueError, match=f"{key} must be >= 1"):
            cls(**kwargs)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_family()(type("LatentEBMPrior", (EBMModule,), {}))
    assert FAMILIES["LatentEBMPrior"] is lebm_zoo.LatentEBMPrior
