"""Samplers: noise-level grids, PF-ODE solvers in EDM's scaled space, and process-tied stochastic samplers.

Three catalogs, kept apart as in Karras et al. 2022 (Table 1) and k-diffusion:

* discretisations  `disc(process, n) -> times`: a strictly decreasing (n + 1,) float64 grid of process times
  (`uniform_times`, `strided_times`, `karras_times`). In the scaled noise level sigma~ = sigma / alpha,
  `karras_sigmas` builds a grid and `sigmas_of_times` / `times_of_sigmas` convert.
* PF-ODE solvers   `solver(denoiser_tilde, x~, sigmas, generator=None, **opts) -> x~` on
  dx~/dsigma~ = (x~ - D) / sigma~ (Karras et al. 2022, eq. 4), written once in the scaled space x~ = x / alpha
  (`euler`, `heun`, `dpm_solver_pp_2m`, `rk45`); `scaled_denoiser` makes `denoiser_tilde(x~, sigma~)` from a
  process-time denoiser. Only `heun` with churn uses the generator.
* samplers         `sampler(denoiser, process, x, times, generator=None, **opts) -> x`, with x a sample at
  times[0] and `denoiser(x, t) ~ E[x_0 | x_t]` in process time (`ancestral`, `ddim`, `euler_maruyama`,
  `predictor_corrector`, `annealed_langevin`, and `pf_ode`, which runs any solver on a process's grid).

The sampler signature is the one top-level signature: Hydra picks any sampler with `_target_` and
`_partial_: true` (a PF-ODE solver goes in as `pf_ode`'s `solver`, itself a partial), and
`generate(sampler, denoiser, process, shape, steps, discretisation)` draws the prior at the grid's first time,
runs the sampler and returns (samples, NFE). NFE is counted from outside, uniformly: wrap the denoiser in
`CountingDenoiser` (generate does) and read `.nfe`, the number of denoiser calls (a guided denoiser from
`classifier_free_guidance` is one call: one batched network evaluation).

Clean end: a grid ends where the sampler should stop. sigma~ = 0 is time 0 for processes with sigma(0) = 0
(VP, sub-VP, DDPM, EDM, flow); a VESDE never reaches it, so its grids end at sigma_min (as Song et al.'s VE
samplers; `karras_times` does so) and `times_of_sigmas` refuses a 0 there. `ancestral` and `ddim` add no noise on a step to sigma = 0;
`euler_maruyama` and `predictor_corrector` return the mean of their last step (Song et al.'s `denoise`).
"""

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from .processes import Process, expand_to

DenoiserFn = Callable[[Tensor, Tensor], Tensor]  # denoiser(x, t) -> D, or denoiser_tilde(x~, sigma~) -> D


# ----------------------------------------------------------------------------------------------------------
# Discretisations
# ----------------------------------------------------------------------------------------------------------


def _check_grid(grid, name: str) -> Tensor:
    """A 1-D, finite, non-negative, strictly decreasing float64 grid of at least two points, or ValueError."""
    grid = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"{name} must be a 1-D grid of at least 2 points, got shape {tuple(grid.shape)}")
    if not torch.isfinite(grid).all() or (grid < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {grid.tolist()}")
    if not (grid[1:] < grid[:-1]).all():
        raise ValueError(f"{name} must be strictly decreasing, got {grid.tolist()}")
    return grid


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < n, then 0 (Karras et al. 2022, eq. 5)."""
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1 steps, got {n}")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"karras_sigmas needs 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def uniform_times(process: Process, n: int, t_min: float | None = None, t_max: float | None = None) -> Tensor:
    """n + 1 evenly spaced times from t_max down to t_min (Song et al. 2021; NCSN's geometric ladder on a VESDE)."""
    t_min = process.t_min if t_min is None else t_min
    t_max = process.t_max if t_max is None else t_max
    if n < 1:
        raise ValueError(f"uniform_times needs n >= 1 steps, got {n}")
    if not 0 <= t_min < t_max:
        raise ValueError(f"uniform_times needs 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
    return torch.linspace(t_max, t_min, n + 1, dtype=torch.float64)


def strided_times(T, n: int) -> Tensor:
    """n + 1 integer times round(T - i T / n) from T down to 0 (Nichol & Dhariwal 2021 respacing; DDIM's skip).

    T is the number of DDPM steps or a process with an integer `.T` (a DiscreteDDPM), so that
    `strided_times` is also a `(process, n)` discretisation.
    """
    T = getattr(T, "T", T)
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"strided_times needs an integer T >= 1 (or a DiscreteDDPM), got {T!r}")
    if not 1 <= n <= T:
        raise ValueError(f"strided_times needs 1 <= n <= T={T} steps, got n={n}")
    return torch.floor(torch.linspace(T, 0, n + 1, dtype=torch.float64) + 0.5)


def sigmas_of_times(process: Process, times: Tensor) -> Tensor:
    """Scaled noise levels sigma~(t) = sigma(t) / alpha(t) of a time grid (Karras et al. 2022, eq. 4)."""
    times = torch.as_tensor(times, dtype=torch.float64)
    return process.sigma_tilde(times)


def _t_of_sigma(process: Process, sigmas: Tensor) -> Tensor:
    """t(sigma~) by the process's bisection, or ValueError if a level lies outside [sigma~(t_min), sigma~(t_max)]."""
    times = process.t_of_sigma_tilde(sigmas)
    if ((sigmas_of_times(process, times) - sigmas).abs() > 1e-6 * sigmas).any():
        ends = sigmas_of_times(process, torch.tensor([process.t_min, process.t_max], dtype=torch.float64)).tolist()
        raise ValueError(f"sigma~ {sigmas.tolist()} lies outside {process!r}'s range [{ends[0]:.4g}, {ends[1]:.4g}]")
    return times


def times_of_sigmas(process: Process, sigmas: Tensor) -> Tensor:
    """Process times of scaled noise levels; sigma~ = 0 maps to t = 0 where the process is clean there (sigma(0) = 0)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    zero = sigmas == 0
    if zero.any() and float(process.sigma(torch.zeros((), dtype=torch.float64))) != 0:
        raise ValueError(f"{process!r} never reaches sigma~ = 0 (sigma(0) > 0): end the grid at a positive sigma~")
    times = torch.zeros_like(sigmas)
    times[~zero] = _t_of_sigma(process, sigmas[~zero]).to(times.dtype)
    return times


def karras_times(process: Process, n: int, sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float = 7.0) -> Tensor:
    """`karras_sigmas` between the process's own sigma~(t_min) and sigma~(t_max) (or those given), as process times.

    On a process that never reaches sigma = 0 (VESDE) the n steps end at sigma_min instead of 0.
    """
    lowest, highest = process.sigma_tilde_range()
    sigma_min = lowest if sigma_min is None else sigma_min
    sigma_max = highest if sigma_max is None else sigma_max
    if float(process.sigma(torch.zeros((), dtype=torch.float64))) != 0:
        return times_of_sigmas(process, karras_sigmas(n + 1, sigma_min, sigma_max, rho)[:-1])
    return times_of_sigmas(process, karras_sigmas(n, sigma_min, sigma_max, rho))


def geometric_times(process: Process, n: int, sigma_min: float | None = None,
                    sigma_max: float | None = None) -> Tensor:
    """n + 1 times whose sigma~ fall geometrically from sigma_max to sigma_min, each kept inside the process's range.

    NCSN's ladder sigma_i = sigma_1 (sigma_L / sigma_1)^((i-1)/(L-1)) (Song & Ermon 2019) on any process: evenly
    spaced in logsnr. On a VESDE with its own range it equals `uniform_times`.
    """
    lowest, highest = (float(s) for s in process.sigma_tilde_range())
    sigma_min = lowest if sigma_min is None else max(sigma_min, lowest)
    sigma_max = highest if sigma_max is None else min(sigma_max, highest)
    if n < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"geometric_times needs n >= 1 and 0 < sigma_min < sigma_max, got n={n}, "
                         f"sigma_min={sigma_min}, sigma_max={sigma_max}")
    sigmas = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n + 1, dtype=torch.float64)
    return times_of_sigmas(process, sigmas)


# ----------------------------------------------------------------------------------------------------------
# NFE counting and guidance
# ----------------------------------------------------------------------------------------------------------


class CountingDenoiser:
    """Wraps any denoiser and counts its calls in `.nfe`, the number of function evaluations."""

    def __init__(self, denoiser: Callable):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, *args, **kwargs):
        self.nfe += 1
        return self.denoiser(*args, **kwargs)


def classifier_free_guidance(denoiser: Callable, labels: Tensor, scale: float, null_label: int) -> DenoiserFn:
    """D = D_u + w (D_c - D_u), both halves in one batched call of denoiser(x, t, labels) (Ho & Salimans 2022, eq. 6).

    w = 1 + Ho & Salimans' w; D is affine in eps at fixed x, so guiding D equals guiding eps. w = 0 is the
    unconditional denoiser, w = 1 the conditional one.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},) to match x, got {tuple(labels.shape)}")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        y = labels.to(x.device)
        # conditional and unconditional halves in one network evaluation
        both = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
        d_c, d_u = both.chunk(2)
        return d_u + scale * (d_c - d_u)

    return guided


# ----------------------------------------------------------------------------------------------------------
# PF-ODE solvers in the scaled space x~ = x / alpha, sigma~ = sigma / alpha
# ----------------------------------------------------------------------------------------------------------


def _levels(x: Tensor, value: float) -> Tensor:
    """A (B,) float64 tensor of one noise level or time, on x's device."""
    return torch.full((x.shape[0],), value, dtype=torch.float64, device=x.device)


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def scaled_denoiser(denoiser: DenoiserFn, process: Process, known: dict[float, float] | None = None) -> DenoiserFn:
    """EDM's D(x~; sigma~) from a process-time denoiser: D = denoiser(alpha(t) x~, t) at t = t(sigma~) (Karras et al. 2022).

    `known` maps sigma~ values to their times (a solver's grid), so only levels off the grid need the bisection.
    """
    known = known or {}

    def denoiser_tilde(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        # invert logsnr once per distinct level (usually one per call), by table when the level is on the grid
        levels, inverse = torch.unique(sigma, return_inverse=True)
        if levels.numel() == 1 and float(levels) in known:
            t = torch.full_like(sigma, known[float(levels)])
        else:
            t = _t_of_sigma(process, levels)[inverse]
        return denoiser(expand_to(process.alpha(t), x) * x, t)

    return denoiser_tilde


def euler(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, generator=None) -> Tensor:
    """Euler's method on dx~/dsigma~ = (x~ - D) / sigma~ (Karras et al. 2022, eq. 4; DDIM with eta = 0 in disguise)."""
    sigmas = _check_grid(sigmas, "sigmas").tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser_tilde(x, _levels(x, s))) / s  # dx~/dsigma~ at s
        x = x + (s_next - s) * d
    return x


def heun(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, S_churn: float = 0.0, S_tmin: float = 0.0,
         S_tmax: float = math.inf, S_noise: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Heun's 2nd-order method with optional churn (Karras et al. 2022, Alg. 2; S_churn = 0 is Alg. 1)."""
    sigmas = _check_grid(sigmas, "sigmas").tolist()
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"heun needs S_churn >= 0 and S_noise >= 0, got S_churn={S_churn}, S_noise={S_noise}")
    n = len(sigmas) - 1
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        # churn: raise the noise level to s_hat = s (1 + gamma) by adding fresh noise
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= s <= S_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s**2) * S_noise * _randn(x, generator)
        # Euler step from s_hat to s_next
        d = (x - denoiser_tilde(x, _levels(x, s_hat))) / s_hat
        x_next = x + (s_next - s_hat) * d
        # trapezoidal correction, skipped on the step to sigma = 0
        if s_next > 0:
            d_next = (x_next - denoiser_tilde(x_next, _levels(x, s_next))) / s_next
            x_next = x + (s_next - s_hat) * (d + d_next) / 2
        x = x_next
    return x


def dpm_solver_pp_2m(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, generator=None) -> Tensor:
    """DPM-Solver++(2M): multistep data prediction in lambda = -log sigma~ (Lu et al. 2022, Alg. 2).

    First order (DPM-Solver++ 1 = DDIM) on the first step and on a final step to sigma~ = 0, as k-diffusion.
    """
    sigmas = _check_grid(sigmas, "sigmas").tolist()
    d_prev, h_prev = None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = denoiser_tilde(x, _levels(x, s))
        if s_next == 0:
            x = d  # the first-order update with h = inf lands on D
            continue
        h = math.log(s / s_next)  # lambda_next - lambda
        if d_prev is None:
            d_eff = d
        else:
            # linear extrapolation of the data prediction from the last two points (r = h_prev / h)
            r = h_prev / h
            d_eff = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        x = (s_next / s) * x - math.expm1(-h) * d_eff
        d_prev, h_prev = d, h
    return x


def rk45(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, rtol: float = 1e-5, atol: float = 1e-5,
         generator=None) -> Tensor:
    """Adaptive Dormand-Prince RK45 (scipy) on dx~/d log sigma~ = x~ - D (Song et al. 2021, sec. D.1).

    Integrates from sigmas[0] to the smallest positive sigma of the grid (the grid's inner points are
    ignored), then, if the grid ends at 0, one final denoising D(x~; sigma_min). The batch is one ODE system,
    so all samples share the step sizes; NFE = scipy's nfev (+ 1 for the final denoise).
    """
    sigmas = _check_grid(sigmas, "sigmas")
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rk45 needs rtol > 0 and atol > 0, got rtol={rtol}, atol={atol}")
    positive = sigmas[sigmas > 0].tolist()
    shape, dtype = x.shape, x.dtype

    def rhs(u: float, y: np.ndarray) -> np.ndarray:
        x_u = torch.from_numpy(y).reshape(shape).to(dtype=dtype, device=x.device)
        return (x_u - denoiser_tilde(x_u, _levels(x_u, math.exp(u)))).flatten().double().cpu().numpy()

    if len(positive) > 1 or positive[0] != positive[-1]:
        y0 = x.detach().flatten().double().cpu().numpy()
        sol = solve_ivp(rhs, (math.log(positive[0]), math.log(positive[-1])), y0, method="RK45", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"rk45 failed: {sol.message}")
        x = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(dtype=dtype, device=x.device)
    if sigmas[-1] == 0:
        x = denoiser_tilde(x, _levels(x, positive[-1]))  # last step to sigma~ = 0
    return x


# ----------------------------------------------------------------------------------------------------------
# Samplers on a process's time grid: sampler(denoiser, process, x, times, generator=None, **opts)
# ----------------------------------------------------------------------------------------------------------


def _check_times(process: Process, times) -> list[float]:
    times = _check_grid(times, "times")
    if times[0] > process.t_max:
        raise ValueError(f"times must lie in [0, t_max={process.t_max}] of {process!r}, got {times.tolist()}")
    return times.tolist()


def _at(process: Process, t: float) -> tuple[float, float]:
    """(alpha(t), sigma(t)) as float64 Python numbers."""
    t = torch.tensor(t, dtype=torch.float64)
    return float(process.alpha(t)), float(process.sigma(t))


def _transition(process: Process, t: float, s: float):
    """alpha_t, sigma_t, alpha_s, sigma_s and q(x_t | x_s): alpha_{t|s} = alpha_t / alpha_s, sigma_{t|s}^2 (VDM, eq. 33)."""
    a_t, s_t = _at(process, t)
    a_s, s_s = _at(process, s)
    a_ts = a_t / a_s
    var_ts = max(s_t**2 - a_ts**2 * s_s**2, 0.0)
    return a_t, s_t, a_s, s_s, a_ts, var_ts


def pf_ode(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor, solver: Callable = heun,
           generator: torch.Generator | None = None) -> Tensor:
    """Any scaled-space PF-ODE solver on a process time grid: x~ = x / alpha(t_0), solved over sigma~(times), times alpha(t_N)."""
    times = torch.tensor(_check_times(process, times), dtype=torch.float64)
    alpha_first, alpha_last = process.alpha(times[[0, -1]]).tolist()
    if alpha_first <= 0:
        raise ValueError(f"pf_ode needs alpha(times[0]) > 0 (sigma~ finite), got alpha({float(times[0])}) = {alpha_first} "
                         f"for {process!r}: start the grid earlier (e.g. t_max < 1 for RectifiedFlow) or use ddim")
    sigmas = sigmas_of_times(process, times)
    known = dict(zip(sigmas.tolist(), times.tolist()))  # the grid's own times: no bisection on the grid
    x = solver(scaled_denoiser(denoiser, process, known), x / alpha_first, sigmas, generator=generator)
    return alpha_last * x


def ancestral_step(denoiser: DenoiserFn, process: Process, x: Tensor, t: float, s: float,
                   variance: Callable | None = None) -> tuple[Tensor, Tensor]:
    """Mean and std of q(x_s | x_t, x_0 = D(x_t, t)) for any process (Kingma et al. 2021, app. A; Ho et al. 2020, eq. 7)."""
    a_t, s_t, a_s, s_s, a_ts, var_ts = _transition(process, t, s)
    d = denoiser(x, _levels(x, t))
    mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * d
    if variance is None:
        return mean, torch.full_like(x, math.sqrt(var_ts * s_s**2 / s_t**2))
    # learned or fixed per-sample variance overriding the posterior one (Nichol & Dhariwal 2021)
    return mean, expand_to(variance(x, _levels(x, t), _levels(x, s)).sqrt(), x).expand_as(x)


def ancestral(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor, generator: torch.Generator | None = None,
              variance: Callable | None = None) -> Tensor:
    """Ancestral sampling from the Gaussian posteriors q(x_s | x_t, x_0 = D) (Ho et al. 2020, Alg. 2 on the full grid).

    On a strided DDPM grid this is improved DDPM's respaced sampler; `variance(x, t, s)` overrides the
    posterior variance. No noise is added on the step to a time with sigma = 0.
    """
    times = _check_times(process, times)
    for t, s in zip(times[:-1], times[1:]):
        mean, std = ancestral_step(denoiser, process, x, t, s, variance)
        # z = 0 on the step to the clean end (Alg. 2, line 3)
        x = mean if _at(process, s)[1] == 0 else mean + std * _randn(x, generator)
    return x


def ddim_step(denoiser: DenoiserFn, process: Process, x: Tensor, t: float, s: float, eta: float = 0.0):
    """Mean and std of DDIM's x_s = alpha_s D + sqrt(sigma_s^2 - c^2) eps_hat + c z (Song et al. 2021, "DDIM", eq. 12)."""
    a_t, s_t, a_s, s_s, a_ts, var_ts = _transition(process, t, s)
    c = eta * math.sqrt(var_ts * s_s**2 / s_t**2)  # eta times the posterior std
    d = denoiser(x, _levels(x, t))
    eps = (x - a_t * d) / s_t
    return a_s * d + math.sqrt(max(s_s**2 - c**2, 0.0)) * eps, c


def ddim(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor, eta: float = 0.0,
         generator: torch.Generator | None = None) -> Tensor:
    """DDIM for any process (Song et al. 2021, "DDIM", eq. 12): eta = 0 is Euler on the PF-ODE, eta = 1 is ancestral."""
    if eta < 0:
        raise ValueError(f"ddim needs eta >= 0, got eta={eta}")
    times = _check_times(process, times)
    for t, s in zip(times[:-1], times[1:]):
        mean, c = ddim_step(denoiser, process, x, t, s, eta)
        x = mean + c * _randn(x, generator) if c > 0 else mean
    return x


def euler_maruyama_step(denoiser: DenoiserFn, process: Process, x: Tensor, t: float, s: float):
    """Mean and std of an Euler-Maruyama step of the reverse SDE dx = [f x - g^2 score] dt + g dw (Song et al. 2021, eq. 6)."""
    a_t, s_t = _at(process, t)
    f, g2 = (float(v) for v in process.sde(torch.tensor(t, dtype=torch.float64)))
    score = (a_t * denoiser(x, _levels(x, t)) - x) / s_t**2
    dt = t - s  # the reverse SDE runs backwards in time
    return x - (f * x - g2 * score) * dt, math.sqrt(g2 * dt)


def reverse_diffusion_step(denoiser: DenoiserFn, process: Process, x: Tensor, t: float, s: float):
    """Mean and std of the reverse-diffusion predictor (Song et al. 2021, eq. 45-46) for x_t = alpha_{t|s} x_s + sigma_{t|s} z.

    Forward discretisation f = (alpha_{t|s} - 1) x, G = sigma_{t|s}; reverse step x - f + G^2 score, std G.
    """
    a_t, s_t, a_s, s_s, a_ts, var_ts = _transition(process, t, s)
    score = (a_t * denoiser(x, _levels(x, t)) - x) / s_t**2
    return x - (a_ts - 1) * x + var_ts * score, math.sqrt(var_ts)


def euler_maruyama(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor,
                   generator: torch.Generator | None = None) -> Tensor:
    """Euler-Maruyama on the reverse-time SDE; the last step returns its mean, without noise (Song et al. 2021, eq. 6)."""
    times = _check_times(process, times)
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        mean, std = euler_maruyama_step(denoiser, process, x, t, s)
        x = mean if i == len(times) - 2 else mean + std * _randn(x, generator)
    return x


def predictor_corrector(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor,
                        predictor: Callable = reverse_diffusion_step, corrector_steps: int = 1, snr: float = 0.16,
                        generator: torch.Generator | None = None) -> Tensor:
    """Predictor-corrector sampling with a Langevin corrector (Song et al. 2021, Alg. 2 and 3).

    `predictor(denoiser, process, x, t, s) -> (mean, std)` is any step function (`reverse_diffusion_step`,
    `euler_maruyama_step`, `ancestral_step`, `ddim_step`). The corrector's step at t is
    2 alpha_{t|s}^2 (snr ||z|| / ||score||)^2 with the norms averaged over the batch, as Song's code: a
    per-sample ratio is heavy-tailed in low dimension (||score|| ~ 0 near a mode) and biases the samples
    (energy distance 0.028 vs 0.004 on the 2-D test mixture). The last predictor step returns its mean.
    """
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
    if snr <= 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    times = _check_times(process, times)
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        a_t, s_t, _, _, a_ts, _ = _transition(process, t, s)
        for _ in range(corrector_steps):
            # Langevin corrector at t with the step set by the signal-to-noise ratio
            score = (a_t * denoiser(x, _levels(x, t)) - x) / s_t**2
            z = _randn(x, generator)
            ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp(min=1e-30)
            step = float(2 * a_ts**2 * (snr * ratio) ** 2)
            x = x + step * score + math.sqrt(2 * step) * z
        # predictor from t to s
        mean, std = predictor(denoiser, process, x, t, s)
        x = mean if i == len(times) - 2 else mean + std * _randn(x, generator)
    return x


def annealed_langevin(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor, n_steps_each: int = 100,
                      step_lr: float | None = 2e-5, step_ratio: float | None = None, denoise_last: bool = True,
                      generator: torch.Generator | None = None) -> Tensor:
    """Annealed Langevin dynamics at every time of the grid, step step_lr sigma_i^2 / sigma_L^2 (Song & Ermon 2019, Alg. 1).

    The step is a fixed fraction r = step_lr / sigma_L^2 of each level's sigma_i^2; `step_ratio` gives r directly,
    which means the same on every process (NCSN's 2e-5 at sigma_L = 0.01 is r = 0.2). A Langevin step of size
    a on N(0, s^2) contracts only for a < 4 s^2, so r >= 4 is refused. With `denoise_last`, NCSNv2's final step
    x + sigma_L^2 score (Song & Ermon 2020), written as Tweedie's D(x, t_L) so it also holds for alpha != 1.
    NFE = len(times) n_steps_each (+ 1).
    """
    if (step_lr is None) == (step_ratio is None):
        raise ValueError(f"annealed_langevin takes exactly one of step_lr ({step_lr}) and step_ratio ({step_ratio})")
    if n_steps_each < 1:
        raise ValueError(f"annealed_langevin needs n_steps_each >= 1, got {n_steps_each}")
    times = _check_times(process, times)
    sigma_last = _at(process, times[-1])[1]
    if sigma_last <= 0:
        raise ValueError(f"annealed_langevin needs sigma > 0 at every time, got sigma({times[-1]}) = 0")
    ratio = step_ratio if step_ratio is not None else step_lr / sigma_last**2
    if not 0 < ratio < 4:
        given = f"step_ratio={step_ratio}" if step_ratio is not None else (
            f"step_lr={step_lr} at sigma_L={sigma_last:.3g} (step_lr / sigma_L^2 = {ratio:.3g})")
        raise ValueError(f"annealed_langevin's step must be a fraction 0 < r < 4 of each sigma_i^2 (r >= 4 diverges), "
                         f"got {given}: use step_ratio=0.2, or step_lr <= {0.2 * sigma_last**2:.3g}")
    for t in times:
        a_t, s_t = _at(process, t)
        step = ratio * s_t**2  # alpha_i
        for _ in range(n_steps_each):
            # Langevin step on p_t: x + alpha_i / 2 score + sqrt(alpha_i) z
            score = (a_t * denoiser(x, _levels(x, t)) - x) / s_t**2
            x = x + (step / 2) * score + math.sqrt(step) * _randn(x, generator)
    if denoise_last:
        x = denoiser(x, _levels(x, times[-1]))
    return x


def generate(sampler: Callable, denoiser: DenoiserFn, process: Process, shape, steps: int,
             discretisation: Callable = uniform_times, generator: torch.Generator | None = None, device=None,
             dtype: torch.dtype = torch.float64, **sampler_options) -> tuple[Tensor, int]:
    """Samples and NFE: x ~ N(0, (alpha^2 + sigma^2) I) at t_0 of `discretisation(process, steps)`, then `sampler`.

    The prior is the marginal of unit-variance data at the grid's first time (process.prior_sample at t_max).
    Sampling runs in `dtype` (float64 by default, as EDM); the denoiser casts to its network's dtype.
    """
    times = discretisation(process, steps)
    t0 = torch.as_tensor(times, dtype=torch.float64)[:1]
    std = float((process.alpha(t0) ** 2 + process.sigma(t0) ** 2).sqrt())
    x = std * torch.randn(shape, generator=generator, device=device, dtype=dtype)
    counted = CountingDenoiser(denoiser)
    x = sampler(counted, process, x, times, generator=generator, **sampler_options)
    return x, counted.nfe
