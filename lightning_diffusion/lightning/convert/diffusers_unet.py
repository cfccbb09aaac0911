"""diffusers' `UNet2DModel` (the google/ddpm-cifar10-32 layout of Ho et al.'s DDPM) -> `networks.unet.UNet`.

Key table, with L = layers_per_block and k counting our steps in order (down: L blocks, then a down-sampler, per
level; up: L + 1 blocks, then an up-sampler):

    conv_in                               -> conv_in
    time_embedding.linear_1 / linear_2    -> emb.mlp.0 / emb.mlp.2
    down_blocks.i.resnets.j               -> down.k.0     (norm1, conv1, time_emb_proj -> emb_proj, norm2, conv2,
                                                           conv_shortcut -> skip)
    down_blocks.i.attentions.j            -> down.k.1     (group_norm -> norm, to_q | to_k | to_v stacked -> qkv,
                                                           to_out.0 -> proj; Linear weights become 1x1 convs)
    down_blocks.i.downsamplers.0.conv     -> down.k.0.op
    mid_block.resnets.0, attentions.0, resnets.1 -> mid.0, mid.1, mid.2
    up_blocks.i.resnets.j / attentions.j  -> up.k.0 / up.k.1
    up_blocks.i.upsamplers.0.conv         -> up.k.0.conv
    conv_norm_out, conv_out               -> norm_out, conv_out

Checkpoints saved before diffusers renamed its attention (query, key, value, proj_attn) are read too. The converted
network reproduces diffusers' outputs with c_noise = the 0-based step (`ddpm_step`) and embedding_scale=1.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from ...networks.unet import UNet

# per kind of module: diffusers' layer name -> ours ("" is the module itself; q, k, v are fused afterwards)
RENAMES = {"plain": {"": ""},
           "resnet": {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb_proj", "norm2": "norm2",
                      "conv2": "conv2", "conv_shortcut": "skip"},
           "attention": {"group_norm": "norm", "to_q": "qkv.q", "to_k": "qkv.k", "to_v": "qkv.v", "to_out.0": "proj"}}
DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# the UNet2DModel options our UNet reproduces, at the values it reproduces them
SUPPORTED = {"act_fn": "silu", "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
             "downsample_padding": 0, "norm_num_groups": 32, "norm_eps": 1e-6, "center_input_sample": False,
             "mid_block_scale_factor": 1, "num_class_embeds": None, "class_embed_type": None,
             "resnet_time_scale_shift": "default", "downsample_type": "conv", "upsample_type": "conv",
             "add_attention": True, "attn_norm_num_groups": None}
BLOCKS = {"down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("UpBlock2D", "AttnUpBlock2D")}


def unet_kwargs(config: Mapping) -> dict:
    """Our UNet's constructor arguments for a UNet2DModel config; a ValueError names any option it cannot express."""
    bad = {key: config[key] for key, value in SUPPORTED.items() if key in config and config[key] != value}
    if bad:
        raise ValueError(f"UNet2DModel options {bad} have no equivalent in our UNet; it reproduces {SUPPORTED}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    widths = list(config["block_out_channels"])
    for key, kinds in BLOCKS.items():
        if any(kind not in kinds for kind in config[key]):
            raise ValueError(f"UNet2DModel {key}={list(config[key])}: only {list(kinds)} convert")
    if len(up) != len(down) or [kind.startswith("Attn") for kind in up] != [k.startswith("Attn") for k in down[::-1]]:
        raise ValueError(f"UNet2DModel up_block_types={up} must mirror down_block_types={down} (attention at the "
                         f"same levels)")
    if any(w % widths[0] or w % 32 for w in widths):
        raise ValueError(f"UNet2DModel block_out_channels={widths} must be multiples of the first and of 32 (32 "
                         f"GroupNorm groups as channels * channel_mult)")
    size = config["sample_size"]
    attended = [w for w, kind in zip(widths, down) if kind.startswith("Attn")] + widths[-1:]  # + the middle
    head_dim = config.get("attention_head_dim")  # None: one head (DDPM); diffusers' own default is 8
    heads = {w // head_dim if head_dim else 1 for w in attended}
    if len(heads) != 1 or (head_dim and any(w % head_dim for w in attended)):
        raise ValueError(f"UNet2DModel attention_head_dim={head_dim} must split every attended width {attended} "
                         f"into the same number of heads (our UNet has one num_heads)")
    return dict(in_channels=config["in_channels"], image_size=size, out_channels=config["out_channels"],
                channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
                num_res_blocks=config["layers_per_block"], dropout=config.get("dropout", 0.0),
                attn_resolutions=tuple(size >> level for level, kind in enumerate(down) if kind.startswith("Attn")),
                embedding="positional", embedding_scale=1.0, num_heads=heads.pop(),
                min_group_size=1)  # diffusers' 32 groups at every width, also below 4 channels a group


def _side(ours: str, theirs: str, num_levels: int, blocks: int, resampler: str, our_conv: str) -> list[tuple]:
    """Encoder or decoder: per level, `blocks` (resnet, attention) pairs, then a resampler (none after the last)."""
    table, k = [], 0
    for i in range(num_levels):
        for j in range(blocks):
            table += [(f"{ours}.{k}.0", f"{theirs}.{i}.resnets.{j}", "resnet"),
                      (f"{ours}.{k}.1", f"{theirs}.{i}.attentions.{j}", "attention")]
            k += 1
        if i < num_levels - 1:
            table.append((f"{ours}.{k}.0.{our_conv}", f"{theirs}.{i}.{resampler}.0.conv", "plain"))
            k += 1
    return table


def module_table(num_levels: int, layers: int) -> list[tuple[str, str, str]]:
    """(our module, diffusers' module, kind) for every module of the layout, in our order."""
    return [("conv_in", "conv_in", "plain"), ("emb.mlp.0", "time_embedding.linear_1", "plain"),
            ("emb.mlp.2", "time_embedding.linear_2", "plain"),
            *_side("down", "down_blocks", num_levels, layers, "downsamplers", "op"),
            ("mid.0", "mid_block.resnets.0", "resnet"), ("mid.1", "mid_block.attentions.0", "attention"),
            ("mid.2", "mid_block.resnets.1", "resnet"),
            *_side("up", "up_blocks", num_levels, layers + 1, "upsamplers", "conv"),
            ("norm_out", "conv_norm_out", "plain"), ("conv_out", "conv_out", "plain")]


def _fused_attention(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """One attention module's renamed weights with q, k, v stacked into the fused qkv conv and Linear weights as
    1x1 convs; a projection missing a piece is left out (and shows as missing)."""
    out = {}
    for param in ("weight", "bias"):
        parts = [params.pop(f"qkv.{name}.{param}") for name in "qkv" if f"qkv.{name}.{param}" in params]
        if len(parts) == 3:
            out[f"qkv.{param}"] = torch.cat(parts)
    out.update(params)
    return {name: value[:, :, None, None] if value.ndim == 2 else value for name, value in out.items()}


def renamed_deprecated(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Attention keys of old checkpoints (query, key, value, proj_attn) under their current names."""
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        head, _, last = module.rpartition(".")
        if ".attentions." in key and last in DEPRECATED_ATTENTION:
            key = f"{head}.{DEPRECATED_ATTENTION[last]}.{param}"
        out[key] = value
    return out


def convert_state_dict(state: Mapping[str, Tensor], num_levels: int, layers: int) -> dict[str, Tensor]:
    """A UNet2DModel state dict as ours; a ValueError lists the diffusers keys no table entry takes (unexpected)."""
    theirs, ours = renamed_deprecated(state), {}
    for our_module, their_module, kind in module_table(num_levels, layers):
        prefix, params = their_module + ".", {}
        for key in [k for k in theirs if k.startswith(their_module + ".")]:
            layer, _, param = key[len(prefix):].rpartition(".")
            if layer in RENAMES[kind]:  # anything else stays in `theirs`: unexpected
                params[".".join(filter(None, (RENAMES[kind][layer], param)))] = theirs.pop(key)
        if kind == "attention" and params:
            params = _fused_attention(params)
        ours.update({f"{our_module}.{name}": value for name, value in params.items()})
    if theirs:
        raise ValueError(f"diffusers UNet2DModel keys with no place in our UNet (unexpected): {sorted(theirs)}")
    return ours


def unet_from_diffusers(config: Mapping, state: Mapping[str, Tensor]) -> UNet:
    """Our UNet holding a UNet2DModel's weights (config: its `config`, e.g. google/ddpm-cifar10-32's config.json)."""
    kwargs = unet_kwargs(config)
    net = UNet(**kwargs)
    converted = convert_state_dict(state, len(kwargs["channel_mult"]), kwargs["num_res_blocks"])
    expected = net.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the converted UNet2DModel state dict does not fit our UNet{kwargs}: missing {missing}, "
                         f"unexpected {unexpected}")
    wrong = {key: (tuple(value.shape), tuple(expected[key].shape)) for key, value in converted.items()
             if value.shape != expected[key].shape}
    if wrong:
        raise ValueError(f"converted weights of the wrong shape (converted, ours): {wrong}")
    net.load_state_dict(converted)
    return net
