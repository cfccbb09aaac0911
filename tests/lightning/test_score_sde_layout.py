"""score_sde_pytorch's NCSNpp (DDPM++ / NCSN++) checkpoints into SongUNet: a checkpoint in their exact layout,
written by a transcription of their constructor's loops (models/ncsnpp.py) from a SongUNet's weights, imports back
to those weights, and so to the same D(x, t), for their progressive options."""

import pytest
import torch

from helpers import compose_config
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.lightning.checkpoints import load_model
from lightning_diffusion.lightning.convert.imported import import_model

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["data=digits16", "network.channels=16", "network.channel_mult=[1,2,2]", "network.num_blocks=1",
         "network.attn_resolutions=[8]", "model=score_sde", "conditional=false", "model.num_classes=0",
         "model.guidance_scale=1.0",
         "+model.parameterization.c_noise._target_=lightning_diffusion.core.parameterizations.scaled_time",
         "+model.parameterization.c_noise._partial_=true",
         "+weights._target_=lightning_diffusion.lightning.convert.score_sde.score_sde_weights",
         "+weights._partial_=true", "+weights.layout._target_=lightning_diffusion.lightning.convert.score_sde."
         "song_unet_layout", "+weights.layout._partial_=true"]
# network config -> their (embedding fourier, progressive_input, progressive)
VARIANTS = {"ddpmpp_cont": (["network=ddpmpp_cont_cifar10"], (False, "none", "none")),
            "ncsnpp_cont": (["network=ncsnpp_cont_cifar10"], (True, "residual", "none")),
            "input_output_skip": (["network=ncsnpp_cont_cifar10", "network.encoder=skip", "network.decoder=skip"],
                                  (True, "input_skip", "output_skip"))}
RESBLOCK = [("norm1", "GroupNorm_0"), ("conv1", "Conv_0"), ("emb_proj", "Dense_0"), ("norm2", "GroupNorm_1"),
            ("conv2", "Conv_1"), ("skip", "Conv_2")]  # in their registration order


def their_modules(levels: int, blocks: int, attn_levels: set, fourier: bool, progressive_input: str,
                  progressive: str) -> list[tuple[str, str | None]]:
    """NCSNpp.__init__'s `all_modules` as (kind, our module), following its loops; our steps counted as SongUNet's."""
    mods = [("fourier", "emb.features")] if fourier else []
    mods += [("plain", "emb.mlp.0"), ("plain", "emb.mlp.2"), ("plain", "conv_in")]
    k = 0
    for i in range(levels):
        for _ in range(blocks):
            mods += [("resblock", f"down.{k}.0")] + ([("attention", f"down.{k}.1")] if i in attn_levels else [])
            k += 1
        if i != levels - 1:
            mods.append(("resblock", f"down.{k}.0"))
            k += 1
            if progressive_input == "input_skip":  # pyramid_downsample (no weights), then Combine
                mods += [("none", None), ("combine", f"pyramid_in.{i}.conv")]
            elif progressive_input == "residual":
                mods.append(("pyramid", f"pyramid_in.{i}.conv.conv"))
    mods += [("resblock", "mid.0"), ("attention", "mid.1"), ("resblock", "mid.2")]
    k = j = 0
    for i in reversed(range(levels)):
        for _ in range(blocks + 1):
            mods.append(("resblock", f"up.{k}.0"))
            k += 1
        if i in attn_levels:
            mods.append(("attention", f"up.{k - 1}.1"))
        if progressive == "output_skip":  # pyramid_upsample (no weights) below the top, GroupNorm, conv3x3
            mods += ([("none", None)] if i != levels - 1 else []) + [("plain", f"heads.{j}.0"),
                                                                      ("plain", f"heads.{j}.2")]
            j += 1
        if i != 0:
            mods.append(("resblock", f"up.{k}.0"))
            k += 1
    return mods + ([("plain", "heads.0.0"), ("plain", "heads.0.2")] if progressive != "output_skip" else [])


def their_params(kind: str, prefix: str, ours: dict) -> dict:
    """One module's parameters in their names and layout (NIN weights are (in, out); q, k, v separate)."""
    if kind == "resblock":
        return {f"{theirs}.{p}": ours[f"{prefix}.{name}.{p}"] for name, theirs in RESBLOCK for p in ("weight", "bias")
                if f"{prefix}.{name}.{p}" in ours}
    if kind == "attention":
        q, k, v = ours[f"{prefix}.qkv.weight"][:, :, 0, 0].chunk(3)
        bq, bk, bv = ours[f"{prefix}.qkv.bias"].chunk(3)
        out = {"GroupNorm_0.weight": ours[f"{prefix}.norm.weight"], "GroupNorm_0.bias": ours[f"{prefix}.norm.bias"]}
        for i, (w, b) in enumerate([(q, bq), (k, bk), (v, bv), (ours[f"{prefix}.proj.weight"][:, :, 0, 0],
                                                                 ours[f"{prefix}.proj.bias"])]):
            out.update({f"NIN_{i}.W": w.T.contiguous(), f"NIN_{i}.b": b})
        return out
    renamed = {"fourier": {"freqs": "W"}, "combine": {"weight": "Conv.weight", "bias": "Conv.bias"},
               "pyramid": {"weight": "Conv2d_0.weight", "bias": "Conv2d_0.bias"}}.get(kind, {})
    return {renamed.get(p, p): ours[f"{prefix}.{p}"] for p in ("freqs", "weight", "bias") if f"{prefix}.{p}" in ours}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_checkpoint_in_their_layout_imports_to_the_same_denoiser(variant, tmp_path):
    overrides, (fourier, progressive_input, progressive) = VARIANTS[variant]
    overrides = SMALL + overrides
    _, model, _ = build(compose_config(overrides, tmp_path / "build"))
    network = model.eval().denoiser.network  # eval: no dropout
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.05)
    ours = network.state_dict()
    theirs = {}
    for index, (kind, prefix) in enumerate(their_modules(3, 1, {1}, fourier, progressive_input, progressive)):
        if prefix is not None:
            theirs.update({f"all_modules.{index}.{k}": v for k, v in their_params(kind, prefix, ours).items()})
    assert sum(v.numel() for v in theirs.values()) == sum(v.numel() for v in ours.values())  # nothing left out
    trained = [k for k in theirs if not k.endswith(".W") or "NIN" in k]  # all but the frozen Fourier W
    shadow = [theirs[k] for k in trained]  # their EMA, positional
    raw = {k: v + 1.0 if k in trained else v for k, v in theirs.items()}  # the raw weights: not the ones to read
    torch.save({"model": {f"module.{k}": v for k, v in raw.items()},
                "ema": {"decay": 0.9999, "num_updates": 1, "shadow_params": shadow}, "step": 1}, tmp_path / "c.pth")
    cfg = compose_config([*overrides, f"+source={tmp_path / 'c.pth'}"], tmp_path / "run", config_name="import_model")
    imported, _ = load_model(import_model(cfg))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.2, 0.8], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(imported.denoiser(x, t), model.denoiser(x, t), rtol=0, atol=0)


def test_the_published_config_composes_their_vp_model(tmp_path):
    cfg = compose_config(["published=ddpmpp_cont_vp", "data=digits16", "network.channels=16",
                          "network.channel_mult=[1,2,2]", "network.num_blocks=1", "network.attn_resolutions=[8]"],
                         tmp_path, config_name="import_model")
    _, model, _ = build(cfg)
    process, parameterization = model.process, model.denoiser.parameterization
    assert (process.beta_min, process.beta_max, process.t_min) == (0.1, 20.0, 1e-5) and model.num_classes == 0
    assert parameterization.c_noise.func.__name__ == "scaled_time" and parameterization.c_noise.keywords["scale"] == 999
    assert type(parameterization).__name__ == "EpsPrediction" and cfg.weights.layout._target_.endswith("song_unet_layout")


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    overrides = SMALL + VARIANTS["ddpmpp_cont"][0]
    _, model, _ = build(compose_config(overrides, tmp_path / "build"))
    ours = model.denoiser.network.state_dict()
    theirs = {}
    for index, (kind, prefix) in enumerate(their_modules(3, 1, {1}, False, "none", "none")):
        theirs.update({f"all_modules.{index + 1}.{k}": v for k, v in their_params(kind, prefix, ours).items()})
    torch.save({"model": {f"module.{k}": v for k, v in theirs.items()}, "step": 1}, tmp_path / "c.pth")
    cfg = compose_config([*overrides, f"+source={tmp_path / 'c.pth'}", "+weights.ema=false"], tmp_path / "run",
                         config_name="import_model")
    with pytest.raises(ValueError, match=r"the checkpoint has \d+ modules, the network's score-SDE layout \d+"):
        import_model(cfg)
