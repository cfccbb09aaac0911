"""score_sde_pytorch checkpoints in (Song et al. 2021, yang-song/score_sde_pytorch): their EMA weights, by default.

Their checkpoint is `torch.save({"model", "ema", "optimizer", "step"})`: `model` is the state dict of
`torch.nn.DataParallel(net)` (every key starts with `module.`), and `ema` is their ExponentialMovingAverage's state
{decay, num_updates, shadow_params}, where shadow_params is a positional list: one tensor per parameter of
`net.parameters()` with requires_grad, in that order (so no names; frozen parameters, such as the Gaussian Fourier
projection's W of NCSN++, are left out). The file is read weights-only (tensors and plain containers).

A layout maps each of their (name, tensor) to ours: a parameter is in the EMA list exactly when its name in our
network is a trainable parameter there, which places every shadow tensor. The layout of each score-SDE network is
a function beside that network's conversion; `same_names` is the layout of a network of ours named as theirs.
"""

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from ...core.denoiser import Denoiser
from .published import read_tensors

Layout = Callable[[str, Tensor], tuple[str, Tensor]]
PREFIX = "module."


def same_names(name: str, tensor: Tensor) -> tuple[str, Tensor]:
    """Their name is ours and their tensor is ours (a network written with their module names and shapes)."""
    return name, tensor


def read_checkpoint(path) -> dict:
    """Their checkpoint, weights-only, with its `model` and `ema` entries checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source={path} does not exist: give a score_sde_pytorch checkpoint "
                                "(checkpoints/checkpoint_<n>.pth or checkpoints-meta/checkpoint.pth)")
    checkpoint = read_tensors(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a score_sde_pytorch checkpoint: expected a dict with 'model', 'ema', "
                         f"'step' (their utils.save_checkpoint), found {found}")
    model = checkpoint["model"]
    if not model or not all(k.startswith(PREFIX) for k in model):
        odd = next((k for k in model if not k.startswith(PREFIX)), None)
        raise ValueError(f"{path}: 'model' keys should all start with {PREFIX!r} (their DataParallel wrapper), "
                         f"found {odd!r}")
    return checkpoint


def place_ema(names: list[str], trainable: list[bool], shadow: list[Tensor], path) -> dict[str, Tensor]:
    """{their name: EMA tensor}: the shadow list laid over the trainable names in order, counts and shapes checked."""
    chosen = [n for n, t in zip(names, trainable) if t]
    if len(chosen) != len(shadow):
        raise ValueError(f"{path}: ema.shadow_params has {len(shadow)} tensors, but {len(chosen)} of the model's "
                         "entries map to trainable parameters of the network: the layout does not match the network")
    return dict(zip(chosen, shadow))


def score_sde_weights(source: str, denoiser: Denoiser, layout: Layout = same_names, ema: bool = True) -> dict:
    """The network's state dict from a score_sde_pytorch checkpoint: their EMA weights (ema=false: the raw ones)."""
    checkpoint = read_checkpoint(source)
    theirs = {k[len(PREFIX):]: v for k, v in checkpoint["model"].items()}
    ours = {name: layout(name, tensor) for name, tensor in theirs.items()}
    if ema:
        shadow = (checkpoint.get("ema") or {}).get("shadow_params")
        if not isinstance(shadow, list):
            raise ValueError(f"{source} has no ema.shadow_params list (their ExponentialMovingAverage state); "
                             "weights.ema=false reads the raw weights instead")
        params = dict(denoiser.network.named_parameters())
        trainable = [ours[n][0] in params and params[ours[n][0]].requires_grad for n in theirs]
        averaged = place_ema(list(theirs), trainable, shadow, source)
        for name, tensor in averaged.items():
            if tuple(tensor.shape) != tuple(theirs[name].shape):
                raise ValueError(f"{source}: the EMA tensor placed on {name!r} has shape {tuple(tensor.shape)}, the "
                                 f"weight {tuple(theirs[name].shape)}: the layout does not match the network")
            ours[name] = layout(name, tensor)
    return dict(ours.values())
