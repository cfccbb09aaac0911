"""Callbacks made for one kind of LightningModule, so a config pairing them with another is refused when built."""

import lightning as L


class ForModel(L.Callback):
    """A callback that reads what only `model_type` has (a diffusion model's sampler, an autoencoder's decoder)."""

    model_type: type[L.LightningModule] = L.LightningModule
