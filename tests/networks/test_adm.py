"""ADM (EDM's DhariwalUNet): heads of 64 channels, scale-shift norm, its timestep features, the zero null label."""

import math

import pytest
import torch

from lightning_diffusion.networks.adm import DhariwalUNet
from lightning_diffusion.networks.embeddings import ClassEmbedding, PositionalEmbedding
from lightning_diffusion.networks.layers import AttnBlock, ResBlock
from network_configs import perturb

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors on a shared CPU: bitwise stable


def tiny(**kw):
    args = dict(in_channels=2, image_size=16, channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                dropout=0.0, channels_per_head=16)
    return DhariwalUNet(**(args | kw))


def test_paper_config_attention_has_64_channels_per_head():
    with torch.device("meta"):
        net = DhariwalUNet(3, 64, num_classes=1000)
    attention = [m for m in net.modules() if isinstance(m, AttnBlock)]
    # after every block at 32, 16, 8 (3 encoder + 4 decoder per level) and in the middle
    assert len(attention) == 3 * (3 + 4) + 1
    assert {(m.qkv.in_channels, m.num_heads) for m in attention} == {(384, 6), (576, 9), (768, 12)}


def test_attends_after_every_decoder_block():
    net = tiny()
    decoder_attention = [len(step) == 2 for step in net.up]
    assert decoder_attention == [True, True, False, False, False]  # 8x8: two blocks, then up, then 16x16's two


def test_scale_shift_norm():
    """h -> GN(h) (1 + s) + b with [s, b] = Linear(SiLU(emb)) (Dhariwal & Nichol 2021, AdaGN)."""
    block = ResBlock(8, 8, 4, adaptive_scale=True)
    scale, shift = torch.randn(8), torch.randn(8)
    with torch.no_grad():
        block.emb_proj.weight.zero_()
        block.emb_proj.bias.copy_(torch.cat([scale, shift]))
        block.conv2.weight.normal_()
    x = torch.randn(2, 8, 6, 6)
    h = block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x))))
    h = h * (1 + scale[:, None, None]) + shift[:, None, None]
    torch.testing.assert_close(block(x, torch.randn(2, 4)), x + block.conv2(torch.nn.functional.silu(h)))


def test_timestep_features_are_adm_s():
    """guided-diffusion's timestep_embedding: [cos, sin](t 10000^(-k / half)), k = 0..half-1."""
    t = torch.tensor([0.0, 3.0, 999.0])
    half = 8
    args = t[:, None] * torch.exp(-math.log(10_000) * torch.arange(half) / half)
    expected = torch.cat([args.cos(), args.sin()], dim=1)
    torch.testing.assert_close(PositionalEmbedding(16, 1.0, endpoint=False, cos_first=True)(t), expected)
    features = tiny().emb.features
    assert (features.scale, features.cos_first) == (1.0, True)
    torch.testing.assert_close(features(t), PositionalEmbedding(16, 1.0, endpoint=False, cos_first=True)(t))


def test_null_label_is_the_zero_vector():
    emb = ClassEmbedding(5, 3, learned_null=False)
    assert emb.weight.shape == (5, 3)
    assert not emb(torch.tensor([5, 5])).any() and emb(torch.tensor([2])).abs().sum() > 0
    net = perturb(tiny(num_classes=4)).eval()
    x, c = torch.randn(2, 2, 16, 16), torch.randn(2)
    with torch.no_grad():
        unconditional = net(x, c, None)
        net.emb.label_emb.weight.zero_()  # every label then adds nothing, as the null class does
        torch.testing.assert_close(net(x, c, torch.tensor([0, 3])), unconditional)


def test_augmentation_map_starts_at_zero():
    net = tiny(augment_dim=9)
    assert not net.emb.augment_proj.weight.any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels_per_head=24), r"channels_per_head=24 must divide the width .* of every level with attention and of the middle, \[32\]"),
    (dict(channels_per_head=0), r"channels_per_head must be >= 1, got 0"),
    (dict(attn_resolutions=(32,)), r"attn_resolutions \[32\] are never reached"),
])
def test_adm_value_errors_before_any_weights(kwargs, match, monkeypatch):
    monkeypatch.setattr(torch.nn.Conv2d, "__init__", lambda *a, **k: pytest.fail("weights were built"))
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)
