"""LightningDataModules of lebm-zoo (import name ``datamodules``). Batches are ``(x, y)`` with x in [-1, 1]."""
from datamodules.anomaly import MNISTAnomalyDataModule
from datamodules.base import DatasetNotFoundError, ImageDataModule
from datamodules.celeba import CelebA64DataModule
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import MNISTDataModule, QuickstartMNISTDataModule
from datamodules.molecules import ZINCDataModule
from datamodules.semisup import SemiSupervisedDataModule
from datamodules.svhn import SVHNDataModule
from datamodules.text import PTBDataModule, SequenceDataModule
from datamodules.toy import EightGaussiansDataModule
from datamodules.trajectories import SDDDataModule, TrajectoryDataModule
from lebm_zoo.text import Vocabulary  # the models' vocabulary (stored in checkpoints)

__all__ = [
    "CelebA64DataModule",
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "EightGaussiansDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNISTAnomalyDataModule",
    "MNISTDataModule",
    "PTBDataModule",
    "QuickstartMNISTDataModule",
    "SemiSupervisedDataModule",
    "SequenceDataModule",
    "SDDDataModule",
    "SVHNDataModule",
    "TrajectoryDataModule",
    "Vocabulary",
    "ZINCDataModule",
]
