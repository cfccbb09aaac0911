"""EDM2's post-hoc EMA of any length: `python -m lightning_diffusion.posthoc_ema run_dir=<run> sigma_rel=0.08`.

Writes the reconstruction as a checkpoint that `sample` / `evaluate` read (conf/posthoc_ema.yaml), and a metrics.json
a sweep runner records.
"""

from pathlib import Path

from omegaconf import DictConfig

from .lightning.artifacts import save_json
from .lightning.checkpoints import export_posthoc_ema
from .lightning.errors import entry_point

RECORDED = ("sigma_rel", "gamma", "t", "num_snapshots", "fit_error")


@entry_point("posthoc_ema")
def main(cfg: DictConfig) -> None:
    path, summary = export_posthoc_ema(cfg.run_dir, cfg.sigma_rel, cfg.out, cfg.t, cfg.snapshot_dir)
    if cfg.metrics_dir:  # what a sweep trial records (python -m lightning_diffusion.sweep reads metrics.json)
        save_json(Path(cfg.metrics_dir) / "metrics.json",
                  {f"posthoc_ema/{k}": summary[k] for k in RECORDED} | {"posthoc_ema/ckpt": str(path)})
    print(f"wrote {path}: EMA sigma_rel={summary['sigma_rel']} (gamma={summary['gamma']:.3f}) at step "
          f"{summary['t']} from {summary['num_snapshots']} snapshots, relative profile-fit error "
          f"{summary['fit_error']:.2e}")


if __name__ == "__main__":
    main()
