"""Experiment tracking that never takes a run down: W&B goes offline by itself without a key or a network."""

import netrc
import os
from urllib.parse import urlparse

from omegaconf import OmegaConf

from .loggers import run_id
from .offline import reachable


def wandb_credentials_present() -> bool:
    """A W&B API key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_offline() -> bool:
    """True unless W&B can really be used: WANDB_MODE=offline/disabled, no key, or no route to the server."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    return not (wandb_credentials_present() and reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), 2.0))


def run_name(model: str, data: str, first_stage: str | None = None) -> str:
    """A run's default name, `<model>-<data>`, and `<model>-<data>-<first stage>` for latent diffusion, so latent
    runs get runs/<name>/ (and its `latest`) of their own instead of sharing the pixel runs'."""
    return f"{model}-{data}" + (f"-{first_stage}" if first_stage not in (None, "null") else "")


def register_resolvers() -> None:
    """`${wandb_offline:}` decides W&B's mode when the config is resolved; `${wandb_run_id:<run_dir>}` is the run
    directory's W&B run id (loggers.run_id), so a resumed run continues its W&B run; `${run_name:model,data,first
    stage}` names a run (`run_name`)."""
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline, use_cache=True)
    if not OmegaConf.has_resolver("wandb_run_id"):
        OmegaConf.register_new_resolver("wandb_run_id", run_id)
