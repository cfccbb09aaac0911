"""score_sde_pytorch checkpoints in (Song et al. 2021, yang-song/score_sde_pytorch): their EMA weights, by default.

Their checkpoint is `torch.save({"model", "ema", "optimizer", "step"})`: `model` is the state dict of
`torch.nn.DataParallel(net)` (every key starts with `module.`), and `ema` is their ExponentialMovingAverage's state
{decay, num_updates, shadow_params}, where shadow_params is a positional list: one tensor per parameter of
`net.parameters()` with requires_grad, in that order (so no names; buffers, NCSNpp's `sigmas`, and frozen
parameters, the Gaussian Fourier projection's W of NCSN++, are left out). The file is read weights-only (tensors and
plain containers).

A layout says which of their entries the EMA list covers and converts their state dict (EMA placed in their names)
into the network's. `song_unet_layout` is NCSNpp's (`models/ncsnpp.py`: DDPM++ and NCSN++, biggan blocks) onto SongUNet:
their `all_modules` list, modules without parameters included, in the order their constructor appends them.
"""

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ...core.denoiser import Denoiser
from ...networks.embeddings import FourierEmbedding
from ...networks.song_unet import InputSkip
from .published import read_tensors

PREFIX = "module."


class Layout(NamedTuple):
    """Their state dict (EMA placed) -> the network's, and which of their entries the EMA list covers (trainable
    parameters: not buffers, not frozen parameters)."""

    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    averaged: Callable[[str], bool]


def same_names(network: nn.Module) -> Layout:
    """A network of ours with their module names: nothing renamed; averaged = a trainable parameter of ours."""
    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    return Layout(dict, trainable.__contains__)


# ---- NCSNpp (DDPM++ / NCSN++) -> SongUNet ---------------------------------------------------------------------------
BUFFERS = ("sigmas",)  # NCSNpp's own buffer: utils.get_sigmas(config), the discrete VE levels; the process holds ours
RESBLOCK = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "emb_proj", "GroupNorm_1": "norm2",
            "Conv_1": "conv2", "Conv_2": "skip"}


def ncsnpp_order(network) -> list[tuple[str | None, str]]:
    """(our module, kind) for each entry of their `all_modules`, in their constructor's order (None: no parameters)."""
    order = [("emb.features", "fourier")] if isinstance(network.emb.features, FourierEmbedding) else []
    order += [("emb.mlp.0", "plain"), ("emb.mlp.2", "plain"), ("conv_in", "plain")]
    level = 0
    for k, (step, resamples) in enumerate(zip(network.down, network.down_resamples)):
        order += [(f"down.{k}.0", "resblock")] + ([(f"down.{k}.1", "attention")] if len(step) > 1 else [])
        if resamples and network.pyramid_in is not None:  # the progressive input follows each down-sampling
            skip = isinstance(network.pyramid_in[level], InputSkip)  # input_skip: a filter (no weights) + Combine
            order += [(None, "none"), (f"pyramid_in.{level}.conv", "combine")] if skip else \
                [(f"pyramid_in.{level}.conv.conv", "pyramid")]
        level += resamples
    order += [("mid.0", "resblock"), ("mid.1", "attention"), ("mid.2", "resblock")]
    output_skip, j = network.head_up is not None, 0
    for k, (step, takes_skip) in enumerate(zip(network.up, network.up_takes_skip)):
        if not takes_skip and output_skip:  # a level's output head, before its up-sampling block
            order += [(None, "none")] * (j > 0) + [(f"heads.{j}.0", "plain"), (f"heads.{j}.2", "plain")]
            j += 1
        order += [(f"up.{k}.0", "resblock")] + ([(f"up.{k}.1", "attention")] if len(step) > 1 else [])
    order += [(None, "none")] * (output_skip and j > 0) + [(f"heads.{j}.0", "plain"), (f"heads.{j}.2", "plain")]
    return order


def _nin(params: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
    """Their NIN (einsum with W of shape (in, out)) as a 1x1 conv's (weight, bias)."""
    return params[f"{name}.W"].T[:, :, None, None], params[f"{name}.b"]


def convert_module(prefix: str, kind: str, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """One of their modules' parameters (names relative to it) under our module `prefix`."""
    if kind == "attention":  # q, k, v NINs stacked into one qkv conv, NIN_3 the projection
        (wq, bq), (wk, bk), (wv, bv), (wp, bp) = (_nin(params, f"NIN_{i}") for i in range(4))
        return {f"{prefix}.norm.weight": params["GroupNorm_0.weight"],
                f"{prefix}.norm.bias": params["GroupNorm_0.bias"], f"{prefix}.qkv.weight": torch.cat([wq, wk, wv]), f"{prefix}.qkv.bias": torch.cat([bq, bk, bv]),
                f"{prefix}.proj.weight": wp, f"{prefix}.proj.bias": bp}
    if kind == "resblock":
        return {f"{prefix}.{RESBLOCK[key.split('.')[0]]}.{key.split('.')[1]}": v for key, v in params.items()}
    if kind == "fourier":
        return {f"{prefix}.freqs": params["W"]}
    if kind == "combine":
        return {f"{prefix}.{key.removeprefix('Conv.')}": v for key, v in params.items()}
    if kind == "pyramid":
        return {f"{prefix}.{key.removeprefix('Conv2d_0.')}": v for key, v in params.items()}
    return {f"{prefix}.{key}": v for key, v in params.items()}  # plain: a Linear, conv or GroupNorm itself


def song_unet_layout(network) -> Layout:
    """NCSNpp's `all_modules` onto a SongUNet built with score-SDE's options (conf/network/*_cont_cifar10.yaml):
    biggan blocks, progressive_input none / input_skip / residual (with FIR, as every published NCSN++), progressive
    none / output_skip, combine 'sum'."""
    order = ncsnpp_order(network)

    def module_of(name: str) -> int:
        parts = name.split(".", 2)
        if len(parts) < 3 or parts[0] != "all_modules" or not parts[1].isdigit():
            raise ValueError(f"{name!r} is neither an entry of NCSNpp.all_modules nor one of its buffers {BUFFERS} "
                             "(their NCSN++ / DDPM++ layout)")
        return int(parts[1])

    def averaged(name: str) -> bool:  # the EMA list: all parameters but the frozen Fourier W; no buffers
        return name not in BUFFERS and not (module_of(name) < len(order) and order[module_of(name)][1] == "fourier")

    def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
        grouped: dict[int, dict[str, Tensor]] = {}
        for name, tensor in state.items():
            if name not in BUFFERS:
                grouped.setdefault(module_of(name), {})[name.split(".", 2)[2]] = tensor
        if max(grouped) >= len(order):
            raise ValueError(f"the checkpoint has {max(grouped) + 1} modules, the network's score-SDE layout "
                             f"{len(order)}: another architecture (channel_mult, num_blocks, progressive options)")
        out = {}
        for index, (prefix, kind) in enumerate(order):
            params = grouped.get(index, {})
            if (prefix is None) != (not params):
                raise ValueError(f"module {index} of the checkpoint ({sorted(params)[:3]}) does not fit the network's "
                                 f"{prefix or 'parameter-free module'} ({kind}): another architecture")
            if prefix is not None:
                out.update(convert_module(prefix, kind, params))
        return out

    return Layout(convert, averaged)


# ---- reading -------------------------------------------------------------------------------------------------------


def read_checkpoint(path) -> dict:
    """Their checkpoint, weights-only, with its `model` entry checked."""
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


def place_ema(theirs: dict[str, Tensor], averaged: Callable[[str], bool], shadow: list[Tensor], path) -> dict:
    """Their state dict with the EMA list laid over its averaged entries in order, counts and shapes checked."""
    trainable = [name for name in theirs if averaged(name)]
    if len(trainable) != len(shadow):
        raise ValueError(f"{path}: ema.shadow_params has {len(shadow)} tensors, but the model has {len(trainable)} "
                         "trainable entries: the layout does not match the network")
    for name, tensor in zip(trainable, shadow):
        if tuple(tensor.shape) != tuple(theirs[name].shape):
            raise ValueError(f"{path}: the EMA tensor placed on {name!r} has shape {tuple(tensor.shape)}, the weight "
                             f"{tuple(theirs[name].shape)}: the layout does not match the network")
    return {**theirs, **dict(zip(trainable, shadow))}


def score_sde_weights(source: str, denoiser: Denoiser, layout: Callable[[nn.Module], Layout] = same_names,
                      ema: bool = True) -> dict:
    """The network's state dict from a score_sde_pytorch checkpoint: their EMA weights (ema=false: the raw ones)."""
    checkpoint = read_checkpoint(source)
    theirs = {k[len(PREFIX):]: v for k, v in checkpoint["model"].items()}
    convert, averaged = layout(denoiser.network)
    if ema:
        shadow = (checkpoint.get("ema") or {}).get("shadow_params")
        if not isinstance(shadow, list):
            raise ValueError(f"{source} has no ema.shadow_params list (their ExponentialMovingAverage state); "
                             "weights.ema=false reads the raw weights instead")
        theirs = place_ema(theirs, averaged, shadow, source)
    return convert(theirs)
