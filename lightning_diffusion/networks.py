"""Denoising networks F(x, c_noise, labels): an MLP for low-dimensional data and a DDPM / DDPM++ U-Net.

Every network has the signature `forward(x, c_noise, labels=None)`, where c_noise is a (B,) real number
(-logsnr / 8, see `parameterizations`) and labels a (B,) int64 tensor or None. A class-conditional
network holds `num_classes + 1` class embeddings; label `num_classes` (or labels=None) is the null
class used by classifier-free guidance (Ho & Salimans 2022).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of scale * c_noise (Vaswani et al. 2017; DDPM's t embedding, Ho et al. 2020)."""

    default_scale = 250.0  # c_noise in about -3..3 then spans about the range of DDPM's integer timesteps

    def __init__(self, dim: int, scale: float | None = None, max_period: float = 10_000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"PositionalEmbedding dim must be an even integer >= 2, got {dim}")
        self.dim, self.scale = dim, self.default_scale if scale is None else float(scale)
        half = dim // 2
        # frequencies max_period^(-k / (half - 1)), k = 0..half-1, as in DDPM's get_timestep_embedding
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        args = (self.scale * c_noise.float())[:, None] * self.freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of c_noise, fixed Gaussian frequencies (Tancik et al. 2020; NCSN++, Song et al. 2021)."""

    default_scale = 16.0

    def __init__(self, dim: int, scale: float | None = None):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"FourierEmbedding dim must be an even integer >= 2, got {dim}")
        self.dim, self.scale = dim, self.default_scale if scale is None else float(scale)
        # persistent: the frequencies are drawn once and must travel with the checkpoint
        self.register_buffer("freqs", torch.randn(dim // 2) * self.scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        args = 2 * math.pi * c_noise.float()[:, None] * self.freqs.float()[None, :]
        return torch.cat([args.sin(), args.cos()], dim=1)


EMBEDDINGS = {"positional": PositionalEmbedding, "fourier": FourierEmbedding}


class NoiseLabelEmbedding(nn.Module):
    """c_noise -> sin/Fourier features -> SiLU MLP, + class embedding (Ho et al. 2020; Dhariwal & Nichol 2021)."""

    def __init__(self, base_dim: int, emb_dim: int, num_classes: int = 0, embedding: str = "positional",
                 embedding_scale: float | None = None):
        super().__init__()
        _check_embedding_args(embedding, num_classes)
        self.num_classes = num_classes
        self.features = EMBEDDINGS[embedding](base_dim, embedding_scale)
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # num_classes + 1 rows: the last one is the unconditional (null) class
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

    def forward(self, c_noise: Tensor, labels: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        c_noise = torch.as_tensor(c_noise, device=self.mlp[0].weight.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        if c_noise.shape != (batch,):
            raise ValueError(f"c_noise must have shape ({batch},) or be a scalar, got {tuple(c_noise.shape)}")
        emb = self.mlp(self.features(c_noise).to(dtype))
        if self.label_emb is None:
            if labels is not None:
                raise ValueError("labels were given to an unconditional network (num_classes=0); "
                                 "pass labels=None or build it with num_classes > 0")
            return emb
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
        return emb + self.label_emb(labels)


def _check_embedding_args(embedding: str, num_classes: int):
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {sorted(EMBEDDINGS)}, got {embedding!r}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")


# ----------------------------------------------------------------------------------------------------
# MLP for low-dimensional data


class MLPBlock(nn.Module):
    """Pre-norm residual block h + W2 SiLU(W1 SiLU(LN h) + P SiLU(emb)), the embedding added inside."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.emb_proj(F.silu(emb))
        return h + self.fc2(F.silu(z))


class MLP(nn.Module):
    """Residual SiLU MLP for (B, dim) data, the noise-level (and class) embedding added in every block."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, emb_dim: int = 128, num_classes: int = 0,
                 embedding: str = "positional", out_dim: int | None = None, embedding_scale: float | None = None):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if value < 1:
                raise ValueError(f"MLP {name} must be >= 1, got {value}")
        if emb_dim < 2 or emb_dim % 2:
            raise ValueError(f"MLP emb_dim must be an even integer >= 2, got {emb_dim}")
        if out_dim is not None and out_dim < 1:
            raise ValueError(f"MLP out_dim must be None (= dim) or >= 1, got {out_dim}")
        _check_embedding_args(embedding, num_classes)
        self.dim, self.out_dim, self.num_classes = dim, out_dim or dim, num_classes
        self.emb = NoiseLabelEmbedding(emb_dim, emb_dim, num_classes, embedding, embedding_scale)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.out_dim)
        # zero-initialised output: F = 0 at the start (Ho et al. 2020's last conv; Dhariwal & Nichol 2021)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = self.emb(c_noise, labels, x.shape[0], x.dtype)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))


# ----------------------------------------------------------------------------------------------------
# U-Net (Ho et al. 2020, appendix B; Song et al. 2021 DDPM++)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest power of two dividing `channels` when that is fewer."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """DDPM residual block: GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-dropout-conv (zero init), 1x1 skip.

    With emb_dim=None it has no embedding input (the autoencoder's blocks, Rombach et al. 2022).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch) if emb_dim else None
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None:
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over pixels with a residual, GN in, zero-initialised 1x1 projection out (DDPM)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, hgt, wid = x.shape
        # (B, 3C, H, W) -> three (B, heads, HW, C/heads)
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid).permute(
            1, 0, 2, 4, 3).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return x + self.proj(h.transpose(-1, -2).reshape(b, c, hgt, wid))


class Downsample(nn.Module):
    """Halve the resolution: 3x3 conv with stride 2, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv if `with_conv`."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM / DDPM++ U-Net: GN-SiLU residual blocks + embedding, attention, skips (Ho et al. 2020; Song et al. 2021).

    The defaults are Ho et al.'s CIFAR-10 model (35.7M parameters with in_channels=3, image_size=32).
    The network is fully convolutional; `image_size` fixes where `attn_resolutions` fall and is validated
    against the number of down-samplings.
    """

    def __init__(self, in_channels: int, image_size: int, out_channels: int | None = None, channels: int = 128,
                 channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1, num_classes: int = 0,
                 embedding: str = "positional", num_heads: int = 1, resample_with_conv: bool = True,
                 embedding_scale: float | None = None):
        super().__init__()
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        self._check_args(in_channels, image_size, out_channels, channels, channel_mult, num_res_blocks,
                         attn_resolutions, dropout, num_classes, embedding, num_heads)
        self.in_channels, self.image_size = in_channels, image_size
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.factor = 2 ** (len(channel_mult) - 1)
        emb_dim = 4 * channels

        self.emb = NoiseLabelEmbedding(channels, emb_dim, num_classes, embedding, embedding_scale)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        # encoder: record every output channel count that becomes a skip connection
        self.down = nn.ModuleList()
        skips, ch, res = [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, channels * mult, emb_dim, dropout)]
                ch = channels * mult
                if res in attn_resolutions:
                    layers.append(AttnBlock(ch, num_heads))
                self.down.append(nn.ModuleList(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch, resample_with_conv)]))
                skips.append(ch)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), AttnBlock(ch, num_heads),
                                  ResBlock(ch, ch, emb_dim, dropout)])

        # decoder: num_res_blocks + 1 blocks per level, each eating one skip
        self.up, self.up_takes_skip = nn.ModuleList(), []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout)]
                ch = channels * mult
                if res in attn_resolutions:
                    layers.append(AttnBlock(ch, num_heads))
                self.up.append(nn.ModuleList(layers))
                self.up_takes_skip.append(True)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(ch, resample_with_conv)]))
                self.up_takes_skip.append(False)
                res *= 2
        assert not skips

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _check_args(in_channels, image_size, out_channels, channels, channel_mult, num_res_blocks,
                    attn_resolutions, dropout, num_classes, embedding, num_heads):
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("channels", channels),
                            ("num_res_blocks", num_res_blocks), ("num_heads", num_heads)):
            if value < 1:
                raise ValueError(f"UNet {name} must be >= 1, got {value}")
        if out_channels is not None and out_channels < 1:
            raise ValueError(f"UNet out_channels must be None (= in_channels) or >= 1, got {out_channels}")
        if not channel_mult or any(m < 1 for m in channel_mult):
            raise ValueError(f"UNet channel_mult must be a non-empty tuple of integers >= 1, got {channel_mult}")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(f"UNet image_size={image_size} must be divisible by 2^(len(channel_mult)-1)={factor} "
                             f"for channel_mult={channel_mult}; use a multiple of {factor} or fewer levels")
        reached = [image_size // 2**i for i in range(len(channel_mult))]
        unreached = [r for r in attn_resolutions if r not in reached]
        if unreached:
            raise ValueError(f"UNet attn_resolutions {unreached} are never reached; with image_size={image_size} "
                             f"and channel_mult={channel_mult} the resolutions are {reached}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet dropout must be in [0, 1), got {dropout}")
        _check_embedding_args(embedding, num_classes)
        widths = {channels * m for m in channel_mult}
        bad = sorted(w for w in widths if w % num_heads)
        if bad:
            raise ValueError(f"UNet num_heads={num_heads} must divide every level's width "
                             f"(channels * channel_mult = {sorted(widths)}); {bad} are not divisible")

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, H, W) with H, W divisible by "
                             f"{self.factor}, got {tuple(x.shape)}")
        emb = self.emb(c_noise, labels, x.shape[0], x.dtype)
        hs = [self.conv_in(x)]
        for layers in self.down:
            h = hs[-1]
            for layer in layers:
                h = layer(h, emb)
            hs.append(h)
        h = hs[-1]
        for layer in self.mid:
            h = layer(h, emb)
        for layers, takes_skip in zip(self.up, self.up_takes_skip):
            if takes_skip:  # concatenate the encoder output of the same resolution, last in first out
                h = torch.cat([h, hs.pop()], dim=1)
            for layer in layers:
                h = layer(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
