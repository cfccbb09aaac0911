'''NVlabs/edm networks in, without unpickling them here (Karras et al. 2022; layout of NVlabs/edm 008a4e5,
training/networks.py).

EDM's `.pkl` files are pickles whose classes travel as embedded source code: loading one runs that code. This project
never does; it reads a state dict that EDM's own code exports, once, in EDM's own environment:

    # in a checkout of NVlabs/edm (its environment; the .pkl's code runs there, under its licence)
    import json, pickle, torch, dnnlib
    with dnnlib.util.open_url("edm-cifar10-32x32-cond-vp.pkl") as f:
        net = pickle.load(f)["ema"]
    torch.save({"format": "edm-export-v1", "precond": type(net).__name__,
                "init_kwargs": json.loads(json.dumps(net.init_kwargs)), "state_dict": net.state_dict()},
               "edm-cifar10-32x32-cond-vp.pt")

The .pt holds tensors and plain values only, so it loads weights-only. Its preconditioning (EDM's Table 1) must be the
model's: EDM's c_skip, c_out, c_in and c_noise are compared with the model's, in EDM's scaled space, at noise levels
across the model's range and at every level of iDDPM's table `u`:

    EDMPrecond    model=edm with its sigma_data, c_noise ln(sigma) / 4       published=edm_cifar10_vp, edm_cifar10_ve,
                                                                             edm_imagenet64_adm
    VPPrecond     VP SDE (beta_min, beta_min + beta_d), eps-prediction,      published=edm_baseline_cifar10_vp
                  c_noise (M - 1) t
    VEPrecond     VE SDE (sigma_min, sigma_max), D = x + sigma F             published=edm_baseline_cifar10_ve
                  (ScorePrediction), c_in = 1 (unscaled), c_noise ln(sigma / 2)
    iDDPMPrecond  DDPM on improved DDPM's cosine table (T = M, s = C_2,       published=edm_baseline_imagenet64_adm
                  beta <= 1 - C_1), eps-prediction with learned variances,
                  c_noise = the nearest step (nearest_ddpm_step)

The network's entries (`model.*`) go through a layout, one function over the whole state dict from EDM's names to
ours (SongUNet -> networks/song_unet.py, DhariwalUNet -> networks/adm.py): it drops EDM's stored resampling filters
(after checking them against the network's), merges SongUNet's label map (weight and bias) into our class table,
reorders the qkv rows (EDM's (head, channel, q/k/v) to our (q/k/v, head, channel)), and refuses a head count, a
GroupNorm or a shape that differs from the network's, naming EDM's key and the network config the export needs.
'''

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ...core.denoiser import Denoiser
from ...networks.embeddings import PositionalEmbedding
from ...networks.layers import AttnBlock
from ...networks.resampling import Resample
from .published import Layout, StateDict, check_state_dict, read_tensors

FORMAT = "edm-export-v1"
EXPORT_HINT = "export its state dict with EDM's own code (lightning_diffusion.lightning.convert.edm's docstring)"


def read_export(path) -> dict:
    """An exported EDM network (weights-only); a .pkl is refused with the export recipe, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source={path} does not exist: {EXPORT_HINT}")
    if path.suffix == ".pkl":
        raise ValueError(f"{path} is an EDM pickle, which runs embedded code when loaded; this project does not load "
                         f"it: {EXPORT_HINT}, and give the .pt it writes")
    export = read_tensors(path)
    missing = [k for k in ("format", "precond", "init_kwargs", "state_dict") if k not in export]
    if missing or export.get("format") != FORMAT:
        raise ValueError(f"{path} is not an exported EDM network ({FORMAT}): missing {missing}, format "
                         f"{export.get('format')!r}; {EXPORT_HINT}")
    return export


# ---- preconditioning: sigma -> EDM's (c_skip, c_out, c_in, c_noise) in its scaled space (Karras et al. 2022, Table 1)


def _edm(s: Tensor, kw: dict, table: Tensor | None):
    sd = kw["sigma_data"]
    return sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), (s**2 + sd**2).rsqrt(), s.log() / 4


def _vp(s: Tensor, kw: dict, table: Tensor | None):
    b0, bd = kw["beta_min"], kw["beta_d"]
    t = ((b0**2 + 2 * bd * torch.log1p(s**2)).sqrt() - b0) / bd  # sigma^-1 of sigma(t)^2 = exp(bd t^2 / 2 + b0 t) - 1
    return torch.ones_like(s), -s, (s**2 + 1).rsqrt(), (kw["M"] - 1) * t


def _ve(s: Tensor, kw: dict, table: Tensor | None):
    return torch.ones_like(s), s, torch.ones_like(s), (s / 2).log()


def _iddpm(s: Tensor, kw: dict, table: Tensor | None):
    index = (s[:, None] - _table(table).to(s)[None, :]).abs().argmin(1)  # the nearest level of u_0 > ... > u_M = 0
    return torch.ones_like(s), -s, (s**2 + 1).rsqrt(), (kw["M"] - 1 - index).to(s)


def _table(table: Tensor | None) -> Tensor:
    if table is None:
        raise ValueError("an iDDPMPrecond export carries its table of noise levels `u` in its state dict; this one "
                         f"has none: {EXPORT_HINT} (the whole net.state_dict())")
    return table


def _vp_sigma(kw: dict, t: float) -> float:
    """sigma(t) of the VP SDE: sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return math.sqrt(math.expm1(kw["beta_d"] * t**2 / 2 + kw["beta_min"] * t))


class Precond(NamedTuple):
    """One of EDM's preconditionings: its coefficients, the noise levels it supports, its constructor's defaults and
    the config of ours it is."""

    coefficients: Callable[[Tensor, dict, Tensor | None], tuple[Tensor, Tensor, Tensor, Tensor]]
    supported: Callable[[dict, Tensor | None], tuple[float, float]]
    defaults: dict
    config: Callable[[dict], str]


PRECONDS = {
    "EDMPrecond": Precond(
        _edm, lambda kw, u: (kw["sigma_min"], kw["sigma_max"]),
        {"sigma_min": 0.0, "sigma_max": math.inf, "sigma_data": 0.5, "model_type": "DhariwalUNet"},
        lambda kw: f"model=edm with model.parameterization.sigma_data={kw['sigma_data']} and c_noise "
                   "quarter_log_sigma (published=edm_cifar10_vp, edm_cifar10_ve or edm_imagenet64_adm)"),
    "VPPrecond": Precond(
        _vp, lambda kw, u: (_vp_sigma(kw, kw["epsilon_t"]), _vp_sigma(kw, 1.0)),
        {"beta_min": 0.1, "beta_d": 19.9, "M": 1000, "epsilon_t": 1e-5, "model_type": "SongUNet"},
        lambda kw: f"model=score_sde (VPSDE beta_min={kw['beta_min']}, beta_max={kw['beta_min'] + kw['beta_d']}, "
                   f"t_min={kw['epsilon_t']}), eps-prediction, c_noise scaled_time with scale={kw['M'] - 1} "
                   "(published=edm_baseline_cifar10_vp)"),
    "VEPrecond": Precond(
        _ve, lambda kw, u: (kw["sigma_min"], kw["sigma_max"]),
        {"sigma_min": 0.02, "sigma_max": 100.0, "model_type": "SongUNet"},
        lambda kw: f"model=score_sde_ve (VESDE sigma_min={kw['sigma_min']}, sigma_max={kw['sigma_max']}), "
                   "ScorePrediction divide_by_sigma, c_in unscaled, c_noise log_sigma with factor=0.5 "
                   "(published=edm_baseline_cifar10_ve)"),
    "iDDPMPrecond": Precond(
        _iddpm, lambda kw, u: (float(_table(u)[-2]), float(_table(u)[0])),
        {"C_1": 0.001, "C_2": 0.008, "M": 1000, "model_type": "DhariwalUNet"},
        lambda kw: f"model=ddpm on cosine_betas (T={kw['M']}, s={kw['C_2']}, max_beta={1 - kw['C_1']}), "
                   "eps-prediction, learned_variance=true, c_noise nearest_ddpm_step "
                   "(published=edm_baseline_imagenet64_adm)"),
}
COEFFICIENTS = ("c_skip", "c_out", "c_in", "c_noise")


def precond_kwargs(export: dict, path) -> tuple[Precond, dict]:
    """The export's preconditioning and its constructor arguments with EDM's defaults filled in."""
    name = export["precond"]
    if name not in PRECONDS:
        raise ValueError(f"{path}: precond={name!r} is none of EDM's preconditionings {sorted(PRECONDS)}")
    return PRECONDS[name], {**PRECONDS[name].defaults, **export["init_kwargs"]}


def check_preconditioning(export: dict, denoiser: Denoiser, path) -> None:
    """The model's D must be the export's: EDM's coefficients against the model's, at its own noise levels."""
    precond, kw = precond_kwargs(export, path)
    process = denoiser.process
    table = export["state_dict"].get("u")
    lo, hi = process.sigma_tilde_range()
    low, high = precond.supported(kw, table)
    if lo < low * (1 - 1e-5) or hi > high * (1 + 1e-5):  # the network never saw the levels beyond
        raise ValueError(f"{path}: the model's noise levels {lo:.6g}..{hi:.6g} leave the {export['precond']} "
                         f"network's {low:.6g}..{high:.6g}: expected {precond.config(kw)}")
    levels = torch.logspace(math.log10(lo), math.log10(hi), 9, dtype=torch.float64)
    if table is not None:  # iDDPM's own levels too, each of which must be the step it names
        levels = torch.cat([levels, table.to(torch.float64)[table > 0]])
    t = process.t_of_sigma_tilde(levels)
    c_skip, c_out, c_in, c_noise = denoiser.coefficients(t)
    alpha, sigma = process.alpha(t), process.sigma_tilde(t)
    ours = (c_skip * alpha, c_out, c_in * alpha, c_noise)  # on x~ = x_t / alpha: D = c_skip alpha x~ + ...
    for name, mine, theirs in zip(COEFFICIENTS, ours, precond.coefficients(sigma, kw, table)):
        bad = ~torch.isclose(mine.to(torch.float64), theirs.to(torch.float64), rtol=1e-5, atol=1e-8)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"{path} was trained with {export['precond']}: expected {precond.config(kw)}; the "
                             f"model's {name} is {float(mine[i]):.6g} at sigma={float(sigma[i]):.4g}, EDM's "
                             f"{float(theirs[i]):.6g} ({process!r}, {denoiser.parameterization!r})")
    labels, classes = kw.get("label_dim", 0), getattr(denoiser.network, "num_classes", None)
    if classes is not None and classes != labels:
        raise ValueError(f"{path} has label_dim={labels} but the network has num_classes={classes}: "
                         f"{'conditional=true' if labels else 'conditional=false'} (and the matching data)")


# ---- the network: EDM's SongUNet / DhariwalUNet names -> ours --------------------------------------------------------

BLOCK = {"norm0": "norm1", "conv0": "conv1", "affine": "emb_proj", "norm1": "norm2", "conv1": "conv2", "skip": "skip"}
ATTENTION = {"norm2": "norm", "qkv": "qkv", "proj": "proj"}  # of the same EDM block, to our attention step
MAPPING = {"map_noise": "emb.features", "map_augment": "emb.augment_proj", "map_layer0": "emb.mlp.0",
           "map_layer1": "emb.mlp.2", "out_norm": "norm_out", "out_conv": "conv_out"}
# the order of EDM's modules within a resolution (encoder: resolution falling; decoder: rising); blocks come after
ENCODER = {"conv": 0, "down": 1, "aux_down": 2, "aux_skip": 3, "aux_residual": 3}
DECODER = {"in0": 0, "in1": 1, "up": 2, "aux_up": 1000, "aux_norm": 1001, "aux_conv": 1002}
NAME = re.compile(r"^(enc|dec)\.(\d+)x\d+_(block(\d+)|\w+)$")


def qkv_rows(tensor: Tensor) -> Tensor:
    """EDM's qkv rows, ordered (head, channel, q/k/v) = (channel, q/k/v) (its attention reshapes the output to
    (B heads, C / heads, 3, HW)), in our order (q/k/v, head, channel) = (q/k/v, channel), for any number of heads."""
    return tensor.reshape(-1, 3, *tensor.shape[1:]).movedim(1, 0).reshape(tensor.shape)


def song_label_map(params: StateDict) -> StateDict:
    """SongUNet adds map_label(sqrt(L) onehot) = sqrt(L) W[:, c] + b to the features; no label (zeros) gives b."""
    w, b = params["weight"].double(), params["bias"].double()
    return {"emb.label_emb.weight": torch.cat([math.sqrt(w.shape[1]) * w.T + b, b[None]]).to(params["weight"])}


def dhariwal_label_map(params: StateDict) -> StateDict:
    """DhariwalUNet adds map_label(onehot) = W[:, c] (no bias) after the MLP; no label gives 0, our appended row."""
    return {"emb.label_emb.weight": params["weight"].T}


class Architecture(NamedTuple):
    """What the layout needs of one of EDM's U-Nets: its constructor's defaults, heads per width, its label map."""

    defaults: dict
    heads: Callable[[int], int]
    label_map: Callable[[StateDict], StateDict]


ARCHITECTURES = {
    "SongUNet": Architecture({"model_channels": 128, "channel_mult": [1, 2, 2, 2], "num_blocks": 4,
                              "attn_resolutions": [16], "augment_dim": 0, "embedding_type": "positional",
                              "channel_mult_noise": 1, "encoder_type": "standard", "decoder_type": "standard",
                              "resample_filter": [1, 1]}, lambda width: 1, song_label_map),
    "DhariwalUNet": Architecture({"model_channels": 192, "channel_mult": [1, 2, 3, 4], "num_blocks": 3,
                                  "attn_resolutions": [32, 16, 8], "augment_dim": 0},
                                 lambda width: width // 64, dhariwal_label_map),
}
# EDM's constructor arguments -> our network config's
OURS = {"model_channels": "channels", "channel_mult": "channel_mult", "num_blocks": "num_blocks",
        "attn_resolutions": "attn_resolutions", "augment_dim": "augment_dim", "embedding_type": "embedding",
        "channel_mult_noise": "channel_mult_noise", "encoder_type": "encoder", "decoder_type": "decoder",
        "resample_filter": "resample_filter"}


def _rank(module: str) -> tuple[int, int]:
    """Where an EDM encoder / decoder module runs: (resolution in running order, rank within the resolution)."""
    match = NAME.match(module)
    order = ENCODER if match and match[1] == "enc" else DECODER
    if not match or (match[4] is None and match[3] not in order):
        raise ValueError(f"{module!r} is no module of EDM's SongUNet / DhariwalUNet (enc.<r>x<r>_<kind>, "
                         f"dec.<r>x<r>_<kind>)")
    resolution = int(match[2])
    return (-resolution if match[1] == "enc" else resolution), (10 + int(match[4]) if match[4] else order[match[3]])


def unet_prefixes(modules: list[str]) -> dict[str, tuple[str | None, ...]]:
    """Our prefixes for EDM's encoder / decoder modules: (residual part, attention or None) for a block, (prefix,) for
    a layer, () for EDM's parameter-free resampling of the input / output pyramids."""
    prefixes, count = {}, {"down": 0, "up": 0, "level": 0, "head": 0}
    for module in sorted(modules, key=_rank):
        side, kind = module[:3], module.split("_", 1)[1]
        if kind == "conv":
            prefixes[module] = ("conv_in",)
        elif kind == "in0":  # the middle: block, attention (EDM's in0 is both), block
            prefixes[module] = ("mid.0", "mid.1")
        elif kind == "in1":
            prefixes[module] = ("mid.2", None)
        elif kind in ("down", "up") or kind.startswith("block"):
            step = "down" if side == "enc" else "up"
            prefixes[module] = (f"{step}.{count[step]}.0", f"{step}.{count[step]}.1")
            count[step] += 1
        elif kind in ("aux_skip", "aux_residual"):  # the input pyramid's conv (residual: fused with the filter)
            prefixes[module] = (f"pyramid_in.{count['level']}.conv" + (".conv" if kind == "aux_residual" else ""),)
            count["level"] += 1
        elif kind in ("aux_norm", "aux_conv"):  # an output head: GN, (SiLU), conv
            prefixes[module] = (f"heads.{count['head']}.{0 if kind == 'aux_norm' else 2}",)
            count["head"] += kind == "aux_conv"
        else:  # aux_down / aux_up: a filter only
            prefixes[module] = ()
    return prefixes


def check_structure(network: nn.Module, architecture: Architecture, filters: StateDict, positional: bool) -> None:
    """What shapes do not show: EDM's head counts, GroupNorm groups (min(32, C / 4)), resampling filter and unscaled
    positional features must be the network's."""
    for name, module in network.named_modules():
        if isinstance(module, nn.GroupNorm) and module.num_groups != min(32, module.num_channels // 4):
            raise ValueError(f"the network's {name} normalises {module.num_channels} channels in {module.num_groups} "
                             f"groups, EDM's GroupNorm in min(32, C // 4) = {min(32, module.num_channels // 4)}")
        if isinstance(module, AttnBlock) and module.num_heads != architecture.heads(module.proj.in_channels):
            raise ValueError(f"the network's {name} has {module.num_heads} heads, EDM's "
                             f"{architecture.heads(module.proj.in_channels)} (ADM: network.channels_per_head=64)")
    ours = next((m.filter for m in network.modules() if isinstance(m, Resample)), None)
    for key, f in filters.items():
        if ours is None or f.shape[-2:] != ours.shape[-2:] or not torch.allclose(f.reshape(ours.shape).to(ours), ours):
            column = f.reshape(f.shape[-2:]).sum(0)  # f f^T / (sum f)^2 sums to f / sum f down its columns
            taps = [round(v) if abs(v - round(v)) < 1e-6 else v for v in (column / column[0]).tolist()]
            raise ValueError(f"EDM's {key} resamples with the filter of taps {taps}, the network another: "
                             f"network.resample_filter={taps}")
    features = getattr(network, "emb", None) and network.emb.features
    if positional and isinstance(features, PositionalEmbedding) and features.scale != 1.0:
        raise ValueError(f"EDM embeds c_noise unscaled, the network's positional features scale it by "
                         f"{features.scale}: network.embedding_scale=1.0")


def unet_layout(network: nn.Module, architecture: Architecture) -> Layout:
    """EDM's U-Net state dict (without `model.`) -> the network's, each entry's shape checked (module docstring)."""
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}

    def put(out: StateDict, key: str, ours: str, tensor: Tensor) -> None:
        if ours in shapes and tuple(tensor.shape) != shapes[ours]:
            raise ValueError(f"EDM's model.{key} {tuple(tensor.shape)} lands on the network's {ours} {shapes[ours]}")
        out[ours] = tensor

    def convert(theirs: StateDict) -> StateDict:
        filters = {k: v for k, v in theirs.items() if k.endswith("resample_filter")}  # ours recompute them
        modules: dict[str, StateDict] = {}
        for key, tensor in theirs.items():
            if key not in filters:
                top = key.split(".")
                module = ".".join(top[:2]) if top[0] in ("enc", "dec") else top[0]
                modules.setdefault(module, {})[key[len(module) + 1:]] = tensor
        prefixes = unet_prefixes([m for m in modules if m[:4] in ("enc.", "dec.")])
        out: StateDict = {}
        for module, params in modules.items():
            if module == "map_label":
                for ours, tensor in architecture.label_map(params).items():
                    put(out, "map_label.weight", ours, tensor)
                continue
            for name, tensor in params.items():
                key, (layer, _, param) = f"{module}.{name}", name.rpartition(".")
                if module in MAPPING:
                    put(out, key, f"{MAPPING[module]}.{name}", tensor)
                elif module not in prefixes:
                    raise ValueError(f"EDM's model.{key} is no entry of its SongUNet / DhariwalUNet")
                elif len(prefixes[module]) == 1:
                    put(out, key, f"{prefixes[module][0]}.{name}", tensor)
                elif layer in BLOCK:
                    put(out, key, f"{prefixes[module][0]}.{BLOCK[layer]}.{param}", tensor)
                elif layer in ATTENTION and prefixes[module][1] is not None:
                    put(out, key, f"{prefixes[module][1]}.{ATTENTION[layer]}.{param}",
                        qkv_rows(tensor) if layer == "qkv" else tensor)
                else:
                    raise ValueError(f"EDM's model.{key} is no entry of a UNetBlock")
        return out

    return convert


def network_config(kw: dict, architecture: Architecture) -> str:
    """The network and data config an export needs, in our keys."""
    kw = {**architecture.defaults, **kw}
    network = " ".join(f"network.{OURS[k]}={kw[k]}".replace(" ", "") for k in architecture.defaults)
    return (f"{network} and data of {kw.get('img_channels')} x {kw.get('img_resolution')} x "
            f"{kw.get('img_resolution')} ({'conditional=true' if kw.get('label_dim') else 'conditional=false'})")


def edm_weights(source: str, denoiser: Denoiser) -> StateDict:
    """The network's state dict from an exported EDM network: EDM's `model.*` entries through its U-Net's layout."""
    export = read_export(source)
    precond, kw = precond_kwargs(export, source)
    architecture = ARCHITECTURES.get(kw["model_type"])
    if architecture is None:
        raise ValueError(f"{source}: model_type={kw['model_type']!r} is none of EDM's U-Nets {sorted(ARCHITECTURES)}")
    check_preconditioning(export, denoiser, source)
    theirs = {k.removeprefix("model."): v for k, v in export["state_dict"].items() if k.startswith("model.")}
    network = denoiser.network
    try:
        state = unet_layout(network, architecture)(theirs)
        check_state_dict(network, state, f"EDM's {kw['model_type']} converted")
        check_structure(network, architecture, {k: v for k, v in theirs.items() if k.endswith("resample_filter")},
                        positional="map_noise.freqs" not in theirs)
    except ValueError as err:
        raise ValueError(f"{source}: {err}. The export is EDM's {export['precond']} over {kw['model_type']}; the "
                         f"config must build it: {precond.config(kw)}, with {network_config(kw, architecture)}") \
            from err
    return state
