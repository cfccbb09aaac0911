"""PF-ODE solvers, written once in EDM's scaled space, and `pf_ode`, the sampler that runs any of them on a process.

A solver is `solver(denoiser_tilde, x~, sigmas, generator=None, **opts) -> x~` on dx~/dsigma~ = (x~ - D) / sigma~
(Karras et al. 2022, eq. 4), with x~ = x / alpha and sigma~ = sigma / alpha, so one Heun serves VP, VE, EDM, DDPM and
flow models alike; `scaled_denoiser` makes `denoiser_tilde(x~, sigma~)` from a process-time denoiser. `pf_ode` is the
sampler: it maps a process's time grid to sigma~, runs the solver and scales back. The multistep and singlestep
solvers (`multistep`, `singlestep`) and the stochastic ones (`ancestral_sde`) share the signature.
"""

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from ..denoiser import split
from ..processes import Process, expand_to
from .common import DenoiserFn, check_times, levels, randn
from .grids import check_grid, sigmas_of_times, t_of_sigma


def scaled_denoiser(denoiser: DenoiserFn, process: Process, known: dict[float, float] | None = None) -> DenoiserFn:
    """EDM's D(x~; sigma~) from a process-time denoiser: D = denoiser(alpha(t) x~, t) at t = t(sigma~) (Karras et al. 2022).

    `known` maps sigma~ values to their times (a solver's grid), so only levels off the grid need the bisection.
    """
    known = known or {}

    def denoiser_tilde(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        # invert logsnr once per distinct level (usually one per call), by table when the level is on the grid
        distinct, inverse = torch.unique(sigma, return_inverse=True)
        if distinct.numel() == 1 and float(distinct) in known:
            t = torch.full_like(sigma, known[float(distinct)])
        else:
            t = t_of_sigma(process, distinct)[inverse]
        return split(denoiser(expand_to(process.alpha(t), x) * x, t))[0]

    return denoiser_tilde


def euler(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, generator=None) -> Tensor:
    """Euler's method on dx~/dsigma~ = (x~ - D) / sigma~ (Karras et al. 2022, eq. 4; DDIM with eta = 0 in disguise)."""
    sigmas = check_grid(sigmas, "sigmas").tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser_tilde(x, levels(x, s))) / s  # dx~/dsigma~ at s
        x = x + (s_next - s) * d
    return x


def churn(x: Tensor, s: float, n: int, S_churn: float, S_tmin: float, S_tmax: float, S_noise: float,
          generator: torch.Generator | None) -> tuple[Tensor, float]:
    """EDM's churn: raise sigma~ to s_hat = s (1 + gamma), gamma = min(S_churn / n, sqrt 2 - 1) inside [S_tmin, S_tmax],
    by adding noise of std sqrt(s_hat^2 - s^2) S_noise (Karras et al. 2022, Alg. 2, lines 4-6). Returns (x, s_hat)."""
    gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= s <= S_tmax else 0.0
    s_hat = s * (1 + gamma)
    if gamma > 0:
        x = x + math.sqrt(s_hat**2 - s**2) * S_noise * randn(x, generator)
    return x, s_hat


def check_churn(name: str, S_churn: float, S_noise: float) -> None:
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"{name} needs S_churn >= 0 and S_noise >= 0, got S_churn={S_churn}, S_noise={S_noise}")


def heun(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, S_churn: float = 0.0, S_tmin: float = 0.0,
         S_tmax: float = math.inf, S_noise: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Heun's 2nd-order method with optional churn (Karras et al. 2022, Alg. 2; S_churn = 0 is Alg. 1)."""
    sigmas = check_grid(sigmas, "sigmas").tolist()
    check_churn("heun", S_churn, S_noise)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x, s_hat = churn(x, s, len(sigmas) - 1, S_churn, S_tmin, S_tmax, S_noise, generator)
        # Euler step from s_hat to s_next
        d = (x - denoiser_tilde(x, levels(x, s_hat))) / s_hat
        x_next = x + (s_next - s_hat) * d
        # trapezoidal correction, skipped on the step to sigma = 0
        if s_next > 0:
            d_next = (x_next - denoiser_tilde(x_next, levels(x, s_next))) / s_next
            x_next = x + (s_next - s_hat) * (d + d_next) / 2
        x = x_next
    return x


def rk45(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, rtol: float = 1e-5, atol: float = 1e-5,
         generator=None) -> Tensor:
    """Adaptive Dormand-Prince RK45 (scipy) on dx~/d log sigma~ = x~ - D (Song et al. 2021, sec. D.1).

    Integrates from sigmas[0] to the smallest positive sigma of the grid (the grid's inner points are
    ignored), then, if the grid ends at 0, one final denoising D(x~; sigma_min). The batch is one ODE system,
    so all samples share the step sizes; NFE = scipy's nfev (+ 1 for the final denoise).
    """
    sigmas = check_grid(sigmas, "sigmas")
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rk45 needs rtol > 0 and atol > 0, got rtol={rtol}, atol={atol}")
    positive = sigmas[sigmas > 0].tolist()
    shape, dtype = x.shape, x.dtype

    def rhs(u: float, y: np.ndarray) -> np.ndarray:
        x_u = torch.from_numpy(y).reshape(shape).to(dtype=dtype, device=x.device)
        return (x_u - denoiser_tilde(x_u, levels(x_u, math.exp(u)))).flatten().double().cpu().numpy()

    if len(positive) > 1 or positive[0] != positive[-1]:
        y0 = x.detach().flatten().double().cpu().numpy()
        sol = solve_ivp(rhs, (math.log(positive[0]), math.log(positive[-1])), y0, method="RK45", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"rk45 failed: {sol.message}")
        x = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(dtype=dtype, device=x.device)
    if sigmas[-1] == 0:
        x = denoiser_tilde(x, levels(x, positive[-1]))  # last step to sigma~ = 0
    return x


def pf_ode(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor, solver: Callable = heun,
           generator: torch.Generator | None = None) -> Tensor:
    """Any scaled-space solver on a process time grid: x~ = x / alpha(t_0), solved over sigma~(times), times alpha(t_N).

    The stochastic scaled-space samplers (`ancestral_sde`: Euler ancestral, the DPM-Solver++ SDEs) run here too: on
    x~ their noise is that of the process, scaled by 1 / alpha.
    """
    times = torch.tensor(check_times(process, times), dtype=torch.float64)
    alpha_first, alpha_last = process.alpha(times[[0, -1]]).tolist()
    if alpha_first <= 0:
        raise ValueError(f"pf_ode needs alpha(times[0]) > 0 (sigma~ finite), got alpha({float(times[0])}) = {alpha_first} "
                         f"for {process!r}: start the grid earlier (e.g. t_max < 1 for RectifiedFlow) or use ddim")
    sigmas = sigmas_of_times(process, times)
    known = dict(zip(sigmas.tolist(), times.tolist()))  # the grid's own times: no bisection on the grid
    x = solver(scaled_denoiser(denoiser, process, known), x / alpha_first, sigmas, generator=generator)
    return alpha_last * x
