"""LightningDataModules of lebm-zoo (import name ``datamodules``). Batches are ``(x, y)`` with x in [-1, 1]."""
from datamodules.anomaly import MNISTAnomalyDataModule
from datamodules.images import (
    CelebA64DataModule,
    CIFAR10DataModule,
    DatasetNotFoundError,
    ImageDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    QuickstartMNISTDataModule,
    SVHNDataModule,
)
from datamodules.molecules import ZINCDataModule
from datamodules.text import PTBDataModule, SequenceDataModule, Vocabulary
from datamodules.toy import EightGaussiansDataModule

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
    "SequenceDataModule",
    "SVHNDataModule",
    "Vocabulary",
    "ZINCDataModule",
]
