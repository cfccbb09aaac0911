"""Lightning callbacks shared by every family: weight averages, checkpoints, signals, pictures, periodic evaluation."""

from .checkpoint import ModelCheckpoint
from .ema import EMA, PostHocEMA
from .periodic import FidelityMetrics, ValidationLikelihood
from .samples import FinalReconstructions, FinalSamples, ReconstructionGrid, SampleGrid
from .signals import CheckpointOnSignal, MarkPreempting
from .weighting_plot import EffectiveWeightingPlot

__all__ = ["CheckpointOnSignal", "EMA", "EffectiveWeightingPlot", "FidelityMetrics", "FinalReconstructions",
           "FinalSamples", "MarkPreempting", "ModelCheckpoint", "PostHocEMA", "ReconstructionGrid", "SampleGrid",
           "ValidationLikelihood"]
