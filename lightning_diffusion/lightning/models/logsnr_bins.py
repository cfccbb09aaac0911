"""The loss per logsnr bin, so weightings can be compared where they act (cf. improved DDPM's loss per quartile of t).

Every rank holds the same bins and reduces sums and counts together, empty bins as zero counts, so the collectives of
ranks whose batches miss different bins still pair (a per-bin `self.log(..., sync_dist=True)` only for non-empty bins
hung DDP validation).
"""

from collections.abc import Sequence

import torch
from torch import Tensor


class LogsnrBins:
    """Sums and counts of a per-sample loss in the bins (-inf, e_0), [e_0, e_1), ..., [e_K-1, inf) of logsnr."""

    def __init__(self, edges: Sequence[float]):
        edges = [float(e) for e in edges]
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"logsnr_bins must be a non-empty strictly increasing list, got {edges}")
        self.edges = torch.tensor(edges, dtype=torch.float64)
        self.names = ([f"<{edges[0]:g}"] + [f"{a:g}..{b:g}" for a, b in zip(edges[:-1], edges[1:])]
                      + [f">{edges[-1]:g}"])
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.counts = torch.zeros(len(self.names), dtype=torch.float64)

    def sums_and_counts(self, loss: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        """Per-bin sum of `loss` and number of samples of one batch, (K + 1,) each, on the loss's device."""
        idx = torch.bucketize(logsnr.to(torch.float64), self.edges.to(logsnr.device))
        sums = torch.zeros(len(self.names), dtype=torch.float64, device=loss.device)
        counts = torch.zeros_like(sums)
        sums.index_add_(0, idx, loss.detach().to(torch.float64))
        counts.index_add_(0, idx, torch.ones_like(sums[idx]))
        return sums, counts

    def add(self, loss: Tensor, logsnr: Tensor) -> None:
        """Accumulate one batch (validation: over the epoch, reduced across ranks at its end)."""
        sums, counts = self.sums_and_counts(loss, logsnr)
        self.sums, self.counts = self.sums + sums.cpu(), self.counts + counts.cpu()

    @staticmethod
    def means(names: list[str], sums: Tensor, counts: Tensor, prefix: str) -> dict[str, float]:
        """{prefix[name]: mean} for the bins with samples."""
        return {f"{prefix}[{name}]": float(s / c) for name, s, c in zip(names, sums.tolist(), counts.tolist()) if c}
