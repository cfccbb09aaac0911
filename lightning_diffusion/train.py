"""Train any family on any data: `python -m lightning_diffusion.train [group=option] [key=value]`."""

if __name__ == "__main__":  # the process of `python -m`: SIGTERM / SIGUSR1 recorded before the slow imports below
    from lightning_diffusion.lightning.early_signals import record_from_now

    record_from_now()

import sys  # noqa: E402 (after the signal recorder, on purpose)
from contextlib import nullcontext
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from .lightning.builder import build, check_run
from .lightning.checkpoints import (check_same_run, init_from, link_latest, resolve_ckpt_path, run_lock,
                                   save_run_config)
from .lightning.distributed import collectives_watched
from .lightning.early_signals import record_from_now
from .lightning.errors import ConfigError, entry_point
from .lightning.sweep_runner import job_overrides
from .lightning.tracking import register_resolvers

register_resolvers()


def train(cfg: DictConfig) -> dict:
    """Fit, then return the final metrics (the callbacks write samples, checkpoints and metrics.json to run_dir)."""
    check_run(cfg)  # seed and ckpt_path are read before build
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.run_dir))
    if cfg.trainer.get("max_steps") == 0 and not ckpt_path:
        raise ConfigError("trainer.max_steps=0 trains nothing: with ckpt_path=<a checkpoint> it only draws that "
                          "checkpoint's final samples (sweeps/sampler_x_nfe.yaml); to train, give -1 or an int >= 1")
    datamodule, model, trainer = build(cfg)
    # one training per run directory, held by rank 0 (the other ranks are its own processes)
    with run_lock(cfg.run_dir) if trainer.is_global_zero else nullcontext():
        if ckpt_path:
            check_same_run(cfg, Path(cfg.run_dir))  # before config.yaml is overwritten
            rank_zero_info(f"resuming from {ckpt_path}" + (" (init_from is for a fresh start)" if cfg.get("init_from")
                                                           else ""))
        elif cfg.get("init_from"):
            rank_zero_info(f"initialised from {init_from(model, cfg)} (weights only; the EMA starts from them)")
        if trainer.is_global_zero:
            save_run_config(cfg, cfg.run_dir)
            link_latest(cfg)
        for logger in trainer.loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        with collectives_watched(str(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for callback in trainer.callbacks:
        metrics.update(getattr(callback, "metrics", {}))
    return metrics


@entry_point("train")
def hydra_main(cfg: DictConfig) -> None:
    train(cfg)


def main() -> None:
    """The command line, with the job's overrides for every run it starts appended (LIGHTNING_DIFFUSION_OVERRIDES:
    sweep trials under `wandb agent` or the offline runner get the allocation's trainer this way)."""
    record_from_now()  # again for the `ld-train` script, which imports this module first
    sys.argv += job_overrides(consume=True)
    hydra_main()


if __name__ == "__main__":
    main()
