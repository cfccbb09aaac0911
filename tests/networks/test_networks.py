"""Networks: shapes, the DDPM CIFAR-10 parameter count, dependence on c_noise and labels, gradients, errors."""


import pytest
import torch
from hydra.utils import instantiate

from lightning_diffusion.networks.embeddings import EMBEDDINGS, FourierEmbedding, PositionalEmbedding
from lightning_diffusion.networks.kl_autoencoder import KLAutoencoder
from lightning_diffusion.networks.mlp import MLP
from lightning_diffusion.networks.unet import UNet
from network_configs import NAMES, count, data_shape, network_config, perturb

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors on a shared CPU: bitwise stable


def tiny_unet(**kw):
    args = dict(in_channels=1, image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(8,), dropout=0.0)
    return UNet(**(args | kw))


# ---------------------------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("name", sorted(EMBEDDINGS))
def test_embedding_shape_and_separation(name):
    emb = EMBEDDINGS[name](64)
    c = torch.linspace(-3, 3, 7)
    e = emb(c)
    assert e.shape == (7, 64) and torch.isfinite(e).all()
    # features of distinct noise levels are distinct; sin^2 + cos^2 = 1 per frequency
    assert torch.cdist(e, e).add(torch.eye(7) * 1e3).min() > 0.1
    torch.testing.assert_close(e[:, :32] ** 2 + e[:, 32:] ** 2, torch.ones(7, 32))


def test_positional_embedding_matches_ddpm_formula():
    emb = PositionalEmbedding(8, scale=250.0)
    c = torch.tensor([0.0, 0.4])
    t = 250.0 * c  # integer-timestep scale
    freqs = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(4) / 3)
    expected = torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], dim=1)
    torch.testing.assert_close(emb(c), expected)


def test_fourier_frequencies_are_saved_with_the_checkpoint():
    a = FourierEmbedding(16)
    b = FourierEmbedding(16)
    assert not torch.equal(a.freqs, b.freqs)
    b.load_state_dict(a.state_dict())
    c = torch.randn(5)
    torch.testing.assert_close(a(c), b(c))


# ---------------------------------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("out_dim", [None, 4])
@pytest.mark.parametrize("embedding", sorted(EMBEDDINGS))
def test_mlp_shapes(num_classes, out_dim, embedding):
    net = MLP(2, hidden=32, depth=2, emb_dim=16, num_classes=num_classes, embedding=embedding, out_dim=out_dim)
    x, c = torch.randn(5, 2), torch.randn(5)
    labels = torch.randint(0, num_classes, (5,)) if num_classes else None
    out = net(x, c, labels)
    assert out.shape == (5, out_dim or 2)
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer


def test_mlp_depends_on_c_noise_and_labels():
    net = perturb(MLP(2, hidden=32, depth=2, emb_dim=16, num_classes=3))
    x = torch.randn(4, 2)
    c = torch.zeros(4)
    y0, y1 = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    base = net(x, c, y0)
    assert (net(x, c + 0.5, y0) - base).abs().max() > 1e-3
    assert (net(x, c, y1) - base).abs().max() > 1e-3
    # labels=None is the null class `num_classes`
    torch.testing.assert_close(net(x, c, None), net(x, c, torch.full((4,), 3)))
    # per-sample: changing sample 0's noise level leaves the others untouched
    c2 = c.clone()
    c2[0] = 1.0
    diff = (net(x, c2, y0) - base).abs().amax(dim=1)
    assert diff[0] > 1e-3 and diff[1:].max() == 0


def test_mlp_gradients_flow():
    net = perturb(MLP(3, hidden=16, depth=2, emb_dim=8, num_classes=2))
    net(torch.randn(6, 3), torch.randn(6), torch.randint(0, 3, (6,))).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------- UNet


def test_ddpm_cifar10_has_ho_et_al_parameter_count():
    with torch.device("meta"):
        net = UNet(in_channels=3, image_size=32)  # defaults are Ho et al.'s CIFAR-10 model
    assert count(net) == 35_746_307  # diffusers' UNet2DModel at google/ddpm-cifar10-32's config (test_diffusers_unet)


def test_ddpm_cifar10_config_matches_the_defaults():
    with torch.device("meta"):
        net = instantiate(network_config("unet_ddpm_cifar10", (3, 32, 32)))
    assert isinstance(net, UNet) and count(net) == 35_746_307


@pytest.mark.parametrize("name", NAMES)
def test_every_network_config_instantiates_and_runs(name):
    """At test widths (network_configs.TINY), on the data the config is written for."""
    net = instantiate(network_config(name, data_shape(name), tiny=True))
    if isinstance(net, MLP):
        x = torch.randn(2, net.dim)
    else:
        x = torch.randn(2, net.in_channels, net.image_size, net.image_size)
    with torch.no_grad():
        out = net(x)[0] if isinstance(net, KLAutoencoder) else net(x, torch.randn(2))  # (reconstruction, moments)
    assert out.shape == x.shape


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("out_channels", [None, 2])
def test_unet_shapes(num_classes, out_channels):
    net = tiny_unet(num_classes=num_classes, out_channels=out_channels, embedding="fourier")
    x = torch.randn(3, 1, 16, 16)
    labels = torch.randint(0, num_classes + 1, (3,)) if num_classes else None
    out = net(x, torch.randn(3), labels)
    assert out.shape == (3, out_channels or 1, 16, 16)
    assert torch.count_nonzero(out) == 0  # zero-initialised last conv


def test_unet_three_levels_two_heads_no_resample_conv():
    net = UNet(in_channels=3, image_size=8, out_channels=6, channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
               attn_resolutions=(8, 2), dropout=0.0, num_heads=2, resample_with_conv=False)
    assert perturb(net)(torch.randn(2, 3, 8, 8), torch.randn(2)).shape == (2, 6, 8, 8)


def test_unet_depends_on_c_noise_and_labels():
    net = perturb(tiny_unet(num_classes=4)).eval()
    x = torch.randn(2, 1, 16, 16)
    c = torch.zeros(2)
    y = torch.tensor([0, 1])
    base = net(x, c, y)
    assert (net(x, c + 0.3, y) - base).abs().max() > 1e-3
    assert (net(x, c, torch.tensor([2, 1])) - base)[0].abs().max() > 1e-3
    torch.testing.assert_close(net(x, c, None), net(x, c, torch.full((2,), 4)))
    # no mixing across the batch
    torch.testing.assert_close(net(x[:1], c[:1], y[:1]), base[:1], atol=1e-5, rtol=1e-4)


def test_tiny_unet_forward_backward_batch16():
    net = tiny_unet(num_res_blocks=2)
    x = torch.randn(16, 1, 16, 16)
    # at initialisation only the zero-initialised last conv receives a gradient ...
    (net(x, torch.randn(16)) - x).square().mean().backward()
    assert net.conv_out.weight.grad.abs().sum() > 0
    # ... once it is non-zero, every parameter does
    net.zero_grad()
    perturb(net)
    out = net(x, torch.randn(16))
    assert out.shape == x.shape
    (out - x).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_unet_scalar_c_noise_broadcasts():
    net = perturb(tiny_unet())
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(net(x, torch.tensor(0.5)), net(x, torch.full((2,), 0.5)))


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=18, channel_mult=(1, 2, 2)), r"image_size=18 .*divisible by .*=4"),
    (dict(attn_resolutions=(4,)), r"attn_resolutions \[4\] are never reached.*\[16, 8\]"),
    (dict(embedding="gaussian"), r"embedding must be one of \['fourier', 'positional'\], got 'gaussian'"),
    (dict(num_heads=3), r"num_heads=3 must divide"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(channel_mult=()), r"channel_mult must be a non-empty"),
    (dict(num_classes=-1), r"num_classes must be >= 0"),
    (dict(in_channels=0), r"in_channels must be >= 1, got 0"),
])
def test_unet_value_errors(kwargs, match, monkeypatch):
    # raised before any weights are built
    monkeypatch.setattr(torch.nn.Conv2d, "__init__", lambda *a, **k: pytest.fail("weights were built"))
    with pytest.raises(ValueError, match=match):
        tiny_unet(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=0), r"dim must be >= 1, got 0"),
    (dict(emb_dim=15), r"emb_dim must be an even integer >= 2, got 15"),
    (dict(embedding="learned"), r"embedding must be one of"),
    (dict(out_dim=0), r"out_dim must be None"),
])
def test_mlp_value_errors(kwargs, match, monkeypatch):
    monkeypatch.setattr(torch.nn.Linear, "__init__", lambda *a, **k: pytest.fail("weights were built"))
    with pytest.raises(ValueError, match=match):
        MLP(**(dict(dim=2) | kwargs))


def test_forward_errors():
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 1, H, W\)"):
        tiny_unet()(torch.randn(2, 1, 15, 15), torch.zeros(2))
    with pytest.raises(ValueError, match=r"c_noise must have shape \(2,\)"):
        tiny_unet()(torch.randn(2, 1, 16, 16), torch.zeros(3))
    with pytest.raises(ValueError, match="unconditional network"):
        tiny_unet()(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 2\)"):
        MLP(2)(torch.randn(2, 3), torch.zeros(2))
