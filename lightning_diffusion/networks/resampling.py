"""Resampling by 2 with separable FIR filters, as DDPM++ / NCSN++ do (Song et al. 2021; Karras et al. 2022).

Taps [1, 1] are the naive resampling of score-SDE's `fir=False` (2x2 average pooling down, nearest-neighbour up);
[1, 3, 3, 1] is its FIR filter (`fir=True`, after StyleGAN2's upfirdn2d, Karras et al. 2020). The 2-D filter is
f f^T / (sum f)^2: it sums to one, so a constant image stays constant away from the zero-padded border.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIRECTIONS = ("up", "down")


def check_taps(taps: Sequence[float]) -> None:
    """An even number (>= 2) of symmetric, non-negative taps with a positive sum: a linear-phase low-pass filter that
    halves or doubles a side exactly (symmetric, so correlation and upfirdn2d's convolution agree)."""
    taps = list(taps)
    if len(taps) < 2 or len(taps) % 2 or any(t < 0 for t in taps) or sum(taps) <= 0 or taps != taps[::-1]:
        raise ValueError(f"resampling filter taps must be an even number (>= 2) of symmetric non-negative values "
                         f"with a positive sum, e.g. [1, 1] (naive) or [1, 3, 3, 1] (FIR); got {taps}")


def fir_filter(taps: Sequence[float]) -> Tensor:
    """The (k, k) filter f f^T / (sum f)^2 of 1-D taps f (score-SDE's `_setup_kernel`)."""
    check_taps(taps)
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return torch.outer(f, f) / f.sum().square()


class Resample(nn.Module):
    """Halve ("down") or double ("up") both sides of every channel with the FIR filter of `taps`.

    Down: the filter at stride 2 (padding (k-2)/2 each side). Up: zero insertion, then 4x the filter (a transposed
    convolution at stride 2), so that up-sampling a constant gives the constant. `padding` overrides the down
    padding (the fused convolution of `ConvDown` pads before the filter).
    """

    def __init__(self, direction: str, taps: Sequence[float] = (1, 1), padding: int | None = None):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"Resample direction must be one of {list(DIRECTIONS)}, got {direction!r}")
        self.direction = direction
        self.register_buffer("filter", fir_filter(taps)[None, None], persistent=False)
        self.padding = (len(taps) - 2) // 2 if padding is None else padding

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        f = self.filter.to(x.dtype).tile(channels, 1, 1, 1)  # one filter per channel (depthwise)
        if self.direction == "down":
            return F.conv2d(x, f, stride=2, padding=self.padding, groups=channels)
        return F.conv_transpose2d(x, 4 * f, stride=2, padding=self.padding, groups=channels)


class ConvDown(nn.Module):
    """A 3x3 convolution fused with FIR down-sampling: conv (padded for both), then the filter at stride 2.

    Score-SDE's `Conv2d(down=True)` of NCSN++'s residual input pyramid (`progressive_input='residual'`), which
    filters first and convolves at stride 2: the same linear map, as both are full convolutions of the two kernels.
    """

    def __init__(self, in_ch: int, out_ch: int, taps: Sequence[float] = (1, 1)):
        super().__init__()
        check_taps(taps)
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1 + (len(taps) - 2) // 2)
        self.down = Resample("down", taps, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.conv(x))
