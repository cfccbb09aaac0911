"""The effective weighting p(logsnr) w(logsnr) of a run, plotted and saved when fitting starts (Kingma & Gao 2023)."""

from pathlib import Path

import torch

from ...core.weightings import effective_weighting
from ..artifacts import atomic_write
from ..models import DiffusionModel
from ..plots import save_effective_weighting_plot
from .base import ForModel
from .samples import log_image


def name(fn) -> str:
    """A weighting's or draw's short name: a Hydra partial's function with its parameters, e.g. p2(k=1, gamma=1)."""
    func, keywords = getattr(fn, "func", fn), getattr(fn, "keywords", {})
    base = getattr(func, "__name__", type(func).__name__)
    return base + (f"({', '.join(f'{k}={v}' for k, v in keywords.items())})" if keywords else "")


class EffectiveWeightingPlot(ForModel):
    """Writes <run_dir>/effective_weighting.{csv,png}: density of logsnr, weight w and their product (the `tables`
    entry point overlays the CSVs of the runs it compares)."""

    model_type = DiffusionModel

    def __init__(self, logsnr_min: float = -15.0, logsnr_max: float = 15.0, points: int = 301):
        if not logsnr_min < logsnr_max or points < 2:
            raise ValueError(f"need logsnr_min < logsnr_max and points >= 2, got {logsnr_min}, {logsnr_max}, {points}")
        self.grid = torch.linspace(logsnr_min, logsnr_max, points, dtype=torch.float64)

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        process = pl_module.process
        density, w, product = effective_weighting(pl_module.weighting, pl_module.noise_levels, process, self.grid,
                                                  spread_atoms=process.discrete)
        run_dir = Path(trainer.default_root_dir)
        rows = ["logsnr,density,weight,effective"] + [
            f"{lam:.6g},{p:.6g},{wi:.6g},{e:.6g}" for lam, p, wi, e in
            zip(self.grid.tolist(), density.tolist(), w.tolist(), product.tolist())]
        atomic_write(run_dir / "effective_weighting.csv", lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))
        title = (f"weighting {name(pl_module.weighting)}, noise-level draw {name(pl_module.noise_levels)}, {process!r}"
                 + (" (each step's mass spread over its logsnr interval)" if process.discrete else ""))
        path = save_effective_weighting_plot(run_dir / "effective_weighting.png", self.grid, {"run": (density, product)},
                                             title)
        log_image(trainer, "effective_weighting", path, trainer.global_step)
