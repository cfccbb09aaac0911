"""EDM's generalised deterministic sampler, Alg. 1 with the design axes of Karras et al. 2022, Table 1 and Fig. 2a.

x = s(t) x~ integrates dx/dt = (sigma'/sigma + s'/s) x - (sigma' s / sigma) D(x / s; sigma) (eq. 4) in its own time t
with a noise schedule sigma(t) and a scaling s(t), not in the scaled space. The axes:

* `solver`: "euler" or "heun" (Heun's 2nd order with EDM's alpha: the stage at t + alpha h, weights 1 - 1/2alpha and
  1/2alpha; the step to sigma = 0 is Euler);
* discretisation: the grid (`vp_times`, `geometric_times` for VE, `iddpm_times`, `karras_times` for EDM);
* `schedule` sigma(t): "vp" sqrt(e^{beta_d t^2 / 2 + beta_min t} - 1) with the betas fitted to the grid's range at
  t = epsilon_s and t = 1 as EDM's code, "ve" sqrt(t), "linear" t;
* `scaling` s(t): "vp" 1 / sqrt(1 + sigma(t)^2), or "none" (1).

The axes are chosen by name, as in the paper's table: each name's formulas are in the tables below. Churn (Alg. 2)
raises sigma to (1 + gamma) sigma before each step, as `heun`.
"""

import math

import torch
from torch import Tensor

from ..processes import Process
from .common import DenoiserFn, check_times, randn
from .grids import Schedule, sigmas_of_times, vp_schedule
from .solvers import check_churn, scaled_denoiser


SCHEDULES = {
    "vp": vp_schedule,
    "ve": lambda sigma_min, sigma_max, epsilon_s: Schedule(math.sqrt, lambda t: 0.5 / math.sqrt(t), lambda s: s**2),
    "linear": lambda sigma_min, sigma_max, epsilon_s: Schedule(lambda t: t, lambda t: 1.0, lambda s: s),
}


def scaling_of(name: str, schedule: Schedule):
    """(s(t), ds/dt): "vp" s = 1 / sqrt(1 + sigma^2), s' = -sigma sigma' s^3; "none" s = 1."""
    if name == "none":
        return (lambda t: 1.0), (lambda t: 0.0)

    def s(t):
        return 1 / math.sqrt(1 + schedule.sigma(t) ** 2)

    return s, (lambda t: -schedule.sigma(t) * schedule.dsigma(t) * s(t) ** 3)


def edm_ablation(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor, solver: str = "heun",
                 schedule: str = "vp", scaling: str = "vp", alpha: float = 1.0, S_churn: float = 0.0,
                 S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0, epsilon_s: float = 1e-3,
                 generator: torch.Generator | None = None) -> Tensor:
    """Karras et al. 2022, Alg. 1 (and 2 with churn) in (x, t) for any schedule and scaling, on the grid's sigma~ levels."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"edm_ablation's solver must be 'euler' or 'heun', got {solver!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"edm_ablation's schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    if scaling not in ("vp", "none"):
        raise ValueError(f"edm_ablation's scaling must be 'vp' or 'none', got {scaling!r}")
    if not 0 < alpha <= 1:
        raise ValueError(f"edm_ablation needs 0 < alpha <= 1, got alpha={alpha}")
    check_churn("edm_ablation", S_churn, S_noise)
    times = torch.tensor(check_times(process, times), dtype=torch.float64)
    levels = sigmas_of_times(process, times).tolist()
    positive = [v for v in levels if v > 0]
    sched = SCHEDULES[schedule](positive[-1], positive[0], epsilon_s)
    s, ds = scaling_of(scaling, sched)
    d_tilde = scaled_denoiser(denoiser, process, dict(zip(levels, times.tolist())))

    t_steps = [sched.inverse(v) if v > 0 else 0.0 for v in levels]
    on_grid = dict(zip(t_steps, levels))  # the grid's own levels, not sigma(t(level)) rounded

    def slope(x_t: Tensor, t: float) -> Tensor:
        # dx/dt of eq. 4 at (x_t, t), with D evaluated on the scaled x / s at sigma(t)
        sig, dsig = on_grid.get(t, sched.sigma(t)), sched.dsigma(t)
        d = d_tilde(x_t / s(t), torch.full((x_t.shape[0],), sig, dtype=torch.float64, device=x_t.device))
        return (dsig / sig + ds(t) / s(t)) * x_t - (dsig * s(t) / sig) * d

    alpha_0, alpha_n = process.alpha(times[[0, -1]]).tolist()
    x = s(t_steps[0]) * x / alpha_0  # into EDM's x = s(t) x~
    n = len(t_steps) - 1
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        # churn: raise sigma to (1 + gamma) sigma(t_cur) with fresh noise, scaled by s
        sig = sched.sigma(t_cur)
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= sig <= S_tmax else 0.0
        t_hat = sched.inverse(sig * (1 + gamma)) if gamma > 0 else t_cur
        if gamma > 0:
            noise = math.sqrt(max(sched.sigma(t_hat) ** 2 - sig**2, 0.0)) * s(t_hat) * S_noise * randn(x, generator)
            x = (s(t_hat) / s(t_cur)) * x + noise
        # Euler step, then Heun's correction from the stage at t_hat + alpha h unless the step ends at sigma = 0
        h = t_next - t_hat
        d_cur = slope(x, t_hat)
        if solver == "euler" or t_next == 0:
            x = x + h * d_cur
            continue
        t_prime = t_hat + alpha * h
        d_prime = slope(x + alpha * h * d_cur, t_prime)
        x = x + h * ((1 - 1 / (2 * alpha)) * d_cur + (1 / (2 * alpha)) * d_prime)
    return alpha_n * x / s(t_steps[-1])
