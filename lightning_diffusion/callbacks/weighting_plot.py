"""The effective weighting p(logsnr) w(logsnr) of a run, plotted and saved when fitting starts (Kingma & Gao 2023)."""

from pathlib import Path

import lightning as L
import torch

from ..artifacts import atomic_write
from ..weightings import effective_weighting
from .samples import log_image


class EffectiveWeightingPlot(L.Callback):
    """Writes <run_dir>/effective_weighting.{csv,png}: density of logsnr, weight w and their product."""

    def __init__(self, logsnr_min: float = -15.0, logsnr_max: float = 15.0, points: int = 301):
        if not logsnr_min < logsnr_max or points < 2:
            raise ValueError(f"need logsnr_min < logsnr_max and points >= 2, got {logsnr_min}, {logsnr_max}, {points}")
        self.grid = torch.linspace(logsnr_min, logsnr_max, points, dtype=torch.float64)

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        density, w, product = effective_weighting(pl_module.weighting, pl_module.noise_levels, pl_module.process,
                                                  self.grid)
        run_dir = Path(trainer.default_root_dir)
        rows = ["logsnr,density,weight,effective"] + [
            f"{lam:.6g},{p:.6g},{wi:.6g},{e:.6g}" for lam, p, wi, e in
            zip(self.grid.tolist(), density.tolist(), w.tolist(), product.tolist())]
        atomic_write(run_dir / "effective_weighting.csv", lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))
        log_image(trainer, "effective_weighting", self._plot(density, w, product, run_dir), trainer.global_step)

    def _plot(self, density, w, product, run_dir: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        for values, label in ((density, "p(logsnr)"), (product / product.max().clamp(min=1e-30), "p x w (scaled)")):
            ax.plot(self.grid, values, label=label)
        ax.set_xlabel("logsnr")
        ax.legend()
        fig.tight_layout()
        try:
            return atomic_write(run_dir / "effective_weighting.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        finally:
            plt.close(fig)
