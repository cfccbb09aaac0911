"""Two-sample distances between point clouds x (N, D) and y (M, D), for comparing samplers with true samples.

All are V-statistics (every pair, diagonal included): non-negative, zero for identical clouds, biased by
O(1 / N) against the population value.
"""

import torch
from torch import Tensor


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or len(x) == 0 or len(y) == 0:
        raise ValueError(f"need non-empty (N, D) and (M, D) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float64)
    return x.to(dtype), y.to(dtype)


def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """Squared energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| as a V-statistic (Szekely & Rizzo 2013, eq. 2.1)."""
    x, y = _check_pair(x, y)
    return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()


def mmd_rbf(x: Tensor, y: Tensor, bandwidths=(0.1, 0.3, 1.0, 3.0)) -> Tensor:
    """Squared MMD with the kernel sum_h exp(-|a - b|^2 / (2 h^2)), a V-statistic (Gretton et al. 2012, eq. 5)."""
    x, y = _check_pair(x, y)
    h = torch.as_tensor(bandwidths, dtype=x.dtype).reshape(-1, 1, 1)
    if h.numel() == 0 or (h <= 0).any():
        raise ValueError(f"bandwidths must be a non-empty list of positive numbers, got {bandwidths}")

    def k(a, b):
        return torch.exp(-torch.cdist(a, b)[None] ** 2 / (2 * h**2)).sum(0).mean()

    return k(x, x) + k(y, y) - 2 * k(x, y)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Sliced 2-Wasserstein (E_theta W_2^2(theta^T x, theta^T y))^(1/2), theta uniform on the sphere (Bonneel et al. 2015).

    Each 1-D W_2 compares sorted projections (equal sizes) or quantiles at the max(N, M) mid-levels.
    """
    x, y = _check_pair(x, y)
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    theta = torch.randn(x.shape[1], n_projections, generator=generator, dtype=x.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    if len(px) != len(py):
        levels = (torch.arange(max(len(px), len(py)), dtype=x.dtype) + 0.5) / max(len(px), len(py))
        px, py = torch.quantile(px, levels, dim=0), torch.quantile(py, levels, dim=0)
    return ((px - py) ** 2).mean().sqrt()
