"""Drawing samples: the prior at a grid's first time, a sampler over the grid, the NFE counted from outside.

`generate(sampler, grid, denoiser, process, shape)` is the one call every caller makes (the training module, `sample`,
`evaluate`, benchmarks): the sampler and the grid are independent choices, so any sampler runs on any grid. NFE is
the number of denoiser calls (`CountingDenoiser`); a guided denoiser from `classifier_free_guidance` is one call, one
batched network evaluation.
"""

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from ..denoiser import Denoised, split
from ..processes import Process
from ..transforms import apply_transforms
from .common import DenoiserFn


class CountingDenoiser:
    """Wraps any denoiser and counts its calls in `.nfe`; `on_call(nfe)` (if given) hears of each one."""

    def __init__(self, denoiser: Callable, on_call: Callable[[int], None] | None = None):
        self.denoiser, self.on_call = denoiser, on_call
        self.nfe = 0

    def __call__(self, *args, **kwargs):
        out = self.denoiser(*args, **kwargs)
        self.nfe += 1
        if self.on_call is not None:
            self.on_call(self.nfe)
        return out


def classifier_free_guidance(denoiser: Callable, labels: Tensor, scale: float, null_label: int) -> DenoiserFn:
    """D = D_u + w (D_c - D_u), both halves in one batched call of denoiser(x, t, labels) (Ho & Salimans 2022, eq. 6).

    w = 1 + Ho & Salimans' w; D is affine in eps at fixed x, so guiding D equals guiding eps. w = 0 is the
    unconditional denoiser, w = 1 the conditional one. Learned variances come from the conditional half.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)

    def guided(x: Tensor, t: Tensor):
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},) to match x, got {tuple(labels.shape)}")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        y = labels.to(x.device)
        # conditional and unconditional halves in one network evaluation
        both, v = split(denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)])))
        d_c, d_u = both.chunk(2)
        guided_d = d_u + scale * (d_c - d_u)
        return guided_d if v is None else Denoised(guided_d, v.chunk(2)[0])

    return guided


def count_nfe(sampler: Callable, grid: Callable, process: Process, shape=(1, 1)) -> int:
    """The denoiser calls `sampler` makes on `grid(process)`, counted on a free stand-in (D = 0) for one sample.

    Exact for every fixed-grid sampler; an adaptive one (`rk45`) steps by its error estimate, so its count on the
    stand-in is only a guide and `generate`'s budget stops it during the real run.
    """
    x = torch.zeros((1, *tuple(shape)[1:]), dtype=torch.float64)
    counted = CountingDenoiser(lambda x, t: torch.zeros_like(x))
    sampler(counted, process, x, grid(process), generator=torch.Generator().manual_seed(0))
    return counted.nfe


def steps_for_nfe(sampler: Callable, grid: Callable, process: Process, nfe: int, max_steps: int = 10_000) -> int:
    """The most grid steps whose `count_nfe` stays within `nfe` (Heun: (nfe + 1) // 2; multistep: nfe); `grid` is
    `grid(process, steps)`. Step counts the sampler refuses (fewer than a multistep order) are passed over;
    ValueError if none fits."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got nfe={nfe}")
    best = 0
    for steps in range(1, max_steps + 1):
        try:
            needed = count_nfe(sampler, partial(grid, steps=steps), process)
        except ValueError:  # a grid shorter than a multistep solver's history (order 4: 3 such), or no such grid
            if best or steps > 4:
                break
            continue
        if needed > nfe:
            break
        best = steps
    if best == 0:
        raise ValueError(f"{getattr(sampler, '__name__', sampler)!r} fits no grid within nfe={nfe} denoiser calls")
    return best


class BudgetDenoiser(CountingDenoiser):
    """A CountingDenoiser that refuses the call beyond `budget` (what stops an adaptive sampler over its NFE)."""

    def __init__(self, denoiser: Callable, on_call: Callable[[int], None] | None, budget: int):
        super().__init__(denoiser, on_call)
        self.budget = budget

    def __call__(self, *args, **kwargs):
        if self.nfe >= self.budget:
            raise RuntimeError(f"the sampler asked for more than nfe={self.budget} denoiser calls (adaptive steps)")
        return super().__call__(*args, **kwargs)


def generate(sampler: Callable, grid: Callable, denoiser: DenoiserFn, process: Process, shape,
             generator: torch.Generator | None = None, device=None, dtype: torch.dtype = torch.float64,
             on_call: Callable[[int], None] | None = None, nfe: int | None = None,
             transforms: Sequence[Callable[[DenoiserFn], DenoiserFn]] = ()) -> tuple[Tensor, int]:
    """Samples and NFE: x ~ N(0, (alpha^2 + sigma^2) I) at t_0 of `grid(process)`, then `sampler` over the grid.

    The prior is the marginal of unit-variance data at the grid's first time (process.prior_sample at t_max).
    Sampling runs in `dtype` (float64 by default, as EDM); the denoiser casts to its network's dtype. `on_call(nfe)`
    is called after every denoiser evaluation (progress reporting stays with the caller). `nfe`, a budget: a sampler
    and grid that would need more denoiser calls are refused with a ValueError before the first one (`count_nfe`),
    and an adaptive sampler is stopped at the budget. `transforms` (core.transforms: x0 clipping, thresholding) act on
    the denoiser here, the one place every sampler's D passes through.
    """
    times = grid(process)
    if nfe is not None:
        needed = count_nfe(sampler, lambda p: times, process, shape)
        if needed > nfe:
            raise ValueError(f"{getattr(sampler, '__name__', type(sampler).__name__)} on this grid of {len(times) - 1} "
                             f"steps needs {needed} denoiser calls, over the budget nfe={nfe}: take fewer grid steps "
                             f"(steps_for_nfe gives the most that fit)")
    t0 = torch.as_tensor(times, dtype=torch.float64)[:1]
    std = float((process.alpha(t0) ** 2 + process.sigma(t0) ** 2).sqrt())
    x = std * torch.randn(shape, generator=generator, device=device, dtype=dtype)
    denoiser = apply_transforms(denoiser, transforms)
    counted = CountingDenoiser(denoiser, on_call) if nfe is None else BudgetDenoiser(denoiser, on_call, nfe)
    x = sampler(counted, process, x, times, generator=generator)
    return x, counted.nfe
