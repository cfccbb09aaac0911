"""Train any family on any data: `python -m lightning_diffusion.train [group=option] [key=value]`."""

import math
from pathlib import Path

import hydra
import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoints import check_checkpoint, model_arguments, save_run_config
from .tracking import register_resolvers

register_resolvers()


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """'last' -> the newest checkpoint of the run, if any (a requeued job resumes); else a path, or None."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":  # the newest of last.ckpt and Lightning's SLURM-requeue hpc_ckpt_*.ckpt
        found = [p for p in [*run_dir.glob("hpc_ckpt_*.ckpt"), run_dir / "checkpoints" / "last.ckpt"] if p.is_file()]
        if not found:
            return None
        ckpt_path = str(max(found, key=lambda p: p.stat().st_mtime))
    elif not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist (use ckpt_path=last to resume from "
                                f"{run_dir}/checkpoints/last.ckpt when present, or ckpt_path=null to start fresh)")
    check_checkpoint(ckpt_path)
    return ckpt_path


def data_meta(shape, num_classes: int, out_factor: int = 1) -> dict:
    """What a network must know of the data, for the `${data_meta.*}` interpolations in conf/network/."""
    return {"shape": list(shape), "channels": shape[0], "image_size": shape[-1], "dim": math.prod(shape),
            "num_classes": num_classes, "out_channels": out_factor * shape[0], "out_dim": out_factor * math.prod(shape)}


class ConfigError(ValueError):
    """A config that cannot run, found before any training compute; the message names the key and the value."""


def make(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, with a constructor's own complaint (bad value, bad pair) raised as a ConfigError."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ if isinstance(err.__cause__, (ValueError, TypeError, FileNotFoundError)) else err
        raise ConfigError(f"{err}" if cause is err else f"{cause} [in {node.get('_target_', 'config')}]") from cause


def dry_run(model, shape) -> None:
    """The model's own one pass on two zero samples, before training.

    The chosen functions are partials whose parameters are only checked when called, and a network/data mismatch
    only shows in a forward pass; both fail here, as ConfigErrors, instead of after the first real batch.
    """
    try:
        model.dry_run(shape)
    except (ValueError, RuntimeError, TypeError) as err:
        raise ConfigError(f"the configured model cannot train on samples of shape {tuple(shape)}: {err}") from err


def make_callback(name: str, node: DictConfig):
    if "_target_" not in node:  # e.g. debug=fast sizing a sample grid that callbacks=autoencoder does not have
        raise ConfigError(f"callbacks.{name} = {OmegaConf.to_container(node)} has no _target_: an override set keys "
                          "of a callback the chosen callbacks config does not have (drop the override, or add "
                          f"callbacks.{name}._target_)")
    return make(node)


def build(cfg: DictConfig):
    """Instantiate data, network, model, callbacks, loggers and trainer from a composed config, checking it first."""
    datamodule = make(cfg.data)
    # `${data_stat:name}` in a config is the datamodule's `name()` (e.g. NCSN's sigma_max = max pairwise distance),
    # computed only if a config asks for it
    OmegaConf.register_new_resolver("data_stat", lambda name: float(getattr(datamodule, name)()), replace=True)
    num_classes = datamodule.num_classes if cfg.conditional else 0
    shape, extra = datamodule.shape, {}
    if cfg.model.get("first_stage"):  # latent diffusion: the family runs on the frozen autoencoder's latents
        extra["first_stage"] = first_stage = make(cfg.model.first_stage)
        try:
            first_stage.check_data(shape)
        except ValueError as err:
            raise ConfigError(f"model.first_stage: {err}") from err
        shape = first_stage.latent_shape
    with open_dict(cfg):
        if cfg.get("sampler"):  # a sampler=<name> choice replaces the family's default sampler
            cfg.model.sampler = cfg.sampler
        cfg.data_meta = data_meta(shape, num_classes, 2 if cfg.model.get("learned_variance") else 1)
    guidance_scale = cfg.guidance_scale if cfg.guidance_scale is not None else (2.0 if num_classes else 1.0)
    model = make(cfg.model, **model_arguments(cfg.model, network=make(cfg.network), sample_shape=shape,
                                              num_classes=num_classes, guidance_scale=guidance_scale, **extra))
    dry_run(model, shape)
    callbacks = [make_callback(name, c) for name, c in (cfg.get("callbacks") or {}).items() if c is not None]
    loggers = [make(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    trainer = make(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=cfg.run_dir)
    try:
        datamodule.split_global_batch(trainer.num_devices * trainer.num_nodes)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict:
    """Fit, then return the final metrics (the callbacks write samples, checkpoints and metrics.json to run_dir)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    if trainer.is_global_zero:
        save_run_config(cfg, cfg.run_dir)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.run_dir))
    if ckpt_path:
        rank_zero_info(f"resuming from {ckpt_path}")
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
