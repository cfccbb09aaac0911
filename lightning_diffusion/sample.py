"""Draw samples from a checkpoint: `python -m lightning_diffusion.sample ckpt_path=... [sampler=... grid.steps=...] n=...`.

Writes a PNG grid and an .npz (samples, labels, nfe) named after the sampler, its grid and NFE (`lightning.sampling`).
"""

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .lightning.artifacts import save_grid, save_npz
from .lightning.checkpoints import find_run_config, load_model
from .lightning.errors import entry_point
from .lightning.sampling import best_device, draw, output_stem, sampling_choice, use_transforms


def sample(cfg: DictConfig) -> Path:
    """Returns the path of the .npz written."""
    model, run_cfg = load_model(cfg.ckpt_path, device=best_device(cfg.device))
    sampler_cfg, grid_cfg = sampling_choice(cfg, run_cfg)
    sampler, grid = instantiate(sampler_cfg), instantiate(grid_cfg)
    transforms = use_transforms(model, cfg, run_cfg)
    x, labels, nfe = draw(model, cfg.n, cfg.batch_size, cfg.seed, sampler, grid, cfg.guidance_scale, cfg.progress)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else find_run_config(cfg.ckpt_path).parent / "samples"
    stem = output_stem(sampler_cfg, grid_cfg, nfe, n=cfg.n, seed=cfg.seed, guidance_scale=cfg.guidance_scale,
                       ckpt=str(Path(cfg.ckpt_path).resolve()), **({"transforms": transforms} if transforms else {}))
    save_grid(x[:256], out_dir / f"{stem}.png", labels[:256] if labels is not None else None)
    path = save_npz(out_dir / f"{stem}.npz", samples=x, labels=labels if labels is not None else torch.empty(0),
                    nfe=nfe)
    print(f"wrote {path} ({cfg.n} samples, {nfe} network evaluations per sample batch)")
    return path


@entry_point("sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
