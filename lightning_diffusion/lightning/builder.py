"""From a composed config to data, model, callbacks, loggers and trainer, with every check before any compute."""

import math

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict


class ConfigError(ValueError):
    """A config that cannot run, found before any training compute; the message names the key and the value."""


def make(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, with a constructor's own complaint (bad value, bad pair) raised as a ConfigError."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ if isinstance(err.__cause__, (ValueError, TypeError, FileNotFoundError)) else err
        raise ConfigError(f"{err}" if cause is err else f"{cause} [in {node.get('_target_', 'config')}]") from cause


def data_meta(shape, num_classes: int, out_factor: int = 1) -> dict:
    """What a network must know of the data (the `data_meta` node the network configs interpolate)."""
    return {"shape": list(shape), "channels": shape[0], "image_size": shape[-1], "dim": math.prod(shape),
            "num_classes": num_classes, "out_channels": out_factor * shape[0], "out_dim": out_factor * math.prod(shape)}


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


def register_data_stats(datamodule, first_stage) -> None:
    """`${data_stat:name}` in a config is the datamodule's `name()` (NCSN's sigma_max = max pairwise distance),
    computed only if a config asks for it, on the first stage's scaled latents when there is one."""
    def stat(name: str) -> float:
        method = getattr(type(datamodule), name, None)
        if method is None:
            raise ConfigError(f"${{data_stat:{name}}}: {type(datamodule).__name__} has no statistic {name!r}")
        encode = first_stage.encode if first_stage is not None else None
        return float(method(datamodule, encode=encode))

    OmegaConf.register_new_resolver("data_stat", stat, replace=True)


def build(cfg: DictConfig):
    """Instantiate data, network, model, callbacks, loggers and trainer from a composed config, checking it first."""
    datamodule = make(cfg.data)
    first_stage = make(cfg.first_stage) if cfg.get("first_stage") else None
    register_data_stats(datamodule, first_stage)
    num_classes = datamodule.num_classes if cfg.conditional else 0
    shape = datamodule.shape
    if first_stage is not None:  # latent diffusion: the family runs on the frozen autoencoder's latents
        try:
            first_stage.check_data(shape)
        except ValueError as err:
            raise ConfigError(f"first_stage: {err}") from err
        shape = first_stage.latent_shape
    with open_dict(cfg):
        cfg.data_meta = data_meta(shape, num_classes, 2 if cfg.model.get("learned_variance") else 1)
        if cfg.get("guidance_scale") is None:  # written down resolved, so the run directory says what it sampled with
            cfg.guidance_scale = 2.0 if num_classes else 1.0
    extra = {"first_stage": first_stage} if first_stage is not None else {}
    model = make(cfg.model, network=make(cfg.network), **extra)
    dry_run(model, shape)
    callbacks = [make_callback(name, c) for name, c in (cfg.get("callbacks") or {}).items() if c is not None]
    loggers = [make(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    trainer = make(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=cfg.run_dir)
    try:
        datamodule.split_global_batch(trainer.num_devices * trainer.num_nodes)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return datamodule, model, trainer
