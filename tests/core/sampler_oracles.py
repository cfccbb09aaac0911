"""The oracles the sampler tests share: a 4-D Gaussian, the 8-mode 2-D mixture, and a recording scaled denoiser."""

import math

import torch

from lightning_diffusion.core.oracles import Gaussian, GaussianMixture


def gaussian() -> Gaussian:
    """4-D, full anisotropic covariance (eigenvalues 0.12 .. 3.4), non-zero mean."""
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return Gaussian(torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64),
                    a @ a.T / 4 + 0.1 * torch.eye(4, dtype=torch.float64))


def mixture() -> GaussianMixture:
    """8 modes on a circle of radius 1.5, std 0.15."""
    angle = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    return GaussianMixture.isotropic(1.5 * torch.stack([angle.cos(), angle.sin()], 1), 0.15)


class Recorded:
    """The oracle's D(x~; sigma~) in the scaled space, recording each call's level and input."""

    def __init__(self, g: Gaussian):
        self.g, self.calls = g, []

    def __call__(self, x, sigma):
        self.calls.append((float(sigma.reshape(-1)[0]), x.clone()))
        return self.g.denoise(x, 1.0, sigma).to(x.dtype)
