"""Stochastic samplers in EDM's scaled space (alpha = 1), k-diffusion's: `solver(denoiser_tilde, x~, sigmas, generator)`.

Run on a process by `pf_ode` like the deterministic solvers. Ancestral ones step deterministically down to
sigma_down and add noise sigma_up (sigma_down^2 + sigma_up^2 = sigma_next^2, `ancestral_levels`); the SDE ones are
DPM-Solver++ on the reverse SDE (Lu et al. 2022b, sec. 5; k-diffusion). Every one takes `eta` (0: deterministic,
1: the full noise), `s_noise` (a factor on the added noise) and `noise`, the noise source (`brownian`): fresh
Gaussian draws, or increments of one Brownian path so the sample does not depend on the step count's draws. No noise
is added on the step to sigma~ = 0.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .brownian import brownian_noise, gaussian_noise
from .common import DenoiserFn, levels
from .grids import check_grid
from .multistep import dpm_solver_pp_multistep

NoiseSource = Callable  # noise(x, sigmas, generator) -> draw(sigma, sigma_next), see `brownian`


def ancestral_levels(s: float, s_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): sigma_up = min(s', eta s' sqrt(s^2 - s'^2) / s), sigma_down = sqrt(s'^2 - sigma_up^2).

    The DDPM posterior's noise for the step s -> s' in the scaled space, eta times (Song et al. 2021a, eq. 16 with
    eta; k-diffusion's get_ancestral_step).
    """
    sigma_up = min(s_next, eta * s_next * math.sqrt(max(s**2 - s_next**2, 0.0)) / s)
    return math.sqrt(s_next**2 - sigma_up**2), sigma_up


def check_noise(name: str, eta: float, s_noise: float) -> None:
    """ValueError unless eta >= 0 and s_noise >= 0, naming the value."""
    if eta < 0 or s_noise < 0:
        raise ValueError(f"{name} needs eta >= 0 and s_noise >= 0, got eta={eta}, s_noise={s_noise}")


def euler_ancestral(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0,
                    noise: NoiseSource = gaussian_noise, generator: torch.Generator | None = None) -> Tensor:
    """Euler to sigma_down, then noise sigma_up s_noise z (k-diffusion's sample_euler_ancestral; eta = 1 is DDPM's
    ancestral step in Euler form, diffusers' EulerAncestralDiscreteScheduler)."""
    check_noise("euler_ancestral", eta, s_noise)
    sigmas = check_grid(sigmas, "sigmas")
    draw = noise(x, sigmas, generator)
    sigmas = sigmas.tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser_tilde(x, levels(x, s))) / s
        s_down, s_up = ancestral_levels(s, s_next, eta)
        x = x + (s_down - s) * d
        if s_next > 0:
            x = x + draw(s, s_next) * (s_up * s_noise)
    return x


def dpm_solver_pp_2s_ancestral(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, eta: float = 1.0,
                               s_noise: float = 1.0, noise: NoiseSource = gaussian_noise,
                               generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(2S) to sigma_down with the midpoint in lambda as its stage, then ancestral noise (Lu et al.
    2022b, Alg. 1; k-diffusion's sample_dpmpp_2s_ancestral). 2 calls per step (1 where sigma_down = 0)."""
    check_noise("dpm_solver_pp_2s_ancestral", eta, s_noise)
    sigmas = check_grid(sigmas, "sigmas")
    draw = noise(x, sigmas, generator)
    sigmas = sigmas.tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = denoiser_tilde(x, levels(x, s))
        s_down, s_up = ancestral_levels(s, s_next, eta)
        if s_down == 0:
            x = d  # the Euler step to 0 lands on D
        else:
            # data-prediction step to the lambda-midpoint, then the full step with the D found there
            s_mid = math.sqrt(s * s_down)
            x_mid = (s_mid / s) * x + (1 - s_mid / s) * d
            x = (s_down / s) * x + (1 - s_down / s) * denoiser_tilde(x_mid, levels(x, s_mid))
        if s_next > 0:
            x = x + draw(s, s_next) * (s_up * s_noise)
    return x


def dpm_solver_pp_sde(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, eta: float = 1.0, s_noise: float = 1.0,
                      r: float = 0.5, noise: NoiseSource = brownian_noise,
                      generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++ SDE: a stochastic 2nd-order singlestep method with its stage at lambda + r h, ancestral noise in
    both half steps (Lu et al. 2022b, sec. 5; k-diffusion's sample_dpmpp_sde, diffusers' DPMSolverSDEScheduler)."""
    check_noise("dpm_solver_pp_sde", eta, s_noise)
    if not 0 < r <= 1:
        raise ValueError(f"dpm_solver_pp_sde needs 0 < r <= 1, got r={r}")
    sigmas = check_grid(sigmas, "sigmas")
    draw = noise(x, sigmas, generator)
    sigmas = sigmas.tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = denoiser_tilde(x, levels(x, s))
        if s_next == 0:
            x = d
            continue
        s_stage = s * (s_next / s) ** r  # lambda + r h
        # stage: ancestral data-prediction step to s_stage
        s_down, s_up = ancestral_levels(s, s_stage, eta)
        x_stage = (s_down / s) * x + (1 - s_down / s) * d + draw(s, s_stage) * (s_up * s_noise)
        d_stage = denoiser_tilde(x_stage, levels(x, s_stage))
        # full step with D blended towards the stage's (weight 1 / 2r)
        s_down, s_up = ancestral_levels(s, s_next, eta)
        d_mix = (1 - 1 / (2 * r)) * d + (1 / (2 * r)) * d_stage
        x = (s_down / s) * x + (1 - s_down / s) * d_mix + draw(s, s_next) * (s_up * s_noise)
    return x


def dpm_solver_pp_2m_sde(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, eta: float = 1.0,
                         s_noise: float = 1.0, solver_type: str = "midpoint", noise: NoiseSource = brownian_noise,
                         generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE, "midpoint" or "heun" 2nd-order term (Lu et al. 2022b; k-diffusion's sample_dpmpp_2m_sde)."""
    check_noise("dpm_solver_pp_2m_sde", eta, s_noise)
    draw = noise(x, check_grid(sigmas, "sigmas"), generator)
    return dpm_solver_pp_multistep(denoiser_tilde, x, sigmas, order=2, solver_type=solver_type, eta=eta,
                                   s_noise=s_noise, noise=draw)


def dpm_solver_pp_3m_sde(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, eta: float = 1.0,
                         s_noise: float = 1.0, noise: NoiseSource = brownian_noise,
                         generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde); eta = 0 is DPM-Solver++(3M) with "heun" 2nd order."""
    check_noise("dpm_solver_pp_3m_sde", eta, s_noise)
    draw = noise(x, check_grid(sigmas, "sigmas"), generator)
    return dpm_solver_pp_multistep(denoiser_tilde, x, sigmas, order=3, solver_type="heun", eta=eta, s_noise=s_noise,
                                   noise=draw)
