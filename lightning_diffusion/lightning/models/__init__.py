"""LightningModules: one shared diffusion module (families are configs on it, conf/model/) and the first stage's."""

from .autoencoder import AutoencoderModel
from .diffusion import DiffusionModel

__all__ = ["AutoencoderModel", "DiffusionModel"]
