"""diffusers models in: a `UNet2DModel`'s weights for a network of ours, an `AutoencoderKL` as a latent first stage.

`source` is a Hub id (`google/ddpm-cifar10-32`, `stabilityai/sd-vae-ft-mse`; offline: the local cache, or a clear
error naming the local-folder alternative) or a local `save_pretrained` folder (a pipeline folder's `unet/` or `vae/`
is found by itself). The source's scheduler, when it has one, is checked against the model's process and
prediction target, so a published network runs under the process it was trained on.
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ...core.denoiser import Denoiser
from ...core.parameterizations import EpsPrediction, VPrediction, X0Prediction
from ...core.processes import cosine_betas
from ...networks.adapters import DiffusersAutoencoder, DiffusersUNet, architecture, plain
from ...networks.first_stage import FirstStage
from ...networks.layers import AttnBlock
from ...networks.unet import UNet
from .diffusers_unet import convert_state_dict, unet_kwargs
from .published import load_checked, read_config, read_weights, resolve_source

TARGETS = {"epsilon": EpsPrediction, "sample": X0Prediction, "v_prediction": VPrediction}


def check_architecture(network: DiffusersUNet, config: dict, folder: Path) -> None:
    """The network config's architecture must be the source's (keys both know; diffusers adds keys over versions)."""
    ours, theirs = plain(network.model.config), architecture(config)
    differ = {k: (theirs[k], ours[k]) for k in theirs if k in ours and theirs[k] != ours[k]}
    if differ:
        shown = ", ".join(f"{k}: source {a!r} vs network.config {b!r}" for k, a, b in
                          ((k, *v) for k, v in list(differ.items())[:6]))
        raise ValueError(f"{folder}/config.json is another UNet2DModel than the network config ({shown}): copy the "
                         f"source's config.json into network.config (conf/network/diffusers_ddpm_cifar10.yaml shows one)")


def diffusers_betas(scheduler: dict) -> Tensor:
    """The betas a diffusers DDPM-type scheduler config states (its `trained_betas`, or its named schedule)."""
    if scheduler.get("trained_betas") is not None:
        return torch.as_tensor(scheduler["trained_betas"], dtype=torch.float64)
    T, start, end = scheduler["num_train_timesteps"], scheduler["beta_start"], scheduler["beta_end"]
    schedule = scheduler.get("beta_schedule", "linear")
    if schedule == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        return cosine_betas(T)
    raise ValueError(f"beta_schedule={schedule!r} of the source's scheduler is not one this project can compare "
                     f"(linear, scaled_linear, squaredcos_cap_v2)")


def find_scheduler(folder: Path) -> dict | None:
    """The scheduler config beside a model folder (`scheduler_config.json`, or a pipeline's `scheduler/`), if any."""
    for file in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json",
                 folder / "scheduler" / "scheduler_config.json"):
        if file.is_file():
            return json.loads(file.read_text())
    return None


def check_schedule(scheduler: dict, denoiser: Denoiser, folder: Path) -> None:
    """The model's process must be the scheduler's chain and its parameterization the scheduler's prediction type."""
    process, target = denoiser.process, scheduler.get("prediction_type", "epsilon")
    if not process.discrete:
        raise ValueError(f"the source {folder} was trained on a discrete {scheduler.get('_class_name')} chain, but "
                         f"model.process is {process!r}: use model=ddpm (model.process.T=...)")
    betas = diffusers_betas(scheduler)
    if len(betas) != process.T or not torch.allclose(betas, process.betas, rtol=1e-5, atol=1e-8):
        raise ValueError(f"the source {folder}'s scheduler has T={len(betas)} betas {betas[0]:.4g}..{betas[-1]:.4g} "
                         f"({scheduler.get('beta_schedule')}), but model.process is {process!r}: set model.process "
                         "to the published schedule")
    expected = TARGETS.get(target)
    if expected is None or type(denoiser.parameterization) is not expected:
        raise ValueError(f"the source {folder} predicts {target!r} ({expected.__name__ if expected else '?'}), but "
                         f"model.parameterization is {denoiser.parameterization!r}")


def to_project_unet(config: dict, state: dict, network) -> dict:
    """diffusers' UNet2DModel weights for the project's DDPM U-Net (`diffusers_unet`'s key table), refused unless the
    network is the UNet that config converts to: the options its state dict does not show, the embedding scale and
    the attention heads, are compared too (shapes are compared when the weights load)."""
    kwargs = unet_kwargs(config)
    scale = getattr(getattr(getattr(network, "emb", None), "features", None), "scale", None)
    heads = {m.num_heads for m in network.modules() if isinstance(m, AttnBlock)}
    if not isinstance(network, UNet) or scale != kwargs["embedding_scale"] or heads != {kwargs["num_heads"]}:
        raise ValueError(f"the network ({type(network).__name__}, embedding_scale {scale}, attention heads "
                         f"{sorted(heads)}) is not the UNet this UNet2DModel converts to: network=unet_ddpm_cifar10 "
                         f"with {kwargs} (embedding_scale: {kwargs['embedding_scale']})")
    return convert_state_dict(state, len(kwargs["channel_mult"]), kwargs["num_res_blocks"])


def unet2d_weights(source: str, denoiser: Denoiser, convert: Callable[[dict, dict, object], dict] | None = None) -> dict:
    """A published `UNet2DModel`'s state dict for `denoiser.network`, checked against its config and scheduler.

    Without `convert` the network is a `DiffusersUNet` of the same architecture; `convert(config, state, network)`
    maps diffusers' state dict to another network's (`to_project_unet`: the project's own DDPM U-Net).
    """
    folder = resolve_source(source, "UNet2DModel", "unet")
    config = read_config(folder, "UNet2DModel")
    network = denoiser.network
    if convert is None:
        if not isinstance(network, DiffusersUNet):
            raise ValueError(f"network is a {type(network).__name__}; a UNet2DModel's weights load as they are only "
                             "into network=diffusers_ddpm_cifar10 (DiffusersUNet), else give weights.convert=<converter>")
        check_architecture(network, config, folder)
    scheduler = find_scheduler(folder)
    if scheduler is not None:
        check_schedule(scheduler, denoiser, folder)
    state = read_weights(folder)
    return convert(config, state, network) if convert is not None else {f"model.{k}": v for k, v in state.items()}


def autoencoder_kl(source: str, image_size: int | None = None, scale: float | Sequence[float] | None = None,
                   shift: float | Sequence[float] | None = None) -> FirstStage:
    """A published `AutoencoderKL` (Stable Diffusion's VAE) as a frozen first stage with latents s (z - m).

    scale / shift null: the source config's `scaling_factor` (0.18215 for SD-VAE, as LDM and DiT) and `shift_factor`
    (0 when absent); EDM2 normalises per channel (conf/first_stage/sd_vae_edm2.yaml).
    """
    folder = resolve_source(source, "AutoencoderKL", "vae")
    config = read_config(folder, "AutoencoderKL")
    autoencoder = DiffusersAutoencoder(config, image_size)
    load_checked(autoencoder.model, read_weights(folder), folder)
    scale = autoencoder.model.config.scaling_factor if scale is None else scale
    shift = (autoencoder.model.config.get("shift_factor") or 0.0) if shift is None else shift
    return FirstStage(autoencoder, scale, shift)
