"""Lightning callbacks shared by every family."""

from .ema import EMA
from .evaluation import FidelityMetrics, ValidationLikelihood
from .posthoc_ema import PostHocEMA
from .samples import FinalSamples, ReconstructionGrid, SampleGrid
from .signals import CheckpointOnSignal
from .weighting_plot import EffectiveWeightingPlot

__all__ = ["CheckpointOnSignal", "EMA", "EffectiveWeightingPlot", "FidelityMetrics", "FinalSamples", "PostHocEMA",
           "ReconstructionGrid", "SampleGrid", "ValidationLikelihood"]
