"""What every image U-Net here shares (DDPM's UNet, SongUNet's variants, ADM), at test widths: zero output at
initialisation, gradients everywhere, the null label, augmentation labels, independence across the batch, errors."""

import pytest
import torch
from torch import nn

from lightning_diffusion.core.denoiser import Denoiser
from lightning_diffusion.core.parameterizations import EDMPreconditioning
from lightning_diffusion.core.processes import EDMProcess
from lightning_diffusion.networks.adm import DhariwalUNet
from lightning_diffusion.networks.mlp import MLP
from lightning_diffusion.networks.song_unet import SongUNet
from lightning_diffusion.networks.unet import UNet
from network_configs import perturb

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors on a shared CPU: bitwise stable

SHARED = dict(in_channels=2, image_size=16, channels=16, channel_mult=(1, 2), attn_resolutions=(8,), dropout=0.0)
NETWORKS = {
    "ddpm": lambda **kw: UNet(num_res_blocks=1, **(SHARED | kw)),
    "ddpmpp": lambda **kw: SongUNet(num_blocks=1, **(SHARED | kw)),
    "ncsnpp": lambda **kw: SongUNet(num_blocks=1, embedding="fourier", channel_mult_noise=2, encoder="residual",
                                    resample_filter=(1, 3, 3, 1), **(SHARED | kw)),
    "song_skip_skip": lambda **kw: SongUNet(num_blocks=1, encoder="skip", decoder="skip", **(SHARED | kw)),
    "adm": lambda **kw: DhariwalUNet(num_blocks=1, channels_per_head=16, **(SHARED | kw)),
}


@pytest.fixture(params=sorted(NETWORKS))
def make(request):
    return NETWORKS[request.param]


def inputs(batch=3):
    return torch.randn(batch, 2, 16, 16), torch.randn(batch)


def test_output_is_zero_at_initialisation(make):
    x, c = inputs()
    out = make(out_channels=4)(x, c)
    assert out.shape == (3, 4, 16, 16) and torch.count_nonzero(out) == 0


def test_forward_backward_reaches_every_parameter(make):
    net = perturb(make(num_classes=3, augment_dim=2))
    x, c = inputs()
    out = net(x, c, torch.tensor([0, 1, 3]), torch.randn(3, 2))
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_depends_on_c_noise_and_labels_per_sample(make):
    net = perturb(make(num_classes=4)).eval()
    x, c = inputs(2)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        base = net(x, c, y)
        assert (net(x, c + 0.3, y) - base).abs().max() > 1e-3
        changed = net(x, c, torch.tensor([2, 1])) - base
        assert changed[0].abs().max() > 1e-3 and changed[1].abs().max() < 1e-5  # no mixing across the batch
        torch.testing.assert_close(net(x, c, None), net(x, c, torch.full((2,), 4)))  # None: the null class


def test_every_residual_block_responds_to_its_embedding(make):
    """Each block with an embedding input, fed one input and two embeddings, gives two outputs: GroupNorm with one
    channel a group would cancel the per-channel bias the embedding adds (it did in DDPM's U-Net at 32 channels)."""
    from lightning_diffusion.networks.layers import ResBlock

    blocks = [m for m in perturb(make(num_classes=2)).modules() if isinstance(m, ResBlock) and m.emb_proj is not None]
    assert blocks
    for block in blocks:
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        emb = torch.randn(2, block.emb_proj.in_features)
        with torch.no_grad():
            assert (block(x, emb) - block(x, emb.flip(0))).abs().amax((1, 2, 3)).min() > 1e-4, block


def test_augment_labels_none_are_zeros_and_change_the_output(make):
    net = perturb(make(augment_dim=3)).eval()
    x, c = inputs(2)
    with torch.no_grad():
        base = net(x, c)
        torch.testing.assert_close(net(x, c, None, torch.zeros(2, 3)), base)
        assert (net(x, c, None, torch.randn(2, 3)) - base).abs().max() > 1e-3


def test_the_denoiser_passes_augment_labels_only_when_given():
    seen = []

    class Recorder(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))
            self.kwargs = kwargs

        def forward(self, x, c_noise, labels=None, **kwargs):
            seen.append(kwargs)
            return x * self.w

    denoiser = Denoiser(Recorder(), EDMPreconditioning(), EDMProcess())
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([0.5, 2.0])
    denoiser(x, t)
    a = torch.randn(2, 9)
    denoiser(x, t, None, a)
    assert seen[0] == {} and seen[1].keys() == {"augment_labels"}
    torch.testing.assert_close(seen[1]["augment_labels"], a)
    # a network without the argument still works through the Denoiser when none are given
    mlp_denoiser = Denoiser(MLP(2, hidden=8, depth=1, emb_dim=8), EDMPreconditioning(), EDMProcess())
    assert mlp_denoiser(torch.randn(2, 2), t).shape == (2, 2)


def test_the_denoiser_feeds_augment_labels_to_a_songunet():
    net = perturb(NETWORKS["ddpmpp"](augment_dim=3)).eval()
    denoiser = Denoiser(net, EDMPreconditioning(), EDMProcess())
    x, t, a = torch.randn(2, 2, 16, 16), torch.tensor([0.5, 2.0]), torch.randn(2, 3)
    with torch.no_grad():
        direct = denoiser.network(x * denoiser.coefficients(t)[2].float()[:, None, None, None],
                                  denoiser.coefficients(t)[3].float(), None, a)
        assert (denoiser(x, t, None, a) - denoiser(x, t)).abs().max() > 1e-4
        c_skip, c_out = (v.float()[:, None, None, None] for v in denoiser.coefficients(t)[:2])
        torch.testing.assert_close(denoiser(x, t, None, a), c_skip * x + c_out * direct)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=18, channel_mult=(1, 2, 2)), r"image_size=18 must be divisible by 2\^\(len\(channel_mult\)-1\)=4"),
    (dict(attn_resolutions=(4,)), r"attn_resolutions \[4\] are never reached.*resolutions are \[16, 8\]"),
    (dict(channel_mult=()), r"channel_mult must be a non-empty"),
    (dict(channels=0), r"channels must be >= 1, got 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(num_classes=-1), r"num_classes must be >= 0"),
    (dict(augment_dim=-2), r"augment_dim must be >= 0 \(0 = no augmentation labels\), got -2"),
])
def test_construction_errors_come_before_any_weights(make, kwargs, match, monkeypatch):
    monkeypatch.setattr(torch.nn.Conv2d, "__init__", lambda *a, **k: pytest.fail("weights were built"))
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_forward_errors(make):
    net = make(augment_dim=0)
    x, c = inputs(2)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 2, H, W\) with H, W divisible by 2"):
        net(torch.randn(2, 2, 15, 15), c)
    with pytest.raises(ValueError, match=r"c_noise must have shape \(2,\)"):
        net(x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"labels were given to an unconditional network \(num_classes=0\)"):
        net(x, c, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"augment_labels were given to a network without augmentation input"):
        net(x, c, None, torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"augment_labels must have shape \(2, 3\).*got \(2, 4\)"):
        make(augment_dim=3)(x, c, None, torch.zeros(2, 4))
