"""ADM, the U-Net of Dhariwal & Nichol 2021, as EDM reimplements it (Karras et al. 2022, `DhariwalUNet`)."""

from collections.abc import Sequence
from functools import partial

from torch import nn

from .embeddings import NoiseLabelEmbedding, check_embedding_args
from .layers import AttnBlock, ResBlock, group_norm, zero_init
from .skeleton import UNetSkeleton, check_heads, check_unet_args


class DhariwalUNet(UNetSkeleton):
    """ADM: residual blocks with scale-shift norm and resampling inside, multi-head attention (Dhariwal & Nichol 2021).

    Widths channels * channel_mult, `num_blocks` blocks per level; attention with channels_per_head channels per
    head after every block at `attn_resolutions` (encoder and decoder) and in the middle; GN eps 1e-5 with >= 4
    channels per group; down / up-sampling by 2x2 averaging / nearest neighbour inside a residual block whose skip
    has no conv; PyTorch's default init (EDM's kaiming-uniform / sqrt(3)), residual outputs and the head at zero.
    c_noise gets ADM's positional features (cos first, frequencies 10000^(-k/half); embedding_scale 1 by default)
    of width `channels`, plus EDM's augmentation labels (zero-initialised map), a 2-layer SiLU MLP to 4 * channels,
    plus the class embedding (a zero null class: EDM's label map is bias-free). The defaults are EDM's ImageNet-64
    `adm` config (295.90M parameters with in_channels=3, image_size=64, num_classes=1000).
    """

    def __init__(self, in_channels: int, image_size: int, out_channels: int | None = None, channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8), dropout: float = 0.1, num_classes: int = 0,
                 augment_dim: int = 0, channels_per_head: int = 64, embedding_scale: float = 1.0):
        super().__init__()
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        reached = check_unet_args("DhariwalUNet", in_channels, image_size, out_channels, channels, channel_mult,
                                  num_blocks, attn_resolutions, dropout)
        check_embedding_args("positional", num_classes, augment_dim)
        if channels_per_head < 1:
            raise ValueError(f"DhariwalUNet channels_per_head must be >= 1, got {channels_per_head}")
        widths = [channels * m for m in channel_mult]
        attention_levels = {level for level, res in enumerate(reached) if res in attn_resolutions}
        check_heads("DhariwalUNet", [widths[lv] for lv in attention_levels] + widths[-1:], "channels_per_head",
                    channels_per_head)
        self.in_channels, self.image_size = in_channels, image_size
        self.out_channels = out_channels or in_channels
        self.num_classes, self.augment_dim = num_classes, augment_dim
        emb_dim = 4 * channels
        norm = partial(group_norm, eps=1e-5, min_group_size=4)
        block = partial(ResBlock, emb_dim=emb_dim, dropout=dropout, adaptive_scale=True, norm=norm)

        self.emb = NoiseLabelEmbedding(channels, emb_dim, num_classes, "positional", embedding_scale, augment_dim,
                                       learned_null=False, endpoint=False, cos_first=True)
        if augment_dim:
            zero_init(self.emb.augment_proj)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        ch = self.build_levels(widths[0], widths, num_blocks, attention_levels, block=block,
                               attention=lambda c: AttnBlock(c, c // channels_per_head, norm=norm),
                               down=lambda c: block(c, c, resample="down"), up=lambda c: block(c, c, resample="up"))
        self.norm_out = norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, self.out_channels, 3, padding=1))
