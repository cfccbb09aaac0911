"""Singlestep PF-ODE solvers in EDM's scaled space: each step of order k is computed from its own start only.

`dpm_solver_singlestep` is DPM-Solver-2 / -3 (Lu et al. 2022a; DPM-Solver++ singlestep, Lu et al. 2022b) as diffusers'
DPMSolverSinglestepScheduler runs it: the grid's own levels are the stages, so a block of k levels is one k-th order
step and NFE = len(sigmas) - 1. `dpm_2` is k-diffusion's DPM-2: a midpoint stage at the geometric mean of each step's
ends (2 calls per step, 1 on the step to 0).
"""

import math

from torch import Tensor

from .common import DenoiserFn, levels
from .grids import check_grid
from .multistep import check_order, history_grid
from .solvers import check_churn, churn


def singlestep_orders(n: int, order: int, lower_order_final: bool, to_zero: bool) -> list[int]:
    """Orders of n grid steps in blocks 1, 2, .., order (diffusers' get_order_list); the step to sigma~ = 0 is 1st order."""
    blocks, rest = divmod(n, order)
    if lower_order_final and order > 1:
        # end on a short block rather than start a full one that the last steps cannot complete
        tail = list(range(1, rest + 1)) if rest else list(range(1, order)) + [1]
        orders = list(range(1, order + 1)) * (blocks - (0 if rest else 1)) + tail
    else:
        orders = list(range(1, order + 1)) * blocks + list(range(1, rest + 1))
    if to_zero:
        orders[-1] = 1
    return orders


def _block_update(x0: Tensor, values: list[Tensor], lam: list[float], s0: float, s_t: float, lam_t: float,
                  solver_type: str, noise_prediction: bool) -> Tensor:
    """One k-th order step from the block start x0 (at lam[0], sigma~ s0) to lam_t, values (D or eps) at lam[:k].

    Data prediction: x~_t = (s_t / s0) x0 + (1 - e^{-h}) V0 + c2 V1 + c3 V2; noise prediction: x~_t = x0 - (s0 - s_t)
    E0 - c2' E1 - c3' E2, with V1, V2 the first and second divided differences scaled by h (Lu et al. 2022a, Alg. 4-5;
    2022b, Alg. 1), "midpoint" keeping only the last stage's difference and "heun" both (diffusers' solver_type).
    """
    h = lam_t - lam[0]
    k = len(values)
    if noise_prediction:  # phi-coefficients for eps, times sigma~_t: c1 = s0 - s_t, c2 = s_t ((e^h - 1) / h - 1), ...
        c1, c2, c3, sign, out = s0 - s_t, s_t * (math.expm1(h) / h - 1), s_t * ((math.expm1(h) - h) / h**2 - 0.5), -1, x0
    else:  # for D: c1 = 1 - e^{-h}, c2 = (e^{-h} - 1) / h + 1, c3 = (e^{-h} - 1 + h) / h^2 - 1/2 (subtracted)
        c1, c2, c3, sign, out = -math.expm1(-h), math.expm1(-h) / h + 1, -((math.expm1(-h) + h) / h**2 - 0.5), 1, (s_t / s0) * x0
    out = out + sign * c1 * values[0]
    if k == 2:
        r = (lam[1] - lam[0]) / h
        d1 = (values[1] - values[0]) / r
        out = out + sign * (0.5 * c1 if solver_type == "midpoint" else c2) * d1
    elif k == 3:
        r1, r2 = (lam[1] - lam[0]) / h, (lam[2] - lam[0]) / h
        d1_1, d1_2 = (values[1] - values[0]) / r1, (values[2] - values[0]) / r2
        if solver_type == "midpoint":
            out = out + sign * c2 * d1_2
        else:
            d1 = (r2 * d1_1 - r1 * d1_2) / (r2 - r1)
            d2 = 2 * (d1_2 - d1_1) / (r2 - r1)
            out = out + sign * (c2 * d1 + c3 * d2)
    return out


def dpm_solver_singlestep(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, order: int = 2,
                          solver_type: str = "midpoint", noise_prediction: bool = False,
                          lower_order_final: bool = False, generator=None) -> Tensor:
    """DPM-Solver-k singlestep, k = 1..3, on the grid's levels as stages (Lu et al. 2022a, Alg. 1, 4, 5).

    `noise_prediction=False` is DPM-Solver++ (data prediction, Lu et al. 2022b: diffusers' default "dpmsolver++"),
    True the original eps form ("dpmsolver"); with noise prediction the step to sigma~ = 0 is the first-order one, D.
    """
    check_order("dpm_solver_singlestep", order, (1, 2, 3))
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sigmas, lam = history_grid("dpm_solver_singlestep", order, sigmas)
    orders = singlestep_orders(len(sigmas) - 1, order, lower_order_final, sigmas[-1] == 0)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if orders[i] == 1:  # a new block starts here
            start, values = i, []
            x0 = x
        d = denoiser_tilde(x, levels(x, s))
        values.append((x - d) / s if noise_prediction else d)
        if s_next == 0:
            x = d
            continue
        x = _block_update(x0, values, lam[start:i + 1], sigmas[start], s_next, lam[i + 1], solver_type, noise_prediction)
    return x


def dpm_2(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, S_churn: float = 0.0, S_tmin: float = 0.0,
          S_tmax: float = math.inf, S_noise: float = 1.0, generator=None) -> Tensor:
    """k-diffusion's DPM-2: Euler to the midpoint sigma~_mid = sqrt(s_hat s_next), then the full step with the slope
    there (a DPM-Solver-2 step in sigma~, Lu et al. 2022a, with EDM's churn, Karras et al. 2022, Alg. 2)."""
    sigmas = check_grid(sigmas, "sigmas").tolist()
    check_churn("dpm_2", S_churn, S_noise)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x, s_hat = churn(x, s, len(sigmas) - 1, S_churn, S_tmin, S_tmax, S_noise, generator)
        d = (x - denoiser_tilde(x, levels(x, s_hat))) / s_hat
        if s_next == 0:
            x = x + (s_next - s_hat) * d  # Euler on the step to 0
            continue
        s_mid = math.sqrt(s_hat * s_next)
        x_mid = x + (s_mid - s_hat) * d
        d_mid = (x_mid - denoiser_tilde(x_mid, levels(x, s_mid))) / s_mid
        x = x + (s_next - s_hat) * d_mid
    return x
