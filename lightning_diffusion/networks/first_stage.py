"""A trained autoencoder, frozen, as latent diffusion's map between data and latents (Rombach et al. 2022)."""

import torch
from torch import Tensor, nn

from .kl_autoencoder import KLAutoencoder, gaussian_sample


class FirstStage(nn.Module):
    """x -> z = s (mu(x) + sigma(x) eps) and z -> Dec(z / s), with the autoencoder frozen and always in eval mode.

    s = 1 / std(z) from the autoencoder's validation latents, so the diffusion runs on unit-variance latents
    (LDM sec. 4.3.2 and appendix G; Stable Diffusion's 0.18215).
    """

    def __init__(self, autoencoder: KLAutoencoder, scale: float):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"the latent scale must be > 0, got {scale}")
        self.autoencoder, self.scale = autoencoder.requires_grad_(False).eval(), float(scale)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: Lightning's model.train() does not switch it

    @property
    def data_shape(self) -> tuple[int, int, int]:
        ae = self.autoencoder
        return (ae.in_channels, ae.image_size, ae.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape

    def check_data(self, shape) -> None:
        if tuple(shape) != self.data_shape:
            raise ValueError(f"the first stage was trained on data of shape {self.data_shape}, but these data are "
                             f"{tuple(shape)}: use the same data (and data.image_size) as the autoencoder's run")

    @torch.no_grad()
    def moments(self, x: Tensor) -> Tensor:
        """[mu, log sigma^2] of q(z | x), unscaled: what a latent cache stores."""
        return self.autoencoder.encode(x)

    def sample(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A scaled latent drawn from cached moments."""
        return self.scale * gaussian_sample(moments, generator)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.sample(self.moments(x), generator)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z / self.scale)
