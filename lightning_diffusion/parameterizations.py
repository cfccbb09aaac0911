"""Network output -> denoiser D(x_t, t) ~ E[x_0 | x_t], for every prediction target.

Every target is one affine form (Karras et al. 2022, eq. 7, written in the unscaled x_t):

    D(x_t, t) = c_skip x_t + c_out F(c_in x_t, c_noise)

with c_in = 1 / sqrt(sigma^2 + alpha^2 sigma_data^2) (unit-variance input; 1 for VP when sigma_data=1)
and c_noise = -logsnr / 8 (= ln(sigma / alpha) / 4, EDM's choice), the same for every target, so any
network runs under any process. A parameterization only states (c_skip, c_out); the training target
F* = (x_0 - c_skip x_t) / c_out and the score (alpha D - x) / sigma^2 follow.
"""

import torch
from torch import Tensor, nn

from .processes import Process, expand_to


class Parameterization:
    """Holds sigma_data and maps (alpha, sigma, d alpha/dt, d sigma/dt) to (c_skip, c_out)."""

    def __init__(self, sigma_data: float = 1.0):
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = sigma_data

    needs_derivatives = False

    def coefficients(self, alpha, sigma, dalpha=None, dsigma=None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def c_in(self, alpha, sigma):
        return (sigma**2 + alpha**2 * self.sigma_data**2).rsqrt()

    def __repr__(self):
        return f"{type(self).__name__}(sigma_data={self.sigma_data})"


class EpsPrediction(Parameterization):
    """F predicts eps: D = (x - sigma F) / alpha (Ho et al. 2020)."""

    def coefficients(self, alpha, sigma, dalpha=None, dsigma=None):
        return 1 / alpha, -sigma / alpha


class X0Prediction(Parameterization):
    """F predicts x_0 directly: D = F."""

    def coefficients(self, alpha, sigma, dalpha=None, dsigma=None):
        return torch.zeros_like(alpha), torch.ones_like(alpha)


class VPrediction(Parameterization):
    """F predicts v = alpha eps - sigma x_0: D = (alpha x - sigma F) / (alpha^2 + sigma^2) (Salimans & Ho 2022)."""

    def coefficients(self, alpha, sigma, dalpha=None, dsigma=None):
        norm = alpha**2 + sigma**2
        return alpha / norm, -sigma / norm


class ScorePrediction(Parameterization):
    """F predicts the score (alpha D - x) / sigma^2, or with `divide_by_sigma` score = F / sigma (NCSNv2, Song & Ermon 2020)."""

    def __init__(self, sigma_data: float = 1.0, divide_by_sigma: bool = True):
        super().__init__(sigma_data)
        self.divide_by_sigma = divide_by_sigma

    def coefficients(self, alpha, sigma, dalpha=None, dsigma=None):
        return 1 / alpha, (sigma if self.divide_by_sigma else sigma**2) / alpha


class EDMPreconditioning(Parameterization):
    """EDM preconditioning in the scaled space x~ = x / alpha, sigma~ = sigma / alpha (Karras et al. 2022, Table 1).

    c_skip = sigma_data^2 / (sigma~^2 + sigma_data^2), c_out = sigma~ sigma_data / sqrt(sigma~^2 + sigma_data^2);
    D(x) = c_skip x~ + c_out F, i.e. c_skip / alpha on the unscaled x.
    """

    def __init__(self, sigma_data: float = 0.5):
        super().__init__(sigma_data)

    def coefficients(self, alpha, sigma, dalpha=None, dsigma=None):
        s, sd = sigma / alpha, self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        return c_skip / alpha, s * sd / (s**2 + sd**2).sqrt()


class FlowVelocity(Parameterization):
    """F predicts the velocity dx_t/dt = alpha' x_0 + sigma' eps (Lipman et al. 2023); for x_t = (1-t) x_0 + t eps, D = x - t F.

    Solving the pair for x_0: D = (sigma' x - sigma F) / (sigma' alpha - alpha' sigma).
    """

    needs_derivatives = True

    def coefficients(self, alpha, sigma, dalpha=None, dsigma=None):
        det = dsigma * alpha - dalpha * sigma
        return dsigma / det, -sigma / det


class Denoiser(nn.Module):
    """D(x_t, t, labels) = c_skip x_t + c_out F(c_in x_t, -logsnr/8, labels): a network seen as a denoiser.

    With `learned_variance`, the network emits twice the channels; the second half is improved DDPM's
    variance interpolation v (Nichol & Dhariwal 2021, eq. 15), returned by `forward_with_variance`.
    """

    def __init__(self, network: nn.Module, parameterization: Parameterization, process: Process,
                 learned_variance: bool = False):
        super().__init__()
        self.network = network
        self.parameterization = parameterization
        self.process = process
        self.learned_variance = learned_variance

    def _coefficients(self, t: Tensor):
        p, t64 = self.process, t.to(torch.float64)
        alpha, sigma = p.alpha(t64), p.sigma(t64)
        dalpha, dsigma = p.derivatives(t64) if self.parameterization.needs_derivatives else (None, None)
        c_skip, c_out = self.parameterization.coefficients(alpha, sigma, dalpha, dsigma)
        c_in = self.parameterization.c_in(alpha, sigma)
        c_noise = -p.logsnr(t64) / 8
        return c_skip, c_out, c_in, c_noise

    def forward_with_variance(self, x: Tensor, t: Tensor, labels: Tensor | None = None):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self._coefficients(t)
        dtype = next(self.network.parameters()).dtype
        out = self.network((expand_to(c_in, x) * x).to(dtype), c_noise.to(dtype), labels).to(x.dtype)
        v = None
        if self.learned_variance:
            out, v = out.chunk(2, dim=1)
            self.last_variance = v.detach()  # read by ancestral sampling, which needs v at the same (x, t)
        return expand_to(c_skip, x) * x + expand_to(c_out, x) * out, v

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.forward_with_variance(x, t, labels)[0]

    def target(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """F* = (x_0 - c_skip x_t) / c_out: what the network output should be (its round trip to D is exact)."""
        c_skip, c_out, _, _ = self._coefficients(torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]))
        return (x0 - expand_to(c_skip, x_t) * x_t) / expand_to(c_out, x_t)


def score_from_denoiser(x: Tensor, denoised: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie: grad log p_t(x) = (alpha D - x) / sigma^2."""
    return (expand_to(alpha, x) * denoised - x) / expand_to(sigma, x) ** 2


def eps_from_denoiser(x: Tensor, denoised: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps_hat = (x - alpha D) / sigma."""
    return (x - expand_to(alpha, x) * denoised) / expand_to(sigma, x)
