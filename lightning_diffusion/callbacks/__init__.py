"""Lightning callbacks shared by every family."""

from .ema import EMA
from .samples import FinalSamples, SampleGrid

__all__ = ["EMA", "FinalSamples", "SampleGrid"]
