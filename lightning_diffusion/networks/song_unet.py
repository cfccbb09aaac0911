"""DDPM++ and NCSN++ (Song et al. 2021, score-SDE), with the options of EDM's reimplementation (Karras et al. 2022)."""

import math
from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn

from .embeddings import NoiseLabelEmbedding, check_embedding_args
from .layers import AttnBlock, ResBlock, group_norm, xavier_init, zero_init
from .resampling import ConvDown, Resample, check_taps
from .skeleton import UNetSkeleton, check_unet_args

ENCODERS = ("standard", "skip", "residual")
DECODERS = ("standard", "skip")
SKIP_RESCALE = math.sqrt(0.5)  # score-SDE's skip_rescale: residual sums are divided by sqrt(2)


class InputSkip(nn.Module):
    """Score-SDE's progressive_input='input_skip': the FIR-down-sampled input, through a 1x1 conv, added to h."""

    def __init__(self, aux_ch: int, ch: int, taps: Sequence[float]):
        super().__init__()
        self.down = Resample("down", taps)
        self.conv = nn.Conv2d(aux_ch, ch, 1)

    def forward(self, aux: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        aux = self.down(aux)
        return aux, h + self.conv(aux)


class InputResidual(nn.Module):
    """Score-SDE's progressive_input='residual': aux <- (h + conv-down(aux)) / sqrt(2), and h <- aux."""

    def __init__(self, aux_ch: int, ch: int, taps: Sequence[float]):
        super().__init__()
        self.conv = ConvDown(aux_ch, ch, taps)

    def forward(self, aux: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        aux = (h + self.conv(aux)) * SKIP_RESCALE
        return aux, aux


PYRAMIDS = {"skip": InputSkip, "residual": InputResidual}


def head(ch: int, out_ch: int, norm) -> nn.Sequential:
    """GN-SiLU-conv to the output channels, zero-initialised."""
    return nn.Sequential(norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, out_ch, 3, padding=1)))


class SongUNet(UNetSkeleton):
    """DDPM++ / NCSN++: BigGAN residual blocks, skip_rescale, progressive input / output (Song et al. 2021).

    Residual blocks resample inside (FIR `resample_filter`: [1, 1] naive, [1, 3, 3, 1] score-SDE's FIR) with a 1x1
    projected skip; every residual sum is scaled by sqrt(1/2); one-head attention after each encoder block at
    `attn_resolutions`, after the last decoder block of such a level and in the middle; GN with >= 4 channels per
    group, eps 1e-6; Glorot init, residual outputs and heads at zero. c_noise gets positional (DDPM++) or Fourier
    (NCSN++) features of width channels * channel_mult_noise (embedding_scale None: 1, resp. 16), class and
    augmentation labels are added to them (EDM), then a 2-layer SiLU MLP to 4 * channels. `encoder`: "standard",
    "skip" (score-SDE's progressive_input 'input_skip') or "residual" ('residual'); `decoder`: "standard" or "skip"
    (progressive 'output_skip': a head per level, up-sampled and summed).

    EDM's configs (train.py): DDPM++ channel_mult (2, 2, 2), positional; NCSN++ channel_mult_noise 2, Fourier,
    encoder "residual", filter [1, 3, 3, 1]. Score-SDE's (configs/vp, configs/ve): channel_mult (1, 2, 2, 2),
    num_blocks 4 (deep: 8), DDPM++ positional with [1, 1], NCSN++ Fourier with [1, 3, 3, 1] and encoder "residual".

    Score-SDE's `NCSNpp.all_modules` (PyTorch checkpoints, `module.` prefix) map in order onto: [0 Fourier `W` ->
    emb.features.freqs], Dense -> emb.mlp.0, Dense -> emb.mlp.2, conv3x3 -> conv_in; then the encoder in order,
    ResnetBlockBigGANpp -> down.{k}.0 (a following AttnBlockpp -> down.{k}.1; a down block is its own step k) and the
    progressive-input module of a down-sampling -> pyramid_in.{l}.conv (Combine's Conv_0, or Downsample's
    Conv2d_0 -> .conv.conv); mid.0, mid.1, mid.2; the decoder likewise into up.{k}, each output-skip GroupNorm, conv
    pair -> heads.{j}.0, heads.{j}.2; the final GroupNorm, conv -> heads.0. Inside a block: GroupNorm_0 -> norm1,
    Conv_0 -> conv1, Dense_0 -> emb_proj, GroupNorm_1 -> norm2, Conv_1 -> conv2, Conv_2 -> skip; inside attention:
    GroupNorm_0 -> norm, NIN_0..2 (W transposed, stacked q, k, v) -> qkv, NIN_3 -> proj.
    """

    def __init__(self, in_channels: int, image_size: int, out_channels: int | None = None, channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, num_classes: int = 0,
                 augment_dim: int = 0, embedding: str = "positional", embedding_scale: float | None = None,
                 channel_mult_noise: int = 1, encoder: str = "standard", decoder: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        super().__init__()
        channel_mult, attn_resolutions, taps = tuple(channel_mult), tuple(attn_resolutions), tuple(resample_filter)
        reached = check_unet_args("SongUNet", in_channels, image_size, out_channels, channels, channel_mult,
                                  num_blocks, attn_resolutions, dropout)
        self._check_args(embedding, num_classes, augment_dim, channel_mult_noise, encoder, decoder, taps)
        self.in_channels, self.image_size = in_channels, image_size
        self.out_channels = out_channels or in_channels
        self.num_classes, self.augment_dim = num_classes, augment_dim
        widths, emb_dim = [channels * m for m in channel_mult], 4 * channels
        if embedding_scale is None:  # the papers feed c_noise unscaled to the positional features
            embedding_scale = 1.0 if embedding == "positional" else None
        norm = partial(group_norm, eps=1e-6, min_group_size=4)
        block = partial(ResBlock, emb_dim=emb_dim, dropout=dropout, taps=taps, resample_proj=True,
                        skip_scale=SKIP_RESCALE, norm=norm)

        self.emb = NoiseLabelEmbedding(channels * channel_mult_noise, emb_dim, num_classes, embedding,
                                       embedding_scale, augment_dim, labels_first=True)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        ch = self.build_levels(channels, widths, num_blocks,
                               {level for level, res in enumerate(reached) if res in attn_resolutions},
                               block=block, attention=partial(AttnBlock, num_heads=1, skip_scale=SKIP_RESCALE,
                                                              norm=norm),
                               down=lambda c: block(c, c, resample="down"), up=lambda c: block(c, c, resample="up"),
                               attend_every_decoder_block=False)
        if encoder != "standard":  # the pyramid has the input's channels ("skip") or the level's ("residual")
            aux = [in_channels] * len(widths) if encoder == "skip" else [in_channels] + widths[:-1]
            self.pyramid_in = nn.ModuleList(PYRAMIDS[encoder](aux[lv], widths[lv], taps)
                                            for lv in range(len(widths) - 1))
        # a head per decoder level, lowest resolution first ("skip"), or one on the last level
        self.heads = nn.ModuleList(head(w, self.out_channels, norm) for w in
                                   (reversed(widths) if decoder == "skip" else [ch]))
        self.head_up = Resample("up", taps) if decoder == "skip" else None
        xavier_init(self)

    @staticmethod
    def _check_args(embedding, num_classes, augment_dim, channel_mult_noise, encoder, decoder, taps):
        check_embedding_args(embedding, num_classes, augment_dim)
        if channel_mult_noise < 1:
            raise ValueError(f"SongUNet channel_mult_noise must be >= 1 (1 for DDPM++, 2 for NCSN++), "
                             f"got {channel_mult_noise}")
        if encoder not in ENCODERS:
            raise ValueError(f"SongUNet encoder must be one of {list(ENCODERS)}, got {encoder!r}")
        if decoder not in DECODERS:
            raise ValueError(f"SongUNet decoder must be one of {list(DECODERS)}, got {decoder!r}")
        check_taps(taps)

    def output(self, ends: list[Tensor]) -> Tensor:
        """The single head on the last level, or the output pyramid: up-sample, add the next level's head."""
        out = None
        for h, level_head in zip(ends[-len(self.heads):], self.heads):
            out = level_head(h) if out is None else self.head_up(out) + level_head(h)
        return out
