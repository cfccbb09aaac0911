"""LightningModules: one shared base; families are configs on it (conf/model/), plus what is truly their own."""

from .autoencoder import AutoencoderModel
from .base import DiffusionModel

__all__ = ["AutoencoderModel", "DiffusionModel"]
