"""Progress bars for long work (sampling, feature extraction, likelihoods, encoding, sweeps, grid search, extractor
training), kept out of the math.

tqdm, as Lightning's own progress bar: on rank 0 only, off when asked (`progress=false`), and sparse when the output
is a log file rather than a terminal (a line every 30 s instead of a redraw every 0.1 s).
"""

import sys

from lightning.fabric.utilities.rank_zero import rank_zero_only
from tqdm import tqdm

from ..core.samplers import count_nfe


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it") -> tqdm:
    """A tqdm bar of `total` units, disabled off rank 0 or when not `enabled` (then every call on it is a no-op)."""
    on = enabled and rank_zero_only.rank == 0
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not on, dynamic_ncols=interactive,
                mininterval=0.1 if interactive else 30.0, file=sys.stderr, leave=interactive)


def sampling_bar(model, batches: int, desc: str, enabled: bool = True, sampler=None, grid=None) -> tqdm:
    """A bar over the network evaluations of drawing `batches` batches with `sampler` on `grid` (the model's by
    default): one unit per denoiser call on a batch, so it moves at every sampling step, not once a batch is done.
    Feed it from `generate`'s `on_call` (`on_call=lambda nfe: bar.update()`); an adaptive sampler's count is a guide.
    """
    per_batch = count_nfe(sampler or model.sampler, grid or model.grid, model.process, (1, *model.sample_shape))
    return progress_bar(batches * per_batch, desc, enabled, "NFE")
