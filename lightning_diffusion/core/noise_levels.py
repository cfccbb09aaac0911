"""Training noise-level distributions p(t), kept apart from the weighting w(t) (Karras et al. 2022, Table 1).

Two independent axes:
  (a) where the uniforms u in [0, 1) come from: `uniform_draws` (i.i.d.) or `stratified_draws` (one draw per stratum
      of the global batch across ranks, lower variance);
  (b) an inverse CDF u -> t: `uniform_time`, `uniform_discrete`, `log_normal`, `ladder`, or the importance-sampled
      `LossSecondMomentDraw`.

Every noise-level draw is called as `draw(u, process) -> t` (a (B,) tensor of process time; int64 for the discrete
ones). A draw whose p(t) learns from the losses (importance sampling) is an `AdaptiveDraw`: it also reweights each
sample so the objective stays that of uniform t, takes the losses, and keeps its state in the checkpoint. A draw may
carry an analytic `logsnr_density(logsnr, process, **params)` attribute; other densities over logsnr are computed
numerically from the inverse CDF (`logsnr_density`).
"""

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .processes import Process


def uniform_draws(n: int, generator: torch.Generator | None = None, device=None, dtype=torch.float64) -> Tensor:
    """n i.i.d. uniforms on [0, 1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    return torch.rand(n, generator=generator, device=device, dtype=dtype)


def stratified_draws(n: int, rank: int = 0, world_size: int = 1, generator: torch.Generator | None = None,
                     device=None, dtype=torch.float64) -> Tensor:
    """Stratified uniforms (i + U_i) / N over the global batch N = n * world_size; this rank takes strata rank + k W.

    The low-discrepancy draws of Kingma et al. 2021 (VDM, appendix I.1) and k-diffusion's `stratified_uniform`:
    across ranks the global batch hits every stratum exactly once. Interleaved, so every rank's share spans all of
    [0, 1) too (contiguous shares would make each rank's logged loss that of a band of noise levels).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    strata = torch.arange(rank, n * world_size, world_size, device=device, dtype=dtype)
    return (strata + torch.rand(n, generator=generator, device=device, dtype=dtype)) / (n * world_size)


def uniform_time(u: Tensor, process: Process) -> Tensor:
    """t ~ U[t_min, t_max], the continuous-time default (Song et al. 2021; Kingma et al. 2021)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    return process.t_min + u * (process.t_max - process.t_min)


def uniform_discrete(u: Tensor, process: Process) -> Tensor:
    """t ~ U{1, ..., T} as int64, DDPM's training draw (Ho et al. 2020, Algorithm 1)."""
    if not process.discrete:
        raise ValueError(f"uniform_discrete needs a discrete process with T steps (DiscreteDDPM), got {process!r}")
    u = torch.as_tensor(u, dtype=torch.float64)
    return (u * process.T).floor().long().clamp(0, process.T - 1) + 1


def log_normal(u: Tensor, process: Process, P_mean: float = -1.2, P_std: float = 1.2) -> Tensor:
    """EDM's ln sigma~ ~ N(P_mean, P_std^2) as t = t_of_sigma_tilde, clipped to [t_min, t_max] (Karras et al. 2022, Table 1)."""
    if not P_std > 0:
        raise ValueError(f"log_normal needs P_std > 0, got P_std={P_std}")
    u = torch.as_tensor(u, dtype=torch.float64)
    log_sigma = P_mean + P_std * torch.special.ndtri(u)
    # t_of_logsnr bisects inside [t_min, t_max], which is the clipping
    return process.t_of_logsnr(-2.0 * log_sigma)


def ladder(u: Tensor, process: Process, levels: int | list = 10) -> Tensor:
    """Uniform over a grid of times: `levels` evenly spaced in [t_min, t_max], or the given times (Song & Ermon 2019, sec. 4.2).

    NCSN's geometric ladder of L sigmas is VESDE at L evenly spaced times.
    """
    if isinstance(levels, int):
        if levels < 1:
            raise ValueError(f"ladder needs levels >= 1 or a list of times, got levels={levels}")
        grid = torch.linspace(process.t_min, process.t_max, levels, dtype=torch.float64) if levels > 1 \
            else torch.tensor([process.t_max], dtype=torch.float64)
    else:
        grid = torch.as_tensor(levels, dtype=torch.float64)
        if grid.ndim != 1 or len(grid) < 1:
            raise ValueError(f"ladder needs a non-empty 1-D list of times, got shape {tuple(grid.shape)}")
    u = torch.as_tensor(u, dtype=torch.float64)
    i = (u * len(grid)).floor().long().clamp(0, len(grid) - 1)
    return grid.to(u.device)[i]


@runtime_checkable
class AdaptiveDraw(Protocol):
    """A noise-level draw that learns p(t) from the training losses; the training module's one test of capability."""

    def __call__(self, u: Tensor, process: Process) -> Tensor: ...

    def reweight(self, t: Tensor) -> Tensor:
        """The factor that keeps E_{t ~ p} [reweight(t) L_t] the objective under uniform t."""

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Take every rank's (t, loss) of a step (all-gathered), so every rank keeps the same state."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LossSecondMomentDraw:
    """Importance sampling of t, p_t ~ sqrt(E[L_t^2]) over the last `history` losses per t (Nichol & Dhariwal 2021, eq. 18).

    Uniform over 1..T until every t has `history` losses. `reweight(t) = 1 / (T p_t)` makes E_{t~p}[reweight L_t]
    equal the uniform-t objective. A small `uniform_prob` mass keeps every t reachable (as in the paper's code).
    Under DDP, call `update` with the all-gathered (t, losses) so every rank keeps the same state.
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        if T < 1:
            raise ValueError(f"LossSecondMomentDraw needs T >= 1, got T={T}")
        if history < 1:
            raise ValueError(f"LossSecondMomentDraw needs history >= 1, got history={history}")
        if not 0 <= uniform_prob <= 1:
            raise ValueError(f"uniform_prob must lie in [0, 1], got uniform_prob={uniform_prob}")
        self.T, self.history, self.uniform_prob = T, history, uniform_prob
        self.losses = torch.zeros(T, history, dtype=torch.float64)
        self.counts = torch.zeros(T, dtype=torch.int64)

    @property
    def warm(self) -> bool:
        """Whether every t has a full history (before that, p is uniform)."""
        return bool((self.counts >= self.history).all())

    def probs(self) -> Tensor:
        """p_t for t = 1..T, shape (T,)."""
        if not self.warm:
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        p = (self.losses**2).mean(1).sqrt()
        p = p / p.sum()
        return (1 - self.uniform_prob) * p + self.uniform_prob / self.T

    def __call__(self, u: Tensor, process: Process) -> Tensor:
        """Inverse CDF of p_t: u in [0, 1) -> t in 1..T (int64)."""
        if not process.discrete or process.T != self.T:
            raise ValueError(f"LossSecondMomentDraw has T={self.T}: it needs a DiscreteDDPM with T={self.T}, got "
                             f"{process!r}")
        u = torch.as_tensor(u, dtype=torch.float64)
        cdf = self.probs().cumsum(0).to(u.device)
        return torch.searchsorted(cdf, u, right=True).clamp(max=self.T - 1) + 1

    def reweight(self, t: Tensor) -> Tensor:
        """1 / (T p_t): the importance weight that leaves the objective as under uniform t."""
        t = torch.as_tensor(t).long()
        return 1.0 / (self.T * self.probs().to(t.device)[t - 1])

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each sample's loss to its t's ring buffer of the last `history` values."""
        t = torch.as_tensor(t).long().flatten().cpu()
        losses = torch.as_tensor(losses).detach().to(torch.float64).flatten().cpu()
        if t.shape != losses.shape:
            raise ValueError(f"update needs one loss per t, got t {tuple(t.shape)} and losses {tuple(losses.shape)}")
        if t.numel() and (t.min() < 1 or t.max() > self.T):
            raise ValueError(f"t must lie in 1..{self.T}, got values in [{int(t.min())}, {int(t.max())}]")
        for ti, li in zip(t.tolist(), losses.tolist()):
            self.losses[ti - 1, self.counts[ti - 1] % self.history] = li
            self.counts[ti - 1] += 1

    def state_dict(self) -> dict:
        """The loss history, so a resumed run keeps its p_t (store it in the checkpoint)."""
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the loss history written by `state_dict`."""
        if tuple(state["losses"].shape) != (self.T, self.history):
            raise ValueError(f"state has losses of shape {tuple(state['losses'].shape)}, expected {(self.T, self.history)}")
        self.losses = state["losses"].clone().to(torch.float64)
        self.counts = state["counts"].clone().to(torch.int64)

    def __repr__(self) -> str:
        return f"LossSecondMomentDraw(T={self.T}, history={self.history}, uniform_prob={self.uniform_prob})"


def _in_range(logsnr: Tensor, process: Process) -> Tensor:
    ends = process.logsnr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64))
    return (logsnr >= ends[0]) & (logsnr <= ends[1])


def _uniform_time_density(logsnr: Tensor, process: Process) -> Tensor:
    """p(lambda) = 1 / ((t_max - t_min) |d lambda / dt|) at t(lambda), zero outside the range."""
    t = process.t_of_logsnr(logsnr)
    p = 1.0 / ((process.t_max - process.t_min) * process.dlogsnr_dt(t).abs())
    return torch.where(_in_range(logsnr, process), p, torch.zeros_like(p))


def _log_normal_density(logsnr: Tensor, process: Process, P_mean: float = -1.2, P_std: float = 1.2) -> Tensor:
    """ln sigma~ = -lambda / 2 ~ N(P_mean, P_std^2): p(lambda) = N(-lambda / 2; P_mean, P_std^2) / 2 (clipped end masses not shown)."""
    z = (-logsnr / 2 - P_mean) / P_std
    p = torch.exp(-0.5 * z**2) / (2 * P_std * math.sqrt(2 * math.pi))
    return torch.where(_in_range(logsnr, process), p, torch.zeros_like(p))


uniform_time.logsnr_density = _uniform_time_density
log_normal.logsnr_density = _log_normal_density


def _cell_edges(grid: Tensor) -> Tensor:
    """Edges of the cells around the points of an increasing grid (midpoints, and the end cells mirrored)."""
    mid = (grid[1:] + grid[:-1]) / 2
    return torch.cat([grid[:1] - (mid[0] - grid[0]), mid, grid[-1:] + (grid[-1] - mid[-1])])


def atom_masses(draw, process: Process, iters: int = 60) -> Tensor:
    """P(t = k) for k = 1..T of a discrete draw, from its inverse CDF: P(t <= k) = sup {u : draw(u) <= k}, bisected."""
    k = torch.arange(1, process.T + 1, dtype=torch.float64)
    lo, hi = torch.zeros_like(k), torch.ones_like(k)
    for _ in range(iters):
        u = (lo + hi) / 2
        below = torch.as_tensor(draw(u, process)).to(torch.float64) <= k
        lo, hi = torch.where(below, u, lo), torch.where(below, hi, u)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), lo[:-1], torch.ones(1, dtype=torch.float64)])
    return cdf.diff()


def spread_logsnr_density(draw, process: Process, logsnr_grid: Tensor) -> Tensor:
    """A discrete draw's density over logsnr with each atom t = k spread over its step, t in [k - 1, k] (uniformly in
    the process's interpolated time): P(logsnr <= l) = sum_k p_k clip(k - t(l), 0, 1). The same objective as the
    point masses to first order in the step, drawn as the smooth curve a plot of DDPM's schedule should show."""
    if not process.discrete:
        raise ValueError(f"spreading atoms needs a discrete process, got {process!r}")
    edges = _cell_edges(torch.as_tensor(logsnr_grid, dtype=torch.float64))
    masses, k = atom_masses(draw, process), torch.arange(1, process.T + 1, dtype=torch.float64)
    t = process.t_of_logsnr(edges).to(torch.float64)
    cdf = (masses[None, :] * (k[None, :] - t[:, None]).clamp(0, 1)).sum(1)
    return cdf.diff() / edges.diff()


def logsnr_density(draw, process: Process, logsnr_grid: Tensor, iters: int = 60) -> Tensor:
    """Density over logsnr that `draw` induces, on an increasing grid: analytic where the draw carries one, else numerical.

    Numerically: an inverse CDF is non-decreasing in u and logsnr decreases in t, so P(logsnr <= l) = 1 - u*(l) with
    u*(l) found by bisection; the density at a grid point is the mass of the cell around it (edges at the midpoints)
    over the cell's width. Exact for the point masses of discrete draws (spikes of mass / width; `spread_logsnr_density`
    draws them as a smooth curve); for smooth densities it is the cell average, so use a grid fine enough for the
    curvature (error O(width^2)).
    """
    grid = torch.as_tensor(logsnr_grid, dtype=torch.float64)
    if grid.ndim != 1 or len(grid) < 2 or not (grid.diff() > 0).all():
        raise ValueError(f"logsnr_grid must be a strictly increasing 1-D tensor with >= 2 points, got {grid}")
    # a Hydra `_partial_: true` draw is a functools.partial: look through it for the function and its params
    fn, kwargs = getattr(draw, "func", draw), dict(getattr(draw, "keywords", {}))
    analytic = getattr(fn, "logsnr_density", None)
    if analytic is not None:
        return analytic(grid, process, **kwargs)
    edges = _cell_edges(grid)
    lo, hi = torch.zeros_like(edges), torch.ones_like(edges)
    for _ in range(iters):
        # u* = inf {u : logsnr(t(u)) <= edge}; the bisection never evaluates u = 1
        u = (lo + hi) / 2
        below = process.logsnr(torch.as_tensor(draw(u, process)).to(torch.float64)) <= edges
        lo, hi = torch.where(below, lo, u), torch.where(below, u, hi)
    cdf = 1 - hi
    return cdf.diff() / edges.diff()
