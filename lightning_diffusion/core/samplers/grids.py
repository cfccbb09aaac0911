"""Grids (discretisations): where a sampler evaluates the denoiser, `grid(process, steps) -> times`.

A grid is a strictly decreasing (steps + 1,) float64 tensor of process times, from the prior end to the clean end
(Karras et al. 2022, Table 1, "time steps"): `uniform_times`, `strided_times` (DDPM's integer steps), `karras_times`
(EDM's rho-grid) and `geometric_times` (NCSN's ladder). In the scaled noise level sigma~ = sigma / alpha,
`karras_sigmas` builds a grid and `sigmas_of_times` / `times_of_sigmas` convert.

Clean end: sigma~ = 0 is time 0 for processes with sigma(0) = 0 (VP, sub-VP, DDPM, EDM, flow); a VESDE never reaches it,
so its grids end at sigma_min (as Song et al.'s VE samplers; `karras_times` does so) and `times_of_sigmas` refuses a 0.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..processes import Process

def check_grid(grid, name: str) -> Tensor:
    """A 1-D, finite, non-negative, strictly decreasing float64 grid of at least two points, or ValueError."""
    grid = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"{name} must be a 1-D grid of at least 2 points, got shape {tuple(grid.shape)}")
    if not torch.isfinite(grid).all() or (grid < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {grid.tolist()}")
    if not (grid[1:] < grid[:-1]).all():
        raise ValueError(f"{name} must be strictly decreasing, got {grid.tolist()}")
    return grid


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < n, then 0 (Karras et al. 2022, eq. 5)."""
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1 steps, got {n}")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"karras_sigmas needs 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def uniform_times(process: Process, steps: int, t_min: float | None = None, t_max: float | None = None) -> Tensor:
    """steps + 1 evenly spaced times from t_max down to t_min (Song et al. 2021; NCSN's geometric ladder on a VESDE)."""
    t_min = process.t_min if t_min is None else t_min
    t_max = process.t_max if t_max is None else t_max
    if steps < 1:
        raise ValueError(f"uniform_times needs steps >= 1, got steps={steps}")
    if not 0 <= t_min < t_max:
        raise ValueError(f"uniform_times needs 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
    return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)


def strided_times(T, steps: int) -> Tensor:
    """steps + 1 integer times round(T - i T / steps) from T down to 0 (Nichol & Dhariwal 2021 respacing; DDIM's skip).

    T is the number of DDPM steps or a discrete process (a DiscreteDDPM), so that `strided_times` is also a
    `(process, steps)` grid.
    """
    T = T.T if isinstance(T, Process) and T.discrete else T
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"strided_times needs an integer T >= 1 (or a DiscreteDDPM), got {T!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"strided_times needs 1 <= steps <= T={T}, got steps={steps}")
    return torch.floor(torch.linspace(T, 0, steps + 1, dtype=torch.float64) + 0.5)


def sigmas_of_times(process: Process, times: Tensor) -> Tensor:
    """Scaled noise levels sigma~(t) = sigma(t) / alpha(t) of a time grid (Karras et al. 2022, eq. 4)."""
    times = torch.as_tensor(times, dtype=torch.float64)
    return process.sigma_tilde(times)


def t_of_sigma(process: Process, sigmas: Tensor) -> Tensor:
    """t(sigma~) by the process's bisection, or ValueError if a level lies outside [sigma~(t_min), sigma~(t_max)]."""
    times = process.t_of_sigma_tilde(sigmas)
    if ((sigmas_of_times(process, times) - sigmas).abs() > 1e-6 * sigmas).any():
        ends = sigmas_of_times(process, torch.tensor([process.t_min, process.t_max], dtype=torch.float64)).tolist()
        raise ValueError(f"sigma~ {sigmas.tolist()} lies outside {process!r}'s range [{ends[0]:.4g}, {ends[1]:.4g}]")
    return times


def times_of_sigmas(process: Process, sigmas: Tensor) -> Tensor:
    """Process times of scaled noise levels; sigma~ = 0 maps to t = 0 where the process is clean there (sigma(0) = 0)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    zero = sigmas == 0
    if zero.any() and float(process.sigma(torch.zeros((), dtype=torch.float64))) != 0:
        raise ValueError(f"{process!r} never reaches sigma~ = 0 (sigma(0) > 0): end the grid at a positive sigma~")
    times = torch.zeros_like(sigmas)
    times[~zero] = t_of_sigma(process, sigmas[~zero]).to(times.dtype)
    return times


class Schedule(NamedTuple):
    """sigma(t), d sigma / dt and the inverse t(sigma) of a noise schedule (Karras et al. 2022, Table 1)."""

    sigma: Callable[[float], float]
    dsigma: Callable[[float], float]
    inverse: Callable[[float], float]


def vp_schedule(sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> Schedule:
    """VP's sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), with sigma(epsilon_s) = sigma_min, sigma(1) = sigma_max."""
    beta_d = 2 * (math.log(sigma_min**2 + 1) / epsilon_s - math.log(sigma_max**2 + 1)) / (epsilon_s - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d

    def sigma(t):
        return math.sqrt(math.expm1(0.5 * beta_d * t**2 + beta_min * t))

    return Schedule(sigma, lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t)),
                    lambda s: (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(s**2)) - beta_min) / beta_d)


def levels_as_times(process: Process, steps: int, levels) -> Tensor:
    """A grid from a discretisation of sigma~, `levels(n)` -> n decreasing positive levels: steps of them then 0 on a
    process that reaches sigma = 0, steps + 1 of them (ending at the lowest level) on one that does not (VESDE)."""
    if float(process.sigma(torch.zeros((), dtype=torch.float64))) != 0:
        return times_of_sigmas(process, torch.as_tensor(levels(steps + 1), dtype=torch.float64))
    sigmas = torch.as_tensor(levels(steps), dtype=torch.float64)
    return times_of_sigmas(process, torch.cat([sigmas, sigmas.new_zeros(1)]))


def range_of(process: Process, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    """(sigma_min, sigma_max) given, or the process's own sigma~(t_min) and sigma~(t_max) where None."""
    lowest, highest = process.sigma_tilde_range()
    return lowest if sigma_min is None else sigma_min, highest if sigma_max is None else sigma_max


def karras_times(process: Process, steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float = 7.0) -> Tensor:
    """`karras_sigmas` between the process's own sigma~(t_min) and sigma~(t_max) (or those given), as process times.

    On a process that never reaches sigma = 0 (VESDE) the steps end at sigma_min instead of 0.
    """
    sigma_min, sigma_max = range_of(process, sigma_min, sigma_max)
    return levels_as_times(process, steps, lambda n: karras_sigmas(n, sigma_min, sigma_max, rho)[:-1])


def logsnr_times(process: Process, steps: int, sigma_min: float | None = None,
                 sigma_max: float | None = None) -> Tensor:
    """logSNR-uniform levels, sigma~ geometric from sigma_max to sigma_min, then 0 where the process gets there
    (Lu et al. 2022a's "logSNR" steps; diffusers' use_exponential_sigmas), as process times."""
    sigma_min, sigma_max = range_of(process, sigma_min, sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"logsnr_times needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    return levels_as_times(process, steps, lambda n: torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n,
                                                                    dtype=torch.float64) if n > 1
                           else torch.tensor([sigma_max], dtype=torch.float64))


def vp_times(process: Process, steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
             epsilon_s: float = 1e-3) -> Tensor:
    """EDM's VP discretisation: sigma_VP(t) at t = 1 + i / (N - 1) (epsilon_s - 1), the VP SDE fitted to the range
    (Karras et al. 2022, Table 1; Song et al. 2021's uniform VP grid), as process times."""
    sigma_min, sigma_max = range_of(process, sigma_min, sigma_max)
    sigma = vp_schedule(sigma_min, sigma_max, epsilon_s).sigma
    return levels_as_times(process, steps, lambda n: [sigma(1 + i / max(n - 1, 1) * (epsilon_s - 1)) for i in range(n)])


def iddpm_levels(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> Tensor:
    """Improved DDPM's cosine-schedule noise levels u_M = 0 < ... < u_0 as EDM writes them (Karras et al. 2022,
    Table 1): u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) - 1), abar_j = sin^2(pi j / (2 M (C_2 + 1)))."""
    abar = torch.sin(0.5 * math.pi * torch.arange(M + 1, dtype=torch.float64) / M / (C_2 + 1)) ** 2
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(float(abar[j - 1] / abar[j]), C_1) - 1)
    return torch.tensor(u, dtype=torch.float64)


def iddpm_times(process: Process, steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
                M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> Tensor:
    """EDM's iDDPM discretisation: N evenly strided levels of `iddpm_levels` inside [sigma_min, sigma_max] (Karras
    et al. 2022, Table 1), as process times."""
    sigma_min, sigma_max = range_of(process, sigma_min, sigma_max)
    u = iddpm_levels(M, C_1, C_2)
    inside = u[(u >= sigma_min) & (u <= sigma_max)]
    if len(inside) < 2:
        raise ValueError(f"iddpm_times: fewer than 2 of iDDPM's levels lie in [{sigma_min}, {sigma_max}]")

    def pick(n: int) -> Tensor:
        if n > len(inside):
            raise ValueError(f"iddpm_times: {n} levels asked, only {len(inside)} of iDDPM's M={M} lie in the range")
        return inside[torch.round((len(inside) - 1) / max(n - 1, 1) * torch.arange(n)).long()]

    return levels_as_times(process, steps, pick)


def time_quadratic_times(process: Process, steps: int, t_min: float | None = None,
                         t_max: float | None = None) -> Tensor:
    """steps + 1 times t_min + (t_max - t_min) (1 - i / steps)^2: dense near the data (DDIM's "quadratic" skip,
    Song et al. 2021a, app. D.2)."""
    uniform = uniform_times(process, steps, t_min, t_max)
    lo, hi = float(uniform[-1]), float(uniform[0])
    return lo + (hi - lo) * ((uniform - lo) / (hi - lo)) ** 2


def geometric_times(process: Process, steps: int, sigma_min: float | None = None,
                    sigma_max: float | None = None) -> Tensor:
    """steps + 1 times whose sigma~ fall geometrically from sigma_max to sigma_min, each kept inside the process's range.

    NCSN's ladder sigma_i = sigma_1 (sigma_L / sigma_1)^((i-1)/(L-1)) (Song & Ermon 2019) on any process: evenly
    spaced in logsnr. On a VESDE with its own range it equals `uniform_times`.
    """
    lowest, highest = (float(s) for s in process.sigma_tilde_range())
    sigma_min = lowest if sigma_min is None else max(sigma_min, lowest)
    sigma_max = highest if sigma_max is None else min(sigma_max, highest)
    if steps < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"geometric_times needs steps >= 1 and 0 < sigma_min < sigma_max, got steps={steps}, "
                         f"sigma_min={sigma_min}, sigma_max={sigma_max}")
    sigmas = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), steps + 1, dtype=torch.float64)
    return times_of_sigmas(process, sigmas)
