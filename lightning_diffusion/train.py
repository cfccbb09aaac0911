"""Train any family on any data: `python -m lightning_diffusion.train [group=option] [key=value]`."""

from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from .lightning.builder import build
from .lightning.checkpoints import check_same_run, resolve_ckpt_path, save_run_config
from .lightning.distributed import collectives_watched
from .lightning.tracking import register_resolvers

register_resolvers()


def train(cfg: DictConfig) -> dict:
    """Fit, then return the final metrics (the callbacks write samples, checkpoints and metrics.json to run_dir)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.run_dir))
    if ckpt_path:
        check_same_run(cfg, Path(cfg.run_dir))  # before config.yaml is overwritten
        rank_zero_info(f"resuming from {ckpt_path}")
    if trainer.is_global_zero:
        save_run_config(cfg, cfg.run_dir)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    with collectives_watched(str(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for callback in trainer.callbacks:
        metrics.update(getattr(callback, "metrics", {}))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
