"""lebm-zoo: a PyTorch Lightning model zoo of energy-based generative models.

>>> import lebm_zoo
>>> model = lebm_zoo.load_pretrained("lightning_logs/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
>>> x = model.sample(64)  # (64, C, H, W) in [-1, 1]                                     # doctest: +SKIP
"""
from lebm_zoo._version import __version__
from lebm_zoo.errors import CheckpointError, DataShapeError, TrainingDivergedError  # noqa: E402  (every error class)
from lebm_zoo.models import FAMILIES, EBMModule, LatentPriorBase, register_family  # noqa: E402
from lebm_zoo.pretrained import list_pretrained, load_pretrained  # noqa: E402
from lebm_zoo.samplers import GaussianTiltedTarget, HMCSampler, LangevinSampler, SamplerMixin  # noqa: E402

globals().update(FAMILIES)  # every registered model family: lebm_zoo.LatentEBMPrior, ...

__all__ = [
    "__version__",
    "CheckpointError",
    "DataShapeError",
    "EBMModule",
    "GaussianTiltedTarget",
    "HMCSampler",
    "LangevinSampler",
    "LatentPriorBase",
    "SamplerMixin",
    "TrainingDivergedError",
    "list_pretrained",
    "load_pretrained",
    "register_family",
    *FAMILIES,
]
