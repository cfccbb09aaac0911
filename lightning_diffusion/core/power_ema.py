"""Post-hoc EMA (Karras et al. 2024, "EDM2", Sec. 3 and App. C): power-function EMAs, snapshots, reconstruction.

During training a few power-function EMAs (exponents gamma_i, i.e. lengths sigma_rel_i) are tracked and stored as
snapshots every N steps. Each snapshot is the average of the trajectory under a known profile
p_i(tau) = (gamma_i + 1) tau^gamma_i / t_i^(gamma_i + 1) on (0, t_i]. After training, an EMA of any length is the
least-squares combination of the snapshots whose profiles best match the target profile in L2(0, inf), with the
inner products of power functions in closed form (App. C).

Discrete time: with beta_t = (1 - 1/t)^(gamma + 1) the EMA after steps 1..t weights step s by
(s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1) = the integral of p over (s-1, s]. So the discrete EMA *is* the
continuous power-function EMA of the piecewise-constant trajectory theta(ceil(tau)), and the continuous inner
products below are exact for it (no discretisation error beyond the profile fit itself).

`lightning.checkpoints.export_posthoc_ema` (and `python -m lightning_diffusion.posthoc_ema run_dir=... sigma_rel=0.08`)
writes the reconstruction as a checkpoint that `lightning.checkpoints.load_model` reads.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["GAMMA_MIN", "SIGMA_REL_MAX", "SNAPSHOT_GLOB", "Snapshot", "combine", "gamma_to_sigma_rel",
           "load_snapshots", "power_ema_beta", "power_ema_update", "power_ema_weights", "profile_fit_error",
           "profile_inner_products", "reconstruct", "sigma_rel_to_gamma", "snapshot_name", "solve_coefficients"]

# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum at gamma* = (sqrt(5) - 3) / 2, then falls to 0 as
# gamma -> inf; the useful branch (longer EMA <-> larger sigma_rel) is gamma > gamma*, where the inverse is unique
GAMMA_MIN = (math.sqrt(5.0) - 3.0) / 2.0


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile (EDM2 Sec. 3): sqrt(g+1) / ((g+2) sqrt(g+3))."""
    if not gamma > -1.0:
        raise ValueError(f"gamma must be > -1 for a normalisable power-function profile, got {gamma}")
    return math.sqrt(gamma + 1.0) / ((gamma + 2.0) * math.sqrt(gamma + 3.0))


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_MIN)  # ~0.3003; the uniform average (gamma = 0) has 1/sqrt(12) ~ 0.2887


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent gamma of the profile with relative std sigma_rel (EDM2 App. C.1): the largest root of the cubic
    sigma_rel^2 (g+2)^2 (g+3) - (g+1) = 0, i.e. s^2 g^3 + 7 s^2 g^2 + (16 s^2 - 1) g + 12 s^2 - 1 = 0."""
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel={sigma_rel} is outside the valid range (0, {SIGMA_REL_MAX:.4f}) of "
                         "power-function EMAs")
    s2 = sigma_rel ** 2
    roots = np.roots([s2, 7.0 * s2, 16.0 * s2 - 1.0, 12.0 * s2 - 1.0])
    # the roots: one < -3, one in (-1, gamma*), ours > gamma*; near SIGMA_REL_MAX the last two merge (and may come
    # back as a complex pair whose real part is the root), so the largest real part is ours
    gamma = float(roots.real.max())
    # one Newton step on f(g) = s^2 (g+2)^2 (g+3) - (g+1) polishes the root to full float64 precision
    f = s2 * (gamma + 2.0) ** 2 * (gamma + 3.0) - (gamma + 1.0)
    df = s2 * (gamma + 2.0) * (3.0 * gamma + 8.0) - 1.0
    polished = gamma - f / df if df != 0 else gamma
    return polished if polished > GAMMA_MIN else gamma


def power_ema_beta(t: int, gamma: float, t_prev: int | None = None) -> float:
    """Decay of the power-function EMA at step t >= 1 (EDM2 Sec. 3): beta_t = (1 - 1/t)^(gamma + 1); beta_1 = 0.

    For a jump from step t_prev to t (steps in between hold the current weights) it is (t_prev / t)^(gamma + 1),
    the product of the single-step betas, so an update after skipped steps keeps the exact profile.
    """
    t_prev = t - 1 if t_prev is None else t_prev
    if not 0 <= t_prev < t:
        raise ValueError(f"the power-function EMA counts steps from t=1 and moves forward, got t={t} after {t_prev}")
    return (t_prev / t) ** (gamma + 1.0)


def power_ema_weights(t: int, gamma: float) -> Tensor:
    """Closed form of the EMA after t steps: weight of step s is (s^(g+1) - (s-1)^(g+1)) / t^(g+1), s = 1..t.

    The product of the betas telescopes: prod_{k=s+1..t} (1 - 1/k)^(g+1) = (s/t)^(g+1).
    """
    s = torch.arange(0, t + 1, dtype=torch.float64) / t  # normalised so that large t and gamma do not overflow
    cdf = s ** (gamma + 1.0)  # integral of the profile over (0, s]
    return cdf[1:] - cdf[:-1]


def power_ema_update(average: Tensor, current: Tensor, t: int, gamma: float, t_prev: int | None = None) -> Tensor:
    """One in-place step of the power-function EMA: average <- beta_t average + (1 - beta_t) current."""
    return average.lerp_(current.to(average.dtype), 1.0 - power_ema_beta(t, gamma, t_prev))


def profile_inner_products(gammas_a: Tensor, ts_a: Tensor, gammas_b: Tensor, ts_b: Tensor) -> Tensor:
    """<p_a, p_b> in L2(0, inf) of power-function profiles (EDM2 App. C.2), in closed form:

    int_0^min(t_a, t_b) (g_a+1)(g_b+1) tau^(g_a+g_b) / (t_a^(g_a+1) t_b^(g_b+1)) dtau
      = (g_a+1)(g_b+1) / (g_a+g_b+1) * (m/t_a)^(g_a+1) (m/t_b)^(g_b+1) / m,   m = min(t_a, t_b),
    written with ratios m/t <= 1 so that large exponents and step counts do not overflow. Returns (A, B).
    """
    ga, ta = gammas_a.double()[:, None], ts_a.double()[:, None]
    gb, tb = gammas_b.double()[None, :], ts_b.double()[None, :]
    if (ga + gb <= -1.0).any():
        raise ValueError("profile inner products need gamma_a + gamma_b > -1 (use sigma_rel on the gamma > "
                         f"{GAMMA_MIN:.3f} branch)")
    m = torch.minimum(ta, tb)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (m / ta) ** (ga + 1) * (m / tb) ** (gb + 1) / m


def solve_coefficients(gammas: Sequence[float], ts: Sequence[float], target_gamma: float, target_t: float,
                       rcond: float | None = None) -> Tensor:
    """Least-squares weights x of the snapshots so that sum_i x_i p_i best matches the target profile p_r
    (EDM2 App. C.2): the normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_r>, solved by lstsq."""
    gammas, ts = torch.as_tensor(gammas, dtype=torch.float64), torch.as_tensor(ts, dtype=torch.float64)
    # times in units of the target time: A and b both scale by 1/target_t, so x is unchanged and A is O(1)
    ts = ts / target_t
    A = profile_inner_products(gammas, ts, gammas, ts)
    b = profile_inner_products(gammas, ts, torch.tensor([target_gamma], dtype=torch.float64),
                               torch.ones(1, dtype=torch.float64))
    # A is a Gram matrix, symmetric positive semi-definite, ill-conditioned when snapshots are close: SVD-based lstsq
    return torch.linalg.lstsq(A, b, rcond=rcond, driver="gelsd").solution[:, 0]


def profile_fit_error(gammas: Sequence[float], ts: Sequence[float], coefficients: Tensor, target_gamma: float,
                      target_t: float) -> float:
    """Relative L2 error ||p_r - sum_i x_i p_i|| / ||p_r|| of a fitted combination (a diagnostic of the fit)."""
    gammas = torch.as_tensor(gammas, dtype=torch.float64)
    ts = torch.as_tensor(ts, dtype=torch.float64) / target_t
    x = coefficients.double()
    g_r, t_r = torch.tensor([target_gamma], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    rr = profile_inner_products(g_r, t_r, g_r, t_r)[0, 0]
    residual2 = x @ profile_inner_products(gammas, ts, gammas, ts) @ x - 2 * x @ profile_inner_products(
        gammas, ts, g_r, t_r)[:, 0] + rr
    return float(residual2.clamp_min(0).sqrt() / rr.sqrt())


@dataclass
class Snapshot:
    """A stored power-function EMA: its exponent gamma, the step t it was taken at, and its weights."""

    gamma: float
    t: int
    state_dict: Mapping[str, Tensor]

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)


def combine(snapshots: Sequence[Snapshot], coefficients: Tensor) -> dict[str, Tensor]:
    """sum_i x_i theta_i over the floating-point entries (accumulated in float64, returned in each entry's dtype);
    other entries (integer counters) are taken from the latest snapshot."""
    latest = max(snapshots, key=lambda s: s.t).state_dict
    out = {}
    for i, (snapshot, x) in enumerate(zip(snapshots, coefficients.tolist())):
        if snapshot.state_dict.keys() != latest.keys():
            raise ValueError(f"snapshot {i} (t={snapshot.t}, gamma={snapshot.gamma:.4g}) holds other entries than "
                             "the latest one: snapshots from different models cannot be combined")
        for name, value in snapshot.state_dict.items():
            if value.is_floating_point():
                acc = out.get(name)
                out[name] = value.double() * x if acc is None else acc.add_(value.double(), alpha=x)
    return {name: out[name].to(value.dtype) if value.is_floating_point() else value.clone()
            for name, value in latest.items()}


def reconstruct(snapshots: Sequence[Snapshot], target_sigma_rel: float, t: int | None = None,
                return_info: bool = False):
    """State dict of the power-function EMA with length target_sigma_rel at step t (default: the latest snapshot's),
    synthesised as the least-squares combination of stored snapshots (EDM2 Sec. 3, App. C.2).

    Only snapshots taken at or before t can contribute. With return_info, also returns a dict with the gamma, t,
    coefficients and the relative L2 error of the profile fit.
    """
    target_gamma = sigma_rel_to_gamma(target_sigma_rel)
    snapshots = list(snapshots)
    if not snapshots:
        raise ValueError(f"no snapshots to reconstruct the EMA with sigma_rel={target_sigma_rel} from")
    t = max(s.t for s in snapshots) if t is None else int(t)
    used = [s for s in snapshots if s.t <= t]
    if not used:
        raise ValueError(f"no snapshot at or before step t={t} (the earliest is at t={min(s.t for s in snapshots)})")
    # 1. the weights from the profiles alone (cheap; the parameters are not touched)
    gammas, ts = [s.gamma for s in used], [s.t for s in used]
    x = solve_coefficients(gammas, ts, target_gamma, t)
    # 2. the same combination of the stored parameters
    state = combine(used, x)
    if not return_info:
        return state
    info = {"sigma_rel": target_sigma_rel, "gamma": target_gamma, "t": t, "coefficients": x,
            "snapshots": [(s.gamma, s.t) for s in used], "fit_error": profile_fit_error(gammas, ts, x, target_gamma, t)}
    return state, info


# ---- snapshot files -------------------------------------------------------------------------------------------------
SNAPSHOT_GLOB = "step=*-sigma_rel=*.pt"


def snapshot_name(t: int, sigma_rel: float) -> str:
    """File name of a snapshot: step and sigma_rel, sortable by step."""
    return f"step={t:09d}-sigma_rel={sigma_rel:.4f}.pt"


def load_snapshots(directory) -> list[Snapshot]:
    """Every snapshot file in `directory`, memory-mapped (only the entries being summed are read), sorted by step."""
    directory = Path(directory)
    paths = sorted(directory.glob(SNAPSHOT_GLOB)) if directory.is_dir() else []
    if not paths:
        raise ValueError(f"no post-hoc EMA snapshots ({SNAPSHOT_GLOB}) in {directory}: train with "
                         "callbacks=posthoc_ema, or point at the folder its `dir` wrote to")
    snapshots = []
    for path in paths:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        snapshots.append(Snapshot(gamma=float(data["gamma"]), t=int(data["t"]), state_dict=data["state_dict"]))
    return sorted(snapshots, key=lambda s: (s.t, s.gamma))
