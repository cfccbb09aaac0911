"""The DDPM U-Net F(x, c_noise, labels) (Ho et al. 2020, appendix B), on the shared U-Net skeleton."""

from functools import partial

from torch import nn

from .embeddings import NoiseLabelEmbedding, check_embedding_args
from .layers import AttnBlock, Downsample, ResBlock, Upsample, group_norm, zero_init
from .skeleton import UNetSkeleton, check_heads, check_unet_args


class UNet(UNetSkeleton):
    """DDPM U-Net: GN-SiLU residual blocks + embedding, attention, skips (Ho et al. 2020; Song et al. 2021).

    The defaults are Ho et al.'s CIFAR-10 model (35.75M parameters with in_channels=3, image_size=32), exactly:
    stride-2 down-sampling convs padded (0, 1) per side, single-head attention at 16x16, the step embedding
    sin/cos(t * 10000^(-k/63)) of the 0-based step t (c_noise = `ddpm_step` with embedding_scale=1), so that the
    weights of diffusers' `UNet2DModel` (google/ddpm-cifar10-32) convert into it
    (`lightning.convert.diffusers_unet`). The network is fully convolutional; `image_size` fixes where
    `attn_resolutions` fall and is validated against the number of down-samplings. GroupNorm keeps at least
    `min_group_size` channels a group (Ho et al.'s 32 groups at their widths): with one, it would remove the
    per-channel embedding bias a block adds before it, and the block would ignore the noise level and the label.
    """

    def __init__(self, in_channels: int, image_size: int, out_channels: int | None = None, channels: int = 128,
                 channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1, num_classes: int = 0,
                 embedding: str = "positional", num_heads: int = 1, resample_with_conv: bool = True,
                 embedding_scale: float | None = None, augment_dim: int = 0, min_group_size: int = 4):
        super().__init__()
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        reached = check_unet_args("UNet", in_channels, image_size, out_channels, channels, channel_mult,
                                  num_res_blocks, attn_resolutions, dropout, blocks_arg="num_res_blocks")
        check_embedding_args(embedding, num_classes, augment_dim)
        if num_heads < 1:
            raise ValueError(f"UNet num_heads must be >= 1, got {num_heads}")
        widths = [channels * m for m in channel_mult]
        attention_levels = {level for level, res in enumerate(reached) if res in attn_resolutions}
        check_heads("UNet", [widths[lv] for lv in attention_levels] + widths[-1:], "num_heads", num_heads)
        self.in_channels, self.image_size = in_channels, image_size
        self.out_channels = out_channels or in_channels
        self.num_classes, self.augment_dim = num_classes, augment_dim
        emb_dim = 4 * channels

        self.emb = NoiseLabelEmbedding(channels, emb_dim, num_classes, embedding, embedding_scale, augment_dim)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        norm = partial(group_norm, min_group_size=min_group_size)
        ch = self.build_levels(channels, widths, num_res_blocks, attention_levels,
                               block=partial(ResBlock, emb_dim=emb_dim, dropout=dropout, norm=norm),
                               attention=partial(AttnBlock, num_heads=num_heads, norm=norm),
                               down=partial(Downsample, with_conv=resample_with_conv),
                               up=partial(Upsample, with_conv=resample_with_conv))
        self.norm_out = norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, self.out_channels, 3, padding=1))
