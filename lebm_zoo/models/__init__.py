"""Model families, one file each. Every model subclasses :class:`EBMModule`."""
from lebm_zoo.models.base import DataShapeError, EBMModule, TrainingDivergedError
from lebm_zoo.models.coopnets import CoopNets
from lebm_zoo.models.flow_contrastive import FlowContrastiveEBM
from lebm_zoo.models.joint_hierarchical import JointHierarchicalEBMPrior
from lebm_zoo.models.language_model import LSTMLanguageModel
from lebm_zoo.models.latent_prior import LatentEBMPrior, LatentPriorBase
from lebm_zoo.models.latent_sequence import SequenceLatentEBMPrior
from lebm_zoo.models.recovery_likelihood import DiffusionRecoveryEBM
from lebm_zoo.models.short_run import ShortRunEBM
from lebm_zoo.models.symbol_vector import SymbolVectorLEBM
from lebm_zoo.models.triangle import DivergenceTriangle

__all__ = ["CoopNets", "DataShapeError", "DiffusionRecoveryEBM", "DivergenceTriangle", "EBMModule",
           "FlowContrastiveEBM", "JointHierarchicalEBMPrior", "LatentEBMPrior", "LatentPriorBase", "LSTMLanguageModel",
           "SequenceLatentEBMPrior", "ShortRunEBM", "SymbolVectorLEBM", "TrainingDivergedError"]
