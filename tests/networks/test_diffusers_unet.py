"""Our DDPM UNet is Ho et al.'s exactly: diffusers' UNet2DModel at google/ddpm-cifar10-32's configuration, randomly
initialised, converted, gives the same outputs (the test extra ships diffusers)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from lightning_diffusion.lightning.convert.diffusers_unet import convert_state_dict, unet_from_diffusers
from lightning_diffusion.networks import layers
from network_configs import count

# google/ddpm-cifar10-32's config.json (its model weights are not needed: any weights must convert exactly)
DDPM_CIFAR10_32 = {
    "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
TINY = DDPM_CIFAR10_32 | {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                          "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "sample_size": 8}
STEPS = [0, 1, 250, 999]


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    reference = UNet2DModel(**DDPM_CIFAR10_32).eval()  # diffusers' init: no zero layers, every path is exercised
    return reference, unet_from_diffusers(reference.config, reference.state_dict()).eval()


def outputs(net, x, diffusers: bool):
    with torch.no_grad():
        if diffusers:
            return torch.stack([net(x, torch.full((x.shape[0],), t)).sample for t in STEPS])
        return torch.stack([net(x, torch.full((x.shape[0],), float(t))) for t in STEPS])  # c_noise = ddpm_step


def test_same_parameters_and_outputs(pair, one_thread):
    reference, ours = pair
    assert count(ours) == count(reference) == 35_746_307
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = outputs(reference, x, True)
    assert expected.abs().mean() > 0.1
    assert (outputs(ours, x, False) - expected).abs().max() <= 1e-5


def test_symmetric_down_sampling_padding_would_not_be_ho_et_al_s(pair, one_thread, monkeypatch):
    """What the asymmetric (0, 1) padding buys: padding 1 on every side moves the outputs by far more than 1e-5."""
    reference, ours = pair
    monkeypatch.setattr(layers.Downsample, "forward",
                        lambda self, x, emb=None: F.conv2d(x, self.op.weight, self.op.bias, stride=2, padding=1))
    x = torch.randn(1, 3, 32, 32)
    assert (outputs(ours, x, False) - outputs(reference, x, True)).abs().max() > 1e-3


def test_old_attention_key_names_convert_the_same():
    reference = UNet2DModel(**TINY)
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
           for k, v in reference.state_dict().items()}
    assert any("proj_attn" in k for k in old)
    new = convert_state_dict(reference.state_dict(), 2, 1)
    assert convert_state_dict(old, 2, 1).keys() == new.keys()
    ours = unet_from_diffusers(reference.config, old).eval()
    x = torch.randn(2, 3, 8, 8)
    assert (outputs(ours, x, False) - outputs(reference.eval(), x, True)).abs().max() <= 1e-5


def test_unexpected_and_missing_keys_are_named():
    reference = UNet2DModel(**TINY)
    state = reference.state_dict()
    with pytest.raises(ValueError, match=r"\(unexpected\): \['down_blocks.0.resnets.0.extra.weight'\]"):
        unet_from_diffusers(reference.config, state | {"down_blocks.0.resnets.0.extra.weight": torch.zeros(1)})
    del state["mid_block.attentions.0.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing \['mid.1.qkv.weight'\], unexpected \[\]"):
        unet_from_diffusers(reference.config, state)


@pytest.mark.parametrize("change, match", [
    ({"flip_sin_to_cos": True}, r"options \{'flip_sin_to_cos': True\} have no equivalent"),
    ({"downsample_padding": 1}, r"options \{'downsample_padding': 1\}"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, r"only \['DownBlock2D', 'AttnDownBlock2D'\]"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, r"must mirror down_block_types"),
    ({"attention_head_dim": 24}, r"attention_head_dim=24 must split every attended width \[64, 64\]"),
])
def test_unsupported_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        unet_from_diffusers(TINY | change, {})
