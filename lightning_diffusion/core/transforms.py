"""Denoiser transforms: D -> D, composable, chosen at sampling; samplers only ever see the resulting D(x, t).

A transform is `transform(denoiser) -> denoiser`, a denoiser being `denoiser(x, t) -> D` (or `Denoised(D, v)`, whose
v passes through). Clipping the predicted x_0 to the data range is what DDPM's sampler does (Ho et al. 2020; diffusers'
`clip_sample`); dynamic thresholding is Imagen's (Saharia et al. 2022, Sec. 2.3).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .denoiser import Denoised, split
from .processes import expand_to

DenoiserFn = Callable[[Tensor, Tensor], Tensor]  # samplers' denoiser (core.samplers.common), which imports this module


def _on_denoised(denoiser: DenoiserFn, change: Callable[[Tensor], Tensor]) -> DenoiserFn:
    """denoiser with `change` applied to its D (a learned variance v is kept as it is)."""

    def transformed(x: Tensor, t: Tensor):
        denoised, v = split(denoiser(x, t))
        return change(denoised) if v is None else Denoised(change(denoised), v)

    return transformed


def clip_x0(denoiser: DenoiserFn, limit: float = 1.0) -> DenoiserFn:
    """D clipped to [-limit, limit], the data range (Ho et al. 2020's sampler; diffusers' clip_sample=True)."""
    if not 0 < limit < float("inf"):
        raise ValueError(f"clip_x0 needs a finite limit > 0, got limit={limit}")
    return _on_denoised(denoiser, lambda d: d.clamp(-limit, limit))


def dynamic_threshold(denoiser: DenoiserFn, percentile: float = 0.995, limit: float = 1.0) -> DenoiserFn:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3): per sample, s = max(q_p(|D|), limit), then
    D <- clip(D, -s, s) / s * limit; with limit = 1, pixels saturate less than under static clipping."""
    if not 0 < percentile <= 1:
        raise ValueError(f"dynamic_threshold needs 0 < percentile <= 1, got percentile={percentile}")
    if not 0 < limit < float("inf"):
        raise ValueError(f"dynamic_threshold needs a finite limit > 0, got limit={limit}")

    def threshold(d: Tensor) -> Tensor:
        s = torch.quantile(d.abs().flatten(1).to(torch.float64), percentile, dim=1).clamp(min=limit).to(d.dtype)
        s = expand_to(s, d)
        return torch.minimum(torch.maximum(d, -s), s) / s * limit

    return _on_denoised(denoiser, threshold)


def apply_transforms(denoiser: DenoiserFn, transforms: Sequence[Callable[[DenoiserFn], DenoiserFn]]) -> DenoiserFn:
    """transforms[-1](... transforms[0](denoiser)): the first listed acts first on D."""
    for transform in transforms:
        denoiser = transform(denoiser)
    return denoiser
