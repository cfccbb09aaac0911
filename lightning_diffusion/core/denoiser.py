"""The denoiser D(x_t, t) ~ E[x_0 | x_t]: the one interface between networks, losses, samplers and likelihoods.

A denoiser is any callable `denoiser(x, t[, labels]) -> D`. With improved DDPM's learned variances (Nichol & Dhariwal
2021, eq. 15) the same network evaluation also gives the variance interpolation v, and the denoiser returns both as
`Denoised(D, v)`; `split` reads either form, so a sampler or a loss that needs v gets it from the call that gave D.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .parameterizations import Parameterization
from .processes import Process, expand_to


class Denoised(NamedTuple):
    """D(x_t, t) and, from the same network evaluation, improved DDPM's variance interpolation v in [-1, 1]."""

    denoised: Tensor
    v: Tensor


def split(output) -> tuple[Tensor, Tensor | None]:
    """(D, v) of a denoiser's output: `Denoised` carries v, a plain tensor is D alone (v = None)."""
    if isinstance(output, Denoised):
        return output.denoised, output.v
    return output, None


class Denoiser(nn.Module):
    """D(x_t, t, labels) = c_skip x_t + c_out F(c_in x_t, c_noise, labels): a network seen as a denoiser.

    c_skip and c_out come from the parameterization, c_in and c_noise from its `c_in` and `c_noise` choices (Karras et al. 2022,
    Table 1). With `learned_variance` the network emits twice the channels; the second half is v, returned with D as
    `Denoised(D, v)`.
    """

    def __init__(self, network: nn.Module, parameterization: Parameterization, process: Process,
                 learned_variance: bool = False):
        super().__init__()
        self.network = network
        self.parameterization = parameterization
        self.process = process
        self.learned_variance = learned_variance

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at times t, float64 (B,)."""
        p, t64 = self.process, t.to(torch.float64)
        alpha, sigma = p.alpha(t64), p.sigma(t64)
        dalpha, dsigma = p.derivatives(t64) if self.parameterization.needs_derivatives else (None, None)
        c_skip, c_out = self.parameterization.coefficients(alpha, sigma, dalpha, dsigma)
        c_in = self.parameterization.c_in(alpha, sigma, self.parameterization.sigma_data)
        return c_skip, c_out, c_in, self.parameterization.c_noise(p, t64)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None, augment_labels: Tensor | None = None):
        """D, or `Denoised(D, v)` with learned variances; augment_labels (EDM's) reach the network only when given."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.coefficients(t)
        dtype = next(self.network.parameters()).dtype
        extra = {} if augment_labels is None else {"augment_labels": augment_labels.to(dtype)}
        out = self.network((expand_to(c_in, x) * x).to(dtype), c_noise.to(dtype), labels, **extra).to(x.dtype)
        v = None
        if self.learned_variance:
            out, v = out.chunk(2, dim=1)
        denoised = expand_to(c_skip, x) * x + expand_to(c_out, x) * out
        return denoised if v is None else Denoised(denoised, v)

    def target(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """F* = (x_0 - c_skip x_t) / c_out: what the network output should be (its round trip to D is exact)."""
        c_skip, c_out, _, _ = self.coefficients(torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]))
        return (x0 - expand_to(c_skip, x_t) * x_t) / expand_to(c_out, x_t)


def score_from_denoiser(x: Tensor, denoised: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie: grad log p_t(x) = (alpha D - x) / sigma^2."""
    return (expand_to(alpha, x) * denoised - x) / expand_to(sigma, x) ** 2


def eps_from_denoiser(x: Tensor, denoised: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps_hat = (x - alpha D) / sigma."""
    return (x - expand_to(alpha, x) * denoised) / expand_to(sigma, x)
