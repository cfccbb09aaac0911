"""SongUNet (DDPM++ / NCSN++): the output pyramid, skip_rescale, BigGAN resampling blocks, embeddings, init, errors."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from lightning_diffusion.networks.layers import AttnBlock, ResBlock
from lightning_diffusion.networks.song_unet import SongUNet
from network_configs import perturb

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors on a shared CPU: bitwise stable


def tiny(**kw):
    args = dict(in_channels=2, image_size=16, channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                dropout=0.0)
    return SongUNet(**(args | kw))


def test_output_pyramid_sums_upsampled_level_heads():
    """decoder='skip': the 8x8 head's output, nearest-neighbour up-sampled ([1, 1]), plus the 16x16 head's."""
    net = perturb(tiny(decoder="skip")).eval()
    assert len(net.heads) == 2
    with torch.no_grad():
        net.heads[1][2].weight.zero_()  # the 16x16 head
        net.heads[1][2].bias.zero_()
        out = net(torch.randn(2, 2, 16, 16), torch.randn(2))
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(out, out[..., ::2, ::2].repeat_interleave(2, -1).repeat_interleave(2, -2))


def test_standard_decoder_has_one_head_on_the_last_level():
    assert len(tiny().heads) == 1 and tiny().heads[0][0].num_channels == 16


@pytest.mark.parametrize("encoder, module", [("skip", "InputSkip"), ("residual", "InputResidual")])
def test_input_pyramid_merges_after_each_down_sampling(encoder, module):
    net = tiny(encoder=encoder, channel_mult=(1, 2, 2))
    assert [type(m).__name__ for m in net.pyramid_in] == [module, module]
    perturb(net).eval()
    x, c = torch.randn(2, 2, 16, 16), torch.randn(2)
    with torch.no_grad():
        base = net(x, c)
        for p in net.pyramid_in[1].parameters():
            p.zero_()
        assert (net(x, c) - base).abs().max() > 1e-4  # the second merge takes part
    assert tiny().pyramid_in is None


def test_skip_rescale_scales_the_residual_sum():
    """At initialisation the residual branch is zero: a block is its skip times sqrt(1/2) (score-SDE's skip_rescale)."""
    x = torch.randn(2, 8, 8, 8)
    block = ResBlock(8, 8, 16, skip_scale=math.sqrt(0.5))
    torch.testing.assert_close(block(x, torch.randn(2, 16)), x * math.sqrt(0.5))
    torch.testing.assert_close(AttnBlock(8, 1, skip_scale=math.sqrt(0.5))(x), x * math.sqrt(0.5))
    scales = {m.skip_scale for m in tiny().modules() if isinstance(m, (ResBlock, AttnBlock))}
    assert scales == {math.sqrt(0.5)}  # every residual sum of the network, attention included


def test_resampling_blocks_project_the_skip_as_score_sde():
    """BigGAN down / up blocks: resample, then a 1x1 conv on the skip (resample_proj, score-SDE's Conv_2)."""
    x = torch.randn(2, 8, 8, 8)
    down = ResBlock(8, 8, 16, resample="down", resample_proj=True)
    torch.testing.assert_close(down(x, torch.randn(2, 16)), down.skip(F.avg_pool2d(x, 2)))
    up = ResBlock(8, 8, 16, resample="up")  # ADM's: no conv on the skip
    assert isinstance(up.skip, torch.nn.Identity)
    torch.testing.assert_close(up(x, torch.randn(2, 16)), F.interpolate(x, scale_factor=2.0, mode="nearest"))


def test_papers_noise_features_and_label_map():
    ddpmpp, ncsnpp = tiny(num_classes=10), tiny(num_classes=10, embedding="fourier", channel_mult_noise=2)
    assert ddpmpp.emb.features.scale == 1.0 and ncsnpp.emb.features.scale == 16.0
    assert 14 < ncsnpp.emb.features.freqs.std() < 18  # Gaussian frequencies of std 16
    # EDM's map_label: Linear(10 -> noise channels) with bias, as 11 rows (the 11th, the null class, its bias)
    assert ddpmpp.emb.label_emb.weight.shape == (11, 16) and ncsnpp.emb.label_emb.weight.shape == (11, 32)
    assert ddpmpp.emb.mlp[0].in_features == 16 and ncsnpp.emb.mlp[0].in_features == 32


def test_glorot_initialisation_with_zeroed_outputs():
    net = tiny(num_classes=3)
    w = net.conv_in.weight
    bound = math.sqrt(6 / (w.shape[1] * 9 + w.shape[0] * 9))
    assert 0.9 * bound < w.abs().max() <= bound and torch.count_nonzero(net.conv_in.bias) == 0
    qkv = net.mid[1].qkv.weight
    assert 0.9 * math.sqrt(0.3 / qkv.shape[1]) < qkv.abs().max() <= math.sqrt(0.3 / qkv.shape[1])  # score-SDE's 0.1
    zeroed = [name for name, _ in net.named_parameters() if re.search(r"(conv2|\.proj|heads\.\d\.2)\.", name)]
    branches = sum(isinstance(m, (ResBlock, AttnBlock)) for m in net.modules()) + len(net.heads)
    assert len(zeroed) == 2 * branches == 2 * (10 + 3 + 1)  # weight and bias of each branch's last layer
    assert not any(net.get_parameter(name).any() for name in zeroed)


@pytest.mark.parametrize("kwargs, match", [
    (dict(encoder="progressive"), r"encoder must be one of \['standard', 'skip', 'residual'\], got 'progressive'"),
    (dict(decoder="residual"), r"decoder must be one of \['standard', 'skip'\], got 'residual'"),
    (dict(resample_filter=(1, 2, 1)), r"taps must be an even number"),
    (dict(channel_mult_noise=0), r"channel_mult_noise must be >= 1 \(1 for DDPM\+\+, 2 for NCSN\+\+\), got 0"),
    (dict(embedding="gaussian"), r"embedding must be one of \['fourier', 'positional'\], got 'gaussian'"),
    (dict(num_blocks=0), r"SongUNet num_blocks must be >= 1, got 0"),
])
def test_song_unet_value_errors_before_any_weights(kwargs, match, monkeypatch):
    monkeypatch.setattr(torch.nn.Conv2d, "__init__", lambda *a, **k: pytest.fail("weights were built"))
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)
