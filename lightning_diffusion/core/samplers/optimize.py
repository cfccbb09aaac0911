"""An optimised time grid for one sampler, NFE and model: the grid whose samples land nearest a many-step reference.

In the spirit of Sabour et al. 2024 ("Align Your Steps") and Chen et al. 2024 ("GITS"): the discretisation error of
a (sampler, grid) pair on a model is measured directly, as the mean squared distance between the sampler's end
points and those of an accurate reference solve of the same ODE from the same prior draws, and the grid's inner
levels are moved to minimise it. The levels are parametrised in log sigma~ by softmax gaps, so every candidate is a
valid decreasing grid; the search is derivative-free (scipy's Powell), started from the best of a few catalog grids.
Deterministic samplers only: a stochastic one has no per-draw reference to align with.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from ..processes import Process
from .common import DenoiserFn
from .grids import check_grid, sigmas_of_times, times_of_sigmas


def grid_error(sampler: Callable, denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor,
               reference: Tensor) -> float:
    """Mean over the draws of ||sampler(x; times) - reference||^2 / dim (the measured discretisation error)."""
    out = sampler(denoiser, process, x, times)
    return float(((out - reference) ** 2).flatten(1).mean(1).mean())


class LogSigmaGrid:
    """Decreasing grids with a fixed first level: inner levels at log sigma~ = u_0 - (u_0 - u_end) cumsum(gaps), the
    gaps softmax(z) above a floor.

    With a clean end (the grid's last time has sigma~ = 0) every positive level after the first is free and the
    lowest stays above the process's own lowest level; otherwise (VESDE) the last positive level is fixed too.
    """

    def __init__(self, process: Process, times: Tensor):
        self.process = process
        sigmas = sigmas_of_times(process, check_grid(times, "times"))
        self.clean_end = float(sigmas[-1]) == 0
        positive = sigmas[sigmas > 0]
        self.free = len(positive) - (1 if self.clean_end else 2)
        if self.free < 1:
            raise ValueError(f"a grid with {len(sigmas) - 1} steps has no inner level to move")
        self.u_first = math.log(float(positive[0]))
        self.u_end = math.log(float(process.sigma_tilde_range()[0]) if self.clean_end else float(positive[-1]))

    def floor(self) -> float:
        """The least gap, a fraction of the log range (1e-3 of it spread over the gaps): softmax alone can make a gap
        underflow and two levels, hence two times, equal."""
        return 1e-3 / (self.free + 1)

    def levels(self, z: np.ndarray) -> Tensor:
        shares = torch.softmax(torch.as_tensor(z, dtype=torch.float64), 0)  # free + 1 gaps summing to 1
        gaps = self.floor() + (1 - (self.free + 1) * self.floor()) * shares
        u = self.u_first - (self.u_first - self.u_end) * torch.cumsum(gaps, 0)[:self.free]
        sigmas = torch.cat([torch.tensor([self.u_first], dtype=torch.float64), u]).exp()
        if not self.clean_end:
            sigmas = torch.cat([sigmas, torch.tensor([math.exp(self.u_end)], dtype=torch.float64)])
        return torch.cat([sigmas, sigmas.new_zeros(1)]) if self.clean_end else sigmas

    def times(self, z: np.ndarray) -> Tensor:
        return times_of_sigmas(self.process, self.levels(z))

    def coordinates(self, times: Tensor) -> np.ndarray:
        """The z of a grid with the same ends (log gaps; softmax is shift-invariant)."""
        sigmas = sigmas_of_times(self.process, times)
        positive = sigmas[sigmas > 0].log()
        u = torch.cat([positive, torch.tensor([self.u_end], dtype=torch.float64)]) if self.clean_end else positive
        gaps = (u[:-1] - u[1:]) / (u[0] - u[-1])
        shares = (gaps - self.floor()) / (1 - (self.free + 1) * self.floor())
        return shares.clamp(min=1e-12).log().numpy()


def optimize_times(sampler: Callable, denoiser: DenoiserFn, process: Process, x: Tensor, reference: Tensor,
                   candidates: Sequence[Tensor], iterations: int = 200) -> tuple[Tensor, dict]:
    """The grid minimising `grid_error` from the best of `candidates` (same step count) with at most `iterations`
    sampler runs; returns (times, {"error": after, "start_error": best candidate's, "candidate_errors": [...]})."""
    if iterations < 1:
        raise ValueError(f"optimize_times needs iterations >= 1, got {iterations}")
    if not candidates or len({len(c) for c in candidates}) != 1:
        raise ValueError(f"optimize_times needs candidate grids of one length, got {[len(c) for c in candidates]}")
    errors = [grid_error(sampler, denoiser, process, x, c, reference) for c in candidates]
    start = candidates[int(np.argmin(errors))]
    param = LogSigmaGrid(process, start)

    def objective(z: np.ndarray) -> float:
        value = grid_error(sampler, denoiser, process, x, param.times(z), reference)
        return value if math.isfinite(value) else 1e30

    result = minimize(objective, param.coordinates(start), method="Powell",
                      options={"maxfev": iterations, "xtol": 1e-3, "ftol": 1e-4})
    best = param.times(result.x) if result.fun < min(errors) else start
    return best, {"error": min(float(result.fun), min(errors)), "start_error": min(errors),
                  "candidate_errors": errors, "evaluations": int(result.nfev)}
