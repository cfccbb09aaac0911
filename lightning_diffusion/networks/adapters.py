"""Published diffusers models behind this project's contracts: `UNet2DModel` as a network F(x, c_noise, labels) and
`AutoencoderKL` as a first stage's autoencoder (moments of q(z | x), decoder).

Both are built from an architecture dict (a model's `config.json`) with random weights; the weights come from a
published checkpoint (`lightning.convert.diffusers_models`) or from a checkpoint of ours. The noise input is the
parameterization's `c_noise`, so a published network reads the input it was trained on: DDPM's 0-based integer
step (`ddpm_step`, diffusers' `timesteps`) for `google/ddpm-cifar10-32`.
"""

from collections.abc import Mapping, Sequence

import diffusers
import torch
from torch import Tensor, nn

# config.json keys that are bookkeeping, not architecture
BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def plain(value):
    """Mappings and sequences (a config system's containers too) as dicts and lists, as config.json holds them."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


def architecture(config: Mapping) -> dict:
    """A diffusers config without its bookkeeping keys, as plain dicts and lists (what `from_config` builds from)."""
    return {k: v for k, v in plain(config).items() if k not in BOOKKEEPING}


class DiffusersUNet(nn.Module):
    """diffusers' `UNet2DModel` (Ho et al. 2020's U-Net as diffusers writes it) as F(x, c_noise, labels).

    c_noise is passed as diffusers' `timestep` (any real number: its sinusoidal embedding takes floats), labels as
    its `class_labels` when the model has a class embedding (`num_class_embeds`).
    """

    def __init__(self, config: Mapping):
        super().__init__()
        self.model = diffusers.UNet2DModel.from_config(architecture(config))
        cfg = self.model.config
        self.in_channels, self.out_channels, self.image_size = cfg.in_channels, cfg.out_channels, cfg.sample_size
        self.num_classes = cfg.num_class_embeds or 0

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DiffusersUNet expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if labels is not None and not self.num_classes:
            raise ValueError("labels were given to an unconditional UNet2DModel (no num_class_embeds); pass "
                             "labels=None (conditional: false)")
        return self.model(x, c_noise, class_labels=labels).sample


class DiffusersAutoencoder(nn.Module):
    """diffusers' `AutoencoderKL` (Rombach et al. 2022; Stable Diffusion's VAE) with `KLAutoencoder`'s interface.

    `encode(x)` gives the moments [mu, log sigma^2] of q(z | x) (log sigma^2 clamped to [-30, 20], as diffusers),
    `decode(z)` the image; both in the unscaled latent space. The network is fully convolutional: `image_size` is
    the data's side (it need not be the config's `sample_size`) and must be divisible by the down-sampling factor.
    """

    def __init__(self, config: Mapping, image_size: int | None = None):
        super().__init__()
        self.model = diffusers.AutoencoderKL.from_config(architecture(config))
        cfg = self.model.config
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.image_size = cfg.sample_size if image_size is None else image_size
        if not (isinstance(self.image_size, int) and self.image_size >= 1) or self.image_size % self.factor:
            raise ValueError(f"AutoencoderKL image_size={self.image_size!r} must be a positive multiple of its "
                             f"down-sampling factor {self.factor} (block_out_channels={list(cfg.block_out_channels)})")
        self.in_channels, self.latent_channels = cfg.in_channels, cfg.latent_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.factor
        return (self.latent_channels, side, side)

    def encode(self, x: Tensor) -> Tensor:
        posterior = self.model.encode(x).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z).sample
