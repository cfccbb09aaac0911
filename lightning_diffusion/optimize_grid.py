"""An optimised grid for a checkpoint: `python -m lightning_diffusion.optimize_grid ckpt_path=... sampler=unipc nfe=10`.

Writes <run_dir>/grids/<sampler>-nfe<N>.json (`lightning.optimized_grids`); sample with it through
`sampler=<sampler> grid=optimized grid.name=<sampler>-nfe<N> grid.ckpt_path=<the same checkpoint>`.
"""

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .lightning.errors import entry_point
from .lightning.optimized_grids import optimize_checkpoint_grid
from .lightning.sampling import best_device


@entry_point("optimize_grid")
def main(cfg: DictConfig) -> None:
    name = HydraConfig.get().runtime.choices.get("sampler")
    path, record = optimize_checkpoint_grid(cfg.ckpt_path, name, cfg.sampler, cfg.grid, cfg.nfe, cfg.n, cfg.seed,
                                            cfg.iterations, cfg.reference_steps, cfg.guidance_scale,
                                            best_device(cfg.device))
    print(f"wrote {path}: {record['steps']} steps ({record['nfe_used']} NFE), squared error to the reference "
          f"{record['start_error']:.3g} -> {record['error']:.3g} in {record['evaluations']} sampler runs")


if __name__ == "__main__":
    main()
