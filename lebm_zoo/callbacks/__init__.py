"""Metric and visualisation callbacks. They read models only through ``sample``/``reconstruct``."""
from lebm_zoo.callbacks.fid import FIDCallback, FIDWeightsNotFoundError, default_fid_weights
from lebm_zoo.callbacks.reconstruction import ReconstructionMSE
from lebm_zoo.callbacks.samples import SampleGrid

__all__ = ["FIDCallback", "FIDWeightsNotFoundError", "ReconstructionMSE", "SampleGrid", "default_fid_weights"]
