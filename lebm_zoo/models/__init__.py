"""Model families, one file each. Every model subclasses :class:`EBMModule`."""
from lebm_zoo.models.base import EBMModule, TrainingDivergedError
from lebm_zoo.models.coopnets import CoopNets
from lebm_zoo.models.latent_prior import LatentEBMPrior
from lebm_zoo.models.short_run import ShortRunEBM

__all__ = ["CoopNets", "EBMModule", "LatentEBMPrior", "ShortRunEBM", "TrainingDivergedError"]
