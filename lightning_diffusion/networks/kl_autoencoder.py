"""Latent diffusion's first stage: a KL-regularised convolutional autoencoder and a patch discriminator.

Rombach et al. 2022 (LDM), sec. 3 and appendix G: the encoder gives a diagonal Gaussian q(z | x) over a latent
f times smaller per side; the decoder maps z back to x. The KL term to N(0, I) is weighted very lightly (~1e-6), so
the latent stays close to a deterministic code; the patch discriminator (Isola et al. 2017) sharpens reconstructions.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Downsample, ResBlock, Upsample, group_norm


def gaussian_sample(moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mu + sigma * eps from moments = [mu, log sigma^2] stacked along channels."""
    mean, logvar = moments.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return mean + (0.5 * logvar).exp() * eps


def gaussian_kl(moments: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per sample, summed over latent entries: 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)."""
    mean, logvar = moments.chunk(2, dim=1)
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class KLAutoencoder(nn.Module):
    """Encoder x -> moments of q(z | x), decoder z -> x; one resolution halving per entry of channel_mult after the first.

    Args:
        in_channels, image_size: of the data; image_size must be divisible by the down-sampling factor.
        latent_channels: channels of z (LDM's "z_channels"; 3-4 for images, 2 here for 8x8 digits).
        channels, channel_mult, num_res_blocks: width and depth, as in the U-Net.
    """

    def __init__(self, in_channels: int, image_size: int, latent_channels: int = 2, channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1):
        super().__init__()
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size} is not divisible by the down-sampling factor {factor} "
                             f"(channel_mult={list(channel_mult)} halves it {len(channel_mult) - 1} times)")
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        self.in_channels, self.image_size, self.latent_channels = in_channels, image_size, latent_channels
        self.factor = factor
        widths = [channels * m for m in channel_mult]

        enc: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(ResBlock(ch, width, None))
                ch = width
            if level < len(widths) - 1:
                enc.append(Downsample(ch, with_conv=True))
        enc += [ResBlock(ch, ch, None), group_norm(ch), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1), ResBlock(ch, ch, None)]
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks):
                dec.append(ResBlock(ch, width, None))
                ch = width
            if level > 0:
                dec.append(Upsample(ch, with_conv=True))
        dec += [group_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.factor
        return (self.latent_channels, side, side)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output weight, where LDM balances the reconstruction and adversarial gradients."""
        return self.decoder[-1].weight

    def encode(self, x: Tensor) -> Tensor:
        """Moments [mu, log sigma^2] of q(z | x), shape (B, 2 latent_channels, H / f, W / f); log sigma^2 clamped."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return torch.cat([mean, logvar.clamp(-30.0, 20.0)], dim=1)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(reconstruction from a posterior sample, moments)."""
        moments = self.encode(x)
        return self.decode(gaussian_sample(moments, generator)), moments


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): strided convs + LeakyReLU, one real/fake logit per receptive-field patch."""

    def __init__(self, in_channels: int, channels: int = 32, num_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), group_norm(2 * ch), nn.LeakyReLU(0.2)]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) (Lim & Ye 2017; LDM's default)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())

