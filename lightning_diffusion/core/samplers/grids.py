"""Grids (discretisations): where a sampler evaluates the denoiser, `grid(process, steps) -> times`.

A grid is a strictly decreasing (steps + 1,) float64 tensor of process times, from the prior end to the clean end
(Karras et al. 2022, Table 1, "time steps"): `uniform_times`, `strided_times` (DDPM's integer steps), `karras_times`
(EDM's rho-grid) and `geometric_times` (NCSN's ladder). In the scaled noise level sigma~ = sigma / alpha,
`karras_sigmas` builds a grid and `sigmas_of_times` / `times_of_sigmas` convert.

Clean end: sigma~ = 0 is time 0 for processes with sigma(0) = 0 (VP, sub-VP, DDPM, EDM, flow); a VESDE never reaches it,
so its grids end at sigma_min (as Song et al.'s VE samplers; `karras_times` does so) and `times_of_sigmas` refuses a 0.
"""

import math

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


def karras_times(process: Process, steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float = 7.0) -> Tensor:
    """`karras_sigmas` between the process's own sigma~(t_min) and sigma~(t_max) (or those given), as process times.

    On a process that never reaches sigma = 0 (VESDE) the steps end at sigma_min instead of 0.
    """
    lowest, highest = process.sigma_tilde_range()
    sigma_min = lowest if sigma_min is None else sigma_min
    sigma_max = highest if sigma_max is None else sigma_max
    if float(process.sigma(torch.zeros((), dtype=torch.float64))) != 0:
        return times_of_sigmas(process, karras_sigmas(steps + 1, sigma_min, sigma_max, rho)[:-1])
    return times_of_sigmas(process, karras_sigmas(steps, sigma_min, sigma_max, rho))


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
