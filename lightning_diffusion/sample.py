"""Draw samples from a checkpoint: `python -m lightning_diffusion.sample ckpt_path=... [sampler=...] n=...`.

Writes a PNG grid and an .npz (samples, labels, nfe) named after the sampler and its NFE.
"""

from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .artifacts import save_grid, save_npz
from .callbacks.samples import class_labels
from .checkpoints import find_run_config, load_model


def sample(cfg: DictConfig) -> Path:
    """Returns the path of the .npz written."""
    model, run_cfg = load_model(cfg.ckpt_path)
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") else model.sampler
    sampler_name = cfg.sampler._target_.rsplit(".", 1)[-1] if cfg.get("sampler") else "default"
    generator = torch.Generator().manual_seed(cfg.seed)
    labels = class_labels(cfg.n, model.num_classes, model.device)
    chunks, nfe = [], 0
    for start in range(0, cfg.n, cfg.batch_size):
        chunk_labels = labels[start:start + cfg.batch_size] if labels is not None else None
        x, nfe = model.generate(min(cfg.batch_size, cfg.n - start), chunk_labels, cfg.guidance_scale, sampler, generator)
        chunks.append(x.cpu())
    x = torch.cat(chunks)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else find_run_config(cfg.ckpt_path).parent / "samples"
    stem = f"{sampler_name}-nfe{nfe}-n{cfg.n}-seed{cfg.seed}"
    save_grid(x[:256], out_dir / f"{stem}.png", nrow=model.num_classes or None)
    path = save_npz(out_dir / f"{stem}.npz", samples=x, labels=labels if labels is not None else torch.empty(0),
                    nfe=nfe)
    print(f"wrote {path} ({cfg.n} samples, {nfe} network evaluations per sample batch)")
    return path


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
