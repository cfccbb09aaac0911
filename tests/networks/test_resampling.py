"""FIR resampling: the filter, shapes, constants, and agreement with score-SDE's upfirdn2d spelled out."""

import pytest
import torch
import torch.nn.functional as F

from lightning_diffusion.networks.resampling import ConvDown, Resample, fir_filter

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors on a shared CPU: bitwise stable

TAPS = [(1, 1), (1, 3, 3, 1), (1, 5, 10, 10, 5, 1)]


def upfirdn(x, f, up=1, down=1, pad=(0, 0)):
    """Song et al.'s upfirdn2d (from StyleGAN2): insert up - 1 zeros after each sample, zero-pad, convolve (the
    flipped filter), keep every `down`-th sample."""
    b, c, h, w = x.shape
    if up > 1:
        z = x.new_zeros(b, c, h * up, w * up)
        z[:, :, ::up, ::up] = x
        x = z
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    x = F.conv2d(x, f.flip(0, 1)[None, None].repeat(c, 1, 1, 1), groups=c)
    return x[:, :, ::down, ::down]


@pytest.mark.parametrize("taps", TAPS)
def test_filter_sums_to_one_and_is_separable(taps):
    f = fir_filter(taps)
    assert f.shape == (len(taps), len(taps))
    torch.testing.assert_close(f.sum(), torch.tensor(1.0))
    assert torch.linalg.matrix_rank(f.double()) == 1
    torch.testing.assert_close(f, f.T)


@pytest.mark.parametrize("taps", TAPS)
def test_shapes(taps):
    x = torch.randn(2, 3, 16, 12)
    assert Resample("down", taps)(x).shape == (2, 3, 8, 6)
    assert Resample("up", taps)(x).shape == (2, 3, 32, 24)


@pytest.mark.parametrize("taps", TAPS)
@pytest.mark.parametrize("direction", ["down", "up"])
def test_constant_images_stay_constant_away_from_the_border(taps, direction):
    x = torch.full((1, 2, 16, 16), 3.0)
    y = Resample(direction, taps)(x)
    m = len(taps) // 2  # pixels that see the zero padding
    torch.testing.assert_close(y[..., m:-m, m:-m], torch.full_like(y[..., m:-m, m:-m], 3.0))


@pytest.mark.parametrize("taps", TAPS[1:])
def test_resampling_is_score_sde_upfirdn2d(taps):
    """downsample_2d: pad ((p+1)//2, p//2), p = k - 2; upsample_2d: 4 f, pad ((p+1)//2 + 1, p//2) (Song et al. 2021)."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    f, p = fir_filter(taps).double(), len(taps) - 2
    down = Resample("down", taps).double()(x)
    torch.testing.assert_close(down, upfirdn(x, f, down=2, pad=((p + 1) // 2, p // 2)))
    up = Resample("up", taps).double()(x)
    torch.testing.assert_close(up, upfirdn(x, 4 * f, up=2, pad=((p + 1) // 2 + 1, p // 2)))


def test_naive_taps_are_average_pooling_and_nearest_neighbour():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(Resample("down", (1, 1))(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(Resample("up", (1, 1))(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("taps", TAPS[:2])
def test_conv_down_is_score_sde_conv_downsample(taps):
    """score-SDE's Conv2d(down=True): filter with pad ((p+1)//2, p//2), p = k - 2 + 2, then the conv at stride 2."""
    layer = ConvDown(3, 5, taps).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    p = len(taps) - 2 + 2
    blurred = upfirdn(x, fir_filter(taps).double(), pad=((p + 1) // 2, p // 2))
    expected = F.conv2d(blurred, layer.conv.weight, layer.conv.bias, stride=2)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("taps", [(1,), (1, 2, 1), (1, -1), (0, 0), (1, 2)])
def test_bad_taps(taps):
    with pytest.raises(ValueError, match=r"even number \(>= 2\) of symmetric non-negative values"):
        Resample("down", taps)
    with pytest.raises(ValueError, match="symmetric non-negative"):
        ConvDown(3, 3, taps)


def test_bad_direction():
    with pytest.raises(ValueError, match=r"direction must be one of \['up', 'down'\], got 'sideways'"):
        Resample("sideways")
