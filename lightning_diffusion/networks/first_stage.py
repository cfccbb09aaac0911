"""A trained autoencoder, frozen, as latent diffusion's map between data and latents (Rombach et al. 2022)."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .kl_autoencoder import gaussian_sample


def standardising_scale(std: Sequence[float], target_std: float = 1.0) -> list[float]:
    """target_std / std per channel: EDM2's latent scale for raw latents of std `std` (Karras et al. 2024, app. C)."""
    if not (std and all(s > 0 for s in std)) or not target_std > 0:
        raise ValueError(f"standardising_scale needs std > 0 per channel and target_std > 0, got std={list(std)}, "
                         f"target_std={target_std}")
    return [float(target_std) / float(s) for s in std]


class FirstStage(nn.Module):
    """x -> z = s (mu(x) + sigma(x) eps - m) and z -> Dec(z / s + m), the autoencoder frozen and always in eval mode.

    The normalisation (scale s, shift m) is a number or one per latent channel: LDM's s = 1 / std(z) of the
    autoencoder's validation latents, m = 0 (LDM sec. 4.3.2, appendix G; Stable Diffusion's and DiT's s = 0.18215),
    or EDM2's per-channel m = mean, s = 0.5 / std of the raw latents (Karras et al. 2024, app. C). The autoencoder is
    any module with `encode(x) -> [mu, log sigma^2]`, `decode(z)`, `in_channels`, `image_size` and `latent_shape`.
    """

    def __init__(self, autoencoder: nn.Module, scale: float | Sequence[float], shift: float | Sequence[float] = 0.0):
        super().__init__()
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        channels = self.latent_shape[0]
        for name, value in (("scale", scale), ("shift", shift)):
            values = torch.as_tensor(value, dtype=torch.float64).flatten()
            if len(values) not in (1, channels):
                raise ValueError(f"the latent {name} must be one number or one per latent channel ({channels}), got "
                                 f"{len(values)}: {values.tolist()}")
        if not (torch.as_tensor(scale, dtype=torch.float64) > 0).all():
            raise ValueError(f"the latent scale must be > 0, got {scale}")
        # buffers that do not persist: the normalisation is the config's, never a checkpoint's
        self.register_buffer("s", self._per_channel(scale), persistent=False)
        self.register_buffer("m", self._per_channel(shift), persistent=False)
        self.scale, self.shift = scale, shift

    @staticmethod
    def _per_channel(value) -> Tensor:
        return torch.as_tensor(value, dtype=torch.float32).flatten().view(1, -1, 1, 1)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: Lightning's model.train() does not switch it

    @property
    def data_shape(self) -> tuple[int, int, int]:
        ae = self.autoencoder
        return (ae.in_channels, ae.image_size, ae.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.autoencoder.latent_shape)

    def check_data(self, shape) -> None:
        if tuple(shape) != self.data_shape:
            raise ValueError(f"the first stage was trained on data of shape {self.data_shape}, but these data are "
                             f"{tuple(shape)}: use the same data (and data.image_size) as the autoencoder's run")

    @torch.no_grad()
    def moments(self, x: Tensor) -> Tensor:
        """[mu, log sigma^2] of q(z | x), unscaled: what a latent cache stores."""
        return self.autoencoder.encode(x)

    def normalise(self, z: Tensor) -> Tensor:
        """Raw latents -> the diffusion's latents s (z - m)."""
        return (z - self.m.to(z)) * self.s.to(z)

    def sample(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A normalised latent drawn from cached moments."""
        return self.normalise(gaussian_sample(moments, generator))

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.sample(self.moments(x), generator)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z / self.s.to(z) + self.m.to(z))
