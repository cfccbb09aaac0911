"""What every sampler shares: the denoiser signature, batched noise levels, fresh noise, and a checked time grid."""

from collections.abc import Callable

import torch
from torch import Tensor

from ..denoiser import split
from ..processes import Process
from .grids import check_grid

DenoiserFn = Callable[[Tensor, Tensor], Tensor]  # denoiser(x, t) -> D (or Denoised), or denoiser_tilde(x~, sigma~) -> D


def levels(x: Tensor, value: float) -> Tensor:
    """A (B,) float64 tensor of one noise level or time, on x's device."""
    return torch.full((x.shape[0],), value, dtype=torch.float64, device=x.device)


def randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fresh N(0, I) noise shaped, typed and placed like x."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def denoise(denoiser: DenoiserFn, x: Tensor, t: float) -> Tensor:
    """D(x, t) at one time t for the whole batch (a learned variance the denoiser also returns is dropped)."""
    return split(denoiser(x, levels(x, t)))[0]


def check_times(process: Process, times) -> list[float]:
    """A sampler's grid as floats: strictly decreasing, non-negative, inside the process's [0, t_max]."""
    times = check_grid(times, "times")
    if times[0] > process.t_max:
        raise ValueError(f"times must lie in [0, t_max={process.t_max}] of {process!r}, got {times.tolist()}")
    return times.tolist()


def at(process: Process, t: float) -> tuple[float, float]:
    """(alpha(t), sigma(t)) as float64 Python numbers."""
    t = torch.tensor(t, dtype=torch.float64)
    return float(process.alpha(t)), float(process.sigma(t))
