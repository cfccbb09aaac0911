"""The convolutional pieces the U-Nets and the autoencoder share: GroupNorm, residual and attention blocks, resampling.

One residual block and one attention block serve DDPM (Ho et al. 2020), DDPM++ / NCSN++ (Song et al. 2021) and
ADM (Dhariwal & Nichol 2021); their differences are keyword arguments (resampling inside the block, skip_rescale,
scale-shift norm, the GroupNorm's epsilon and group size, the initialisation).
"""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resampling import Resample


def group_norm(channels: int, eps: float = 1e-6, min_group_size: int = 1) -> nn.GroupNorm:
    """GroupNorm with the largest power-of-two number of groups <= 32 that divides `channels` and leaves at least
    `min_group_size` channels per group (4 in score-SDE and EDM: min(C // 4, 32) groups for their widths)."""
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < min_group_size:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_init(layer: nn.Module) -> nn.Module:
    """Zero weights and bias: a residual branch or the network's output starts at zero (Ho et al. 2020)."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    layer.zero_init = True  # read by `xavier_init`, which leaves these at zero
    return layer


def xavier_init(net: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every conv and linear layer that is not zero-initialised.

    The initialisation of DDPM++ / NCSN++ (score-SDE's `default_init`, EDM's `xavier_uniform`); a layer with an
    `init_gain` attribute (attention's q, k, v) has its weights scaled by it.
    """
    for layer in net.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and not getattr(layer, "zero_init", False):
            nn.init.xavier_uniform_(layer.weight, gain=getattr(layer, "init_gain", 1.0))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-[resample]-conv, + Linear(SiLU(emb)), GN-SiLU-dropout-conv (zero init), skip.

    The defaults are DDPM's block (Ho et al. 2020; 1x1 skip only when the width changes). `resample` ("up" or
    "down", with FIR `taps`) resamples inside the block, as BigGAN's blocks in DDPM++ / NCSN++ and ADM do;
    `resample_proj` then gives the skip a 1x1 conv too (score-SDE's Conv_2). `adaptive_scale` is ADM's scale-shift
    norm GN(h) (1 + s) + b; `skip_scale` multiplies the sum (score-SDE's skip_rescale: sqrt(1/2)). With
    emb_dim=None the block has no embedding input (the autoencoder's blocks, Rombach et al. 2022).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None, dropout: float = 0.0, resample: str | None = None,
                 taps: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = False,
                 skip_scale: float = 1.0, norm: Callable[[int], nn.Module] = group_norm):
        super().__init__()
        self.adaptive_scale, self.skip_scale = adaptive_scale, skip_scale
        self.norm1 = norm(in_ch)
        self.resample = Resample(resample, taps) if resample else nn.Identity()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch * (2 if adaptive_scale else 1)) if emb_dim else None
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        project = in_ch != out_ch or (resample is not None and resample_proj)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if project else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(self.resample(F.silu(self.norm1(x))))
        if self.emb_proj is None:
            h = self.norm2(h)
        elif self.adaptive_scale:  # GN(h) (1 + scale) + shift
            scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), scale + 1)
        else:  # the embedding is a per-channel bias before the norm
            h = self.norm2(h + self.emb_proj(F.silu(emb))[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(self.resample(x)) + h) * self.skip_scale


class AttnBlock(nn.Module):
    """Multi-head self-attention over pixels with a residual, GN in, zero-initialised 1x1 projection out (DDPM).

    The fused 1x1 qkv conv's output channels are [q, k, v], each [head 0, head 1, ...]. `skip_scale` multiplies the
    residual sum (score-SDE's skip_rescale); the qkv weights carry score-SDE's variance scale 0.1 under
    `xavier_init` (gain sqrt(0.2) on the fused (3C, C) weight: the same bound sqrt(0.3 / C) as three (C, C) ones).
    """

    def __init__(self, channels: int, num_heads: int, skip_scale: float = 1.0,
                 norm: Callable[[int], nn.Module] = group_norm):
        super().__init__()
        self.num_heads, self.skip_scale = num_heads, skip_scale
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.qkv.init_gain = math.sqrt(0.2)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, hgt, wid = x.shape
        # (B, 3C, H, W) -> three (B, heads, HW, C/heads)
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid).permute(
            1, 0, 2, 4, 3).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return (x + self.proj(h.transpose(-1, -2).reshape(b, c, hgt, wid))) * self.skip_scale


class Downsample(nn.Module):
    """Halve the resolution: 3x3 conv with stride 2 after padding (0, 1) per side, or 2x2 average pooling.

    The asymmetric padding is TensorFlow's 'SAME' for a stride-2 3x3 conv on even sides, as in Ho et al.'s original
    (and diffusers' `Downsample2D(padding=0)`, Stable Diffusion's autoencoder).
    """

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        self.op = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.op(F.pad(x, (0, 1, 0, 1)) if self.with_conv else x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv if `with_conv`."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
