"""Plots a person reads: the effective weighting p(logsnr) w(logsnr) of one run or of several overlaid."""

from pathlib import Path

import torch

from .artifacts import atomic_write


def unit_area(grid: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values / their trapezoidal integral over the grid, so curves of different scales share one axis."""
    area = torch.trapezoid(values, grid)
    return values / area if area > 0 else values


def save_effective_weighting_plot(path, grid, curves: dict[str, tuple], title: str) -> Path:
    """One panel per quantity, each curve normalised to unit area over logsnr: the training density p(logsnr) and
    the effective weighting p x w (Kingma & Gao 2023, sec. 2). `curves` maps a label to (density, product)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.as_tensor(grid, dtype=torch.float64)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for label, (density, product) in curves.items():
        for ax, values in zip(axes, (density, product)):
            ax.plot(grid, unit_area(grid, torch.as_tensor(values, dtype=torch.float64)), label=label)
    axes[0].set(title="noise-level density p(logsnr)", xlabel="logsnr = log(alpha^2 / sigma^2)",
                ylabel="density (unit area over logsnr)")
    axes[1].set(title="effective weighting p(logsnr) x w(logsnr)", xlabel="logsnr = log(alpha^2 / sigma^2)",
                ylabel="p x w (unit area over logsnr)")
    if len(curves) > 1:
        axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
