"""The DDPM / DDPM++ U-Net F(x, c_noise, labels) (Ho et al. 2020, appendix B; Song et al. 2021).

Every network here has the signature `forward(x, c_noise, labels=None)`: c_noise is a (B,) real number (the
parameterization's noise input) and labels a (B,) int64 tensor or None.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import NoiseLabelEmbedding, check_embedding_args
from .layers import AttnBlock, Downsample, ResBlock, Upsample, group_norm


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
        check_embedding_args(embedding, num_classes)
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
