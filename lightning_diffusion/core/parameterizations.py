"""Network output -> denoiser D(x_t, t) ~ E[x_0 | x_t], for every prediction target, and the network's noise input.

Every target is one affine form (Karras et al. 2022, eq. 7, written in the unscaled x_t):

    D(x_t, t) = c_skip x_t + c_out F(c_in x_t, c_noise)

A parameterization states (c_skip, c_out); the training target F* = (x_0 - c_skip x_t) / c_out and the score
(alpha D - x) / sigma^2 follow. The input scaling c_in is its choice: `unit_variance`, 1 / sqrt(sigma^2 + alpha^2
sigma_data^2), for networks trained here (1 for VP when sigma_data = 1), or `unscaled` (c_in = 1) for a published
network that read x_t as it is (score-SDE's sub-VP and VE, EDM's VEPrecond). The noise input c_noise is the
parameterization's choice too (EDM, Table 1): networks
trained here read `quarter_log_sigma` = ln(sigma~) / 4 = -logsnr / 8 under every process, so any network runs under any
process; a published network reads what it was trained on (DDPM's integer step, score-SDE's 999 t, VE's ln(sigma / 2),
iDDPM's nearest step).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from .processes import Process


# ---- noise inputs c_noise(process, t) -> (B,) float64 (Karras et al. 2022, Table 1) ----------------------------------


def quarter_log_sigma(process: Process, t: Tensor) -> Tensor:
    """c_noise = ln(sigma~) / 4 = -logsnr / 8 (EDM's choice, written for any process): the default here."""
    return -process.logsnr(t) / 8


def ddpm_step(process: Process, t: Tensor) -> Tensor:
    """c_noise = t - 1, the 0-based integer step DDPM's networks embed (Ho et al. 2020; diffusers' timesteps)."""
    if not process.discrete:
        raise ValueError(f"ddpm_step is the noise input of a discrete process (DiscreteDDPM), got {process!r}: use "
                         "scaled_time for a continuous VP network")
    return t - 1


def nearest_ddpm_step(process: Process, t: Tensor) -> Tensor:
    """c_noise = i - 1 for the step i in 0..T whose sigma~_i lies nearest sigma~(t): the 0-based step of the table
    level closest to any noise level (EDM's iDDPMPrecond, M - 1 - argmin_j |u_j - sigma| over u_j = sigma~_{M-j};
    Karras et al. 2022, Table 1, for improved DDPM's networks, Nichol & Dhariwal 2021)."""
    if not process.discrete:
        raise ValueError(f"nearest_ddpm_step rounds to the steps of a discrete process (DiscreteDDPM), got {process!r}")
    t = torch.as_tensor(t)
    table = process.sigma_tilde(torch.arange(process.T + 1, dtype=torch.float64, device=t.device))
    distance = (process.sigma_tilde(t.to(torch.float64)).reshape(-1, 1) - table).abs()
    return (distance.argmin(1) - 1).to(torch.float64).reshape(t.shape)


def scaled_time(process: Process, t: Tensor, scale: float = 999.0) -> Tensor:
    """c_noise = scale t: score-SDE's continuous VP / sub-VP networks (Song et al. 2021, 999 t; EDM's VP, (M - 1) t)."""
    return scale * t


def log_sigma(process: Process, t: Tensor, factor: float = 1.0) -> Tensor:
    """c_noise = ln(factor sigma~): EDM's VE preconditioning uses factor 1/2 (Karras et al. 2022, Table 1)."""
    if not factor > 0:
        raise ValueError(f"log_sigma needs factor > 0, got factor={factor}")
    return torch.log(factor * process.sigma_tilde(t))


def sigma_tilde(process: Process, t: Tensor) -> Tensor:
    """c_noise = sigma~ itself: score-SDE's NCSN++ takes the log inside the network (Song et al. 2021)."""
    return process.sigma_tilde(t)


# ---- input scalings c_in(alpha, sigma, sigma_data) -> (B,) (Karras et al. 2022, Table 1) ---------------------------


def unit_variance(alpha: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """c_in = 1 / sqrt(sigma^2 + alpha^2 sigma_data^2): x_t of unit variance (EDM's c_in, written for any process)."""
    return (sigma**2 + alpha**2 * sigma_data**2).rsqrt()


def unscaled(alpha: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """c_in = 1: the network reads x_t as it is (score-SDE's networks, Song et al. 2021; EDM's VEPrecond)."""
    return torch.ones_like(sigma)


class Parameterization:
    """Holds sigma_data, the input scaling and the noise input; maps (alpha, sigma, alpha', sigma') to (c_skip, c_out)."""

    def __init__(self, sigma_data: float = 1.0, c_noise: Callable[[Process, Tensor], Tensor] = quarter_log_sigma,
                 c_in: Callable[[Tensor, Tensor, float], Tensor] = unit_variance):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data, self.c_noise, self.c_in = sigma_data, c_noise, c_in

    needs_derivatives = False

    def coefficients(self, alpha, sigma, dalpha=None, dsigma=None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __repr__(self):
        noise = getattr(self.c_noise, "func", self.c_noise).__name__
        scaling = getattr(self.c_in, "func", self.c_in).__name__
        return f"{type(self).__name__}(sigma_data={self.sigma_data}, c_noise={noise}, c_in={scaling})"


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

    def __init__(self, sigma_data: float = 1.0, divide_by_sigma: bool = True, c_noise: Callable = quarter_log_sigma,
                 c_in: Callable = unit_variance):
        super().__init__(sigma_data, c_noise, c_in)
        self.divide_by_sigma = divide_by_sigma

    def coefficients(self, alpha, sigma, dalpha=None, dsigma=None):
        return 1 / alpha, (sigma if self.divide_by_sigma else sigma**2) / alpha


class EDMPreconditioning(Parameterization):
    """EDM preconditioning in the scaled space x~ = x / alpha, sigma~ = sigma / alpha (Karras et al. 2022, Table 1).

    c_skip = sigma_data^2 / (sigma~^2 + sigma_data^2), c_out = sigma~ sigma_data / sqrt(sigma~^2 + sigma_data^2);
    D(x) = c_skip x~ + c_out F, i.e. c_skip / alpha on the unscaled x.
    """

    def __init__(self, sigma_data: float = 0.5, c_noise: Callable = quarter_log_sigma, c_in: Callable = unit_variance):
        super().__init__(sigma_data, c_noise, c_in)

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
