"""Encode a data set once into latents on disk: `python -m lightning_diffusion.encode_latents data=<data>
first_stage=<first stage> out_dir=<folder> [devices=N]`, then train with `data=latents data.path=<folder>
model.latent_cache=true first_stage=<the same first stage>`.

Shards are split across the ranks (Fabric DDP with devices > 1) and written atomically; run it again after a kill
and it encodes only the shards that are missing (`lightning.latents`).
"""

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from .lightning.errors import entry_point
from .lightning.latents import encode_latents


@entry_point("encode_latents")
def main(cfg: DictConfig) -> None:
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy, num_nodes=cfg.num_nodes)
    fabric.launch()
    first_stage = instantiate(cfg.first_stage).to(fabric.device)
    manifest = encode_latents(instantiate(cfg.data), first_stage, cfg.out_dir, cfg.data, cfg.first_stage,
                              cfg.shard_size, cfg.batch_size, cfg.flips, cfg.dtype, fabric.global_rank,
                              fabric.world_size, fabric.barrier, fabric.all_gather if fabric.world_size > 1 else None)
    if fabric.global_rank == 0:
        print(f"{cfg.out_dir}: {manifest['num_images']} images in {manifest['num_shards']} shards "
              f"(encoded now per rank: {manifest['encoded_per_rank']})")


if __name__ == "__main__":
    main()
