"""The U-Net layout the image networks share: levels of blocks, skips, a middle, a mirrored decoder.

DDPM's U-Net, DDPM++ / NCSN++ and ADM differ in their blocks, their resampling steps, where the decoder attends and
their input / output pyramids, not in this layout (Ronneberger et al. 2015; Ho et al. 2020; Song et al. 2021;
Dhariwal & Nichol 2021). Every network here has the signature `forward(x, c_noise, labels=None,
augment_labels=None)`: c_noise is a (B,) real number (the parameterization's noise input), labels a (B,) int64
tensor or None, augment_labels a (B, augment_dim) float tensor or None (EDM's augmentation labels).
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Factory = Callable[..., nn.Module]


def check_unet_args(name: str, in_channels: int, image_size: int, out_channels: int | None, channels: int,
                    channel_mult: Sequence[int], num_blocks: int, attn_resolutions: Sequence[int],
                    dropout: float, blocks_arg: str = "num_blocks") -> list[int]:
    """Refuse a U-Net that cannot run at `image_size`, before any weights exist; the resolutions of its levels."""
    for arg, value in (("in_channels", in_channels), ("image_size", image_size), ("channels", channels),
                       (blocks_arg, num_blocks)):
        if value < 1:
            raise ValueError(f"{name} {arg} must be >= 1, got {value}")
    if out_channels is not None and out_channels < 1:
        raise ValueError(f"{name} out_channels must be None (= in_channels) or >= 1, got {out_channels}")
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"{name} channel_mult must be a non-empty tuple of integers >= 1, got {channel_mult}")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ValueError(f"{name} image_size={image_size} must be divisible by 2^(len(channel_mult)-1)={factor} "
                         f"for channel_mult={channel_mult}; use a multiple of {factor} or fewer levels")
    reached = [image_size // 2**i for i in range(len(channel_mult))]
    unreached = [r for r in attn_resolutions if r not in reached]
    if unreached:
        raise ValueError(f"{name} attn_resolutions {unreached} are never reached; with image_size={image_size} "
                         f"and channel_mult={channel_mult} the resolutions are {reached}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} dropout must be in [0, 1), got {dropout}")
    return reached


def check_heads(name: str, widths: Sequence[int], per_head: str, divisor: int) -> None:
    """Every attended width must split into whole heads."""
    bad = sorted(w for w in set(widths) if w % divisor)
    if bad:
        raise ValueError(f"{name} {per_head}={divisor} must divide the width (channels * channel_mult) of every "
                         f"level with attention and of the middle, {sorted(set(widths))}; {bad} are not divisible")


class UNetSkeleton(nn.Module):
    """Encoder, middle and decoder of a U-Net, from block factories; subclasses build `emb`, `conv_in` and a head.

    Level l runs at image_size / 2^l: `num_blocks` blocks of width widths[l] in the encoder, num_blocks + 1 in the
    decoder, each decoder block eating the skip of the encoder output in the mirrored place (last in, first out);
    a down (up) step between levels; block, attention, block in the middle. `down`, `mid` and `up` hold steps
    (ModuleLists of layers, each called as layer(h, emb)). `pyramid_in` (score-SDE's progressive input) merges
    a pyramid of the input after each down step.
    """

    def build_levels(self, stem: int, widths: Sequence[int], num_blocks: int, attention_levels: set[int],
                     block: Factory, attention: Factory, down: Factory, up: Factory,
                     attend_every_decoder_block: bool = True) -> int:
        """Build down / mid / up from `block(in_ch, out_ch)`, `attention(ch)`, `down(ch)`, `up(ch)`; the last width."""
        self.factor = 2 ** (len(widths) - 1)
        self.pyramid_in = None  # not a class attribute: it would hide a ModuleList assigned later
        self.down, self.down_resamples = nn.ModuleList(), []
        skips, ch = [stem], stem
        for level, width in enumerate(widths):
            for _ in range(num_blocks):
                self.down.append(self._step(block(ch, width), attention(width) if level in attention_levels else None))
                self.down_resamples.append(False)
                ch = width
                skips.append(ch)
            if level != len(widths) - 1:
                self.down.append(self._step(down(ch)))
                self.down_resamples.append(True)
                skips.append(ch)
        self.mid = nn.ModuleList([block(ch, ch), attention(ch), block(ch, ch)])
        # decoder: up_takes_skip per step; up_ends_level marks each level's last block
        self.up, self.up_takes_skip, self.up_ends_level = nn.ModuleList(), [], []
        for level, width in reversed(list(enumerate(widths))):
            for i in range(num_blocks + 1):
                attends = level in attention_levels and (attend_every_decoder_block or i == num_blocks)
                self.up.append(self._step(block(ch + skips.pop(), width), attention(width) if attends else None))
                self.up_takes_skip.append(True)
                self.up_ends_level.append(i == num_blocks)
                ch = width
            if level != 0:
                self.up.append(self._step(up(ch)))
                self.up_takes_skip.append(False)
                self.up_ends_level.append(False)
        assert not skips
        return ch

    @staticmethod
    def _step(*layers: nn.Module | None) -> nn.ModuleList:
        return nn.ModuleList(layer for layer in layers if layer is not None)

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {self.in_channels}, H, W) with H, W "
                             f"divisible by {self.factor}, got {tuple(x.shape)}")

    def encode(self, h: Tensor, emb: Tensor, aux: Tensor | None = None) -> list[Tensor]:
        """The skips: the stem's output and every encoder step's (the last is the encoder's output)."""
        skips, level = [h], 0
        for step, resamples in zip(self.down, self.down_resamples):
            for layer in step:
                h = layer(h, emb)
            if resamples and self.pyramid_in is not None:  # merge the input pyramid at the new resolution
                aux, h = self.pyramid_in[level](aux, h)
                level += 1
            skips.append(h)
        return skips

    def decode(self, skips: list[Tensor], emb: Tensor) -> list[Tensor]:
        """Middle and decoder; the features at the end of each level, lowest resolution first."""
        h, ends = skips[-1], []
        for layer in self.mid:
            h = layer(h, emb)
        for step, takes_skip, ends_level in zip(self.up, self.up_takes_skip, self.up_ends_level):
            if takes_skip:  # concatenate the encoder output of the same place, last in first out
                h = torch.cat([h, skips.pop()], dim=1)
            for layer in step:
                h = layer(h, emb)
            if ends_level:
                ends.append(h)
        return ends

    def output(self, ends: list[Tensor]) -> Tensor:
        """The head on the last level's features: GN-SiLU-conv."""
        return self.conv_out(F.silu(self.norm_out(ends[-1])))

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        self.check_input(x)
        emb = self.emb(c_noise, labels, x.shape[0], x.dtype, augment_labels)
        skips = self.encode(self.conv_in(x), emb, x if self.pyramid_in is not None else None)
        return self.output(self.decode(skips, emb))
