"""From a composed config to data, model, callbacks, loggers and trainer, with every check before any compute."""

import math

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from . import schema
from .callbacks.base import ForModel
from .errors import ConfigError


def make(node: DictConfig, key: str = "", **kwargs):
    """hydra.utils.instantiate, with a constructor's own complaint (bad value, bad pair) raised as a ConfigError that
    names the dotted keys (under `key`) of the node's values the complaint mentions."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ if isinstance(err.__cause__, (ValueError, TypeError, OSError)) else err
        if cause is err:
            raise ConfigError(str(err)) from err
        named = [f"{key}.{name}={node[name]}" for name in node if not name.startswith("_") and name in str(cause)
                 and not isinstance(node[name], DictConfig)]
        raise ConfigError(f"{', '.join(named) + ': ' if named else ''}{cause} [in {node.get('_target_', key)}]") \
            from cause


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
        chosen = ", ".join(choice(group) for group in ("model", "network", "data", "sampler", "grid"))
        raise ConfigError(f"this combination ({chosen}) cannot train and sample on samples of shape {tuple(shape)}: "
                          f"{err}") from err


def make_callback(name: str, node: DictConfig):
    if "_target_" not in node:  # e.g. debug=fast sizing a sample grid that callbacks=autoencoder does not have
        raise ConfigError(f"callbacks.{name} = {OmegaConf.to_container(node)} has no _target_: an override set keys "
                          "of a callback the chosen callbacks config does not have (drop the override, or add "
                          f"callbacks.{name}._target_)")
    return make(node, f"callbacks.{name}")


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


def choice(group: str) -> str:
    """The group's option on the command line (`callbacks=default`), as Hydra composed it, for error messages."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return f"{group}=?"
    return f"{group}={HydraConfig.get().runtime.choices.get(group)}"


def check_pairs(model, callbacks: dict) -> None:
    """Each callback made for one kind of model (ForModel) is refused, naming both choices, with another."""
    for name, callback in callbacks.items():
        if isinstance(callback, ForModel) and not isinstance(model, callback.model_type):
            raise ConfigError(f"{choice('callbacks')} has callbacks.{name} ({type(callback).__name__}), made for the "
                              f"model {callback.model_type.__name__}, but {choice('model')} builds {type(model).__name__}: "
                              "pick callbacks of this model (e.g. callbacks=autoencoder with experiment=autoencoder)")


# the sampler and grid before the model, which interpolates them: a fault is named by its key on the command line
ALL_PARTS = ("first_stage", "sampler", "grid", "network", "model", "trainer", "callbacks", "logger")


def check_run(cfg: DictConfig) -> None:
    """The run's own keys (seed, ckpt_path, ...), which the entry point reads before it builds anything."""
    schema.check(cfg, schema.TOP_LEVEL)


def build(cfg: DictConfig, read_data: bool = True):
    """Instantiate data, network, model, callbacks, loggers and trainer from a composed config, checking it first.

    `read_data=False` (an import, which only converts weights): the data set's shape and labels come from its config
    (the data module's constructor reads no images), and its source is not looked for.
    """
    check_run(cfg)
    schema.check(cfg, ("data",))
    datamodule = make(cfg.data, "data")
    try:
        if read_data:
            datamodule.check_source()
    except OSError as err:  # ConnectionError: a Hub data set offline and not cached
        raise ConfigError(f"data: {err}") from err
    schema.check(cfg, ("first_stage",))
    first_stage = make(cfg.first_stage, "first_stage") if cfg.get("first_stage") else None
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
    schema.check(cfg, ALL_PARTS[1:])
    if cfg.model.get("augment") and cfg.data.get("hflip"):  # EDM turns its data's x-flips off with --augment
        raise ConfigError("model.augment (augment=edm) draws labelled x-flips, but data.hflip=true flips images "
                          "without a label (which the network would learn as un-flipped): set data.hflip=false")
    extra = {"first_stage": first_stage} if first_stage is not None else {}
    try:
        network = make(cfg.network, "network")
    except ConfigError as err:
        raise ConfigError(f"{choice('network')} cannot serve {choice('data')} (samples of shape {tuple(shape)}): "
                          f"{err}") from err
    model = make(cfg.model, "model", network=network, **extra)
    dry_run(model, shape)
    callbacks = {name: make_callback(name, c) for name, c in (cfg.get("callbacks") or {}).items() if c is not None}
    check_pairs(model, callbacks)
    loggers = [make(lg, f"logger.{name}") for name, lg in (cfg.get("logger") or {}).items() if lg is not None]
    trainer = make(cfg.trainer, "trainer", callbacks=list(callbacks.values()), logger=loggers or False,
                   default_root_dir=cfg.run_dir)
    try:
        datamodule.split_global_batch(trainer.num_devices * trainer.num_nodes)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return datamodule, model, trainer
