"""The shared LightningDataModules: 2-D toys, exact Gaussian-mixture data, sklearn digits, and image data sets."""

from .base import DiffusionDataModule, from_uint8, to_uint8
from .digits import DigitsDataModule
from .images import ImageDataModule
from .toys import TOYS, GaussianMixtureDataModule, ToyDataModule

__all__ = ["DiffusionDataModule", "DigitsDataModule", "GaussianMixtureDataModule", "ImageDataModule", "TOYS",
           "ToyDataModule", "from_uint8", "to_uint8"]
