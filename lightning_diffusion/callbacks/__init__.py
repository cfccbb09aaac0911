"""Lightning callbacks shared by every family."""

from .ema import EMA
from .posthoc_ema import PostHocEMA
from .samples import FinalSamples, SampleGrid

__all__ = ["EMA", "FinalSamples", "PostHocEMA", "SampleGrid"]
