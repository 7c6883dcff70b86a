"""Metric and visualisation callbacks. They read models only through ``sample(n)``, ``reconstruct(x)`` and
``anomaly_score(x)`` (and ``classify(x)``).

- :class:`AnomalyDetectionCallback`: AUPRC and AUROC of ``anomaly_score`` on labelled normal/anomalous images
  (``test/auprc``, ``test/auroc``).
- :class:`ClassificationAccuracy`: accuracy of ``classify`` on labelled images (``val/accuracy``, ``test/accuracy``);
  :class:`ClassRegionPlot2D`: a 2-D classifier's class regions in latent and data space.
- :class:`FIDCallback`: FID of ``sample`` against real images (``val/fid``, ``test/fid``).
- :class:`MoleculeMetricsCallback`: validity, uniqueness, novelty, diversity and property distances of sampled
  SMILES (RDKit), with property histograms and a molecule grid.
- :class:`PerplexityCallback`: forward/reverse perplexity of sampled text and the NLL of test sentences
  (``test/fppl``, ``test/rppl``, ``test/nll``).
- :class:`ReconstructionMSE`: per-pixel MSE of ``reconstruct`` on held-out images (``val/recon_mse``,
  ``test/recon_mse``) and a PNG of originals above reconstructions.
- :class:`DensityPlot2D`: data, EBM and flow densities of a 2-D model side by side.
- :class:`TrajectoryMetrics`: ADE and FDE, best of K, of trajectory predictions (``val/ade``, ``test/fde``, ...);
  :func:`plot_trajectories`: predicted futures over observed pasts.
- :class:`SyncEvery`: training steps with no host-device synchronisation (the divergence guard reads the losses
  every N batches).
- :class:`BestCheckpoint`: the checkpoint of the best validation score, kept across resumes
  (``lebm-zoo test --ckpt_path best``).
- :class:`SampleGrid`: a PNG grid of ``sample`` with a fixed forked seed, also sent to image-capable loggers.
"""
from lebm_zoo.callbacks.anomaly import AnomalyDetectionCallback
from lebm_zoo.callbacks.checkpoint import BestCheckpoint
from lebm_zoo.callbacks.classification import ClassificationAccuracy, ClassRegionPlot2D
from lebm_zoo.callbacks.density import DensityPlot2D
from lebm_zoo.callbacks.fid import FIDCallback, FIDWeightsNotFoundError, default_fid_weights
from lebm_zoo.callbacks.molecules import MoleculeMetricsCallback
from lebm_zoo.callbacks.perplexity import PerplexityCallback
from lebm_zoo.callbacks.reconstruction import ReconstructionMSE
from lebm_zoo.callbacks.samples import SampleGrid
from lebm_zoo.callbacks.sync import SyncEvery
from lebm_zoo.callbacks.trajectory import TrajectoryMetrics, plot_trajectories

__all__ = ["AnomalyDetectionCallback", "BestCheckpoint", "ClassificationAccuracy", "ClassRegionPlot2D",
           "DensityPlot2D", "FIDCallback", "FIDWeightsNotFoundError", "MoleculeMetricsCallback", "PerplexityCallback",
           "ReconstructionMSE", "SampleGrid", "SyncEvery", "TrajectoryMetrics", "default_fid_weights",
           "plot_trajectories"]
