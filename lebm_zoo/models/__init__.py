"""Model families, one file each. Every model subclasses :class:`EBMModule`."""
from lebm_zoo.models.base import EBMModule, TrainingDivergedError
from lebm_zoo.models.latent_prior import LatentEBMPrior

__all__ = ["EBMModule", "LatentEBMPrior", "TrainingDivergedError"]
