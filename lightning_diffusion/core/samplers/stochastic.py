"""Samplers tied to a process: `sampler(denoiser, process, x, times, generator=None, **opts) -> x`.

x is a sample at times[0] and `denoiser(x, t) ~ E[x_0 | x_t]` in process time. Ancestral sampling and DDIM step along
the process's Gaussian posteriors (DDIM's eta = 0 is the deterministic member), Euler-Maruyama and predictor-corrector
integrate the reverse SDE, annealed Langevin runs NCSN's dynamics at every level. Each sampler's last step lands on
the clean end: `ancestral` and `ddim` add no noise on a step to sigma = 0; `euler_maruyama` and `predictor_corrector`
return the mean of their last step (Song et al.'s `denoise`).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..denoiser import split
from ..processes import Process
from .common import DenoiserFn, at, check_times, denoise, levels, randn


def _transition(process: Process, t: float, s: float):
    """alpha_t, sigma_t, alpha_s, sigma_s and q(x_t | x_s): alpha_{t|s} = alpha_t / alpha_s, sigma_{t|s}^2 (VDM, eq. 33)."""
    a_t, s_t = at(process, t)
    a_s, s_s = at(process, s)
    a_ts = a_t / a_s
    var_ts = max(s_t**2 - a_ts**2 * s_s**2, 0.0)
    return a_t, s_t, a_s, s_s, a_ts, var_ts


def learned_variance(process: Process, v: Tensor, t: float, s: float) -> Tensor:
    """Improved DDPM's variance of p(x_s | x_t): exp(v' log beta + (1 - v') log beta~), v' = (v + 1) / 2.

    beta = 1 - alpha_t^2 / alpha_s^2 and beta~ = beta sigma_s^2 / sigma_t^2 for the (respaced) step t -> s
    (Nichol & Dhariwal 2021, eq. 15 and sec. 4); v is the network's second output at (x_t, t), elementwise.
    """
    a_t, s_t, a_s, s_s, a_ts, _ = _transition(process, t, s)
    beta = 1 - a_ts**2
    beta_tilde = max(beta * s_s**2 / s_t**2, 1e-20)
    frac = (v.to(torch.float64) + 1) / 2
    return (frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)).exp().to(v.dtype)


def ancestral_step(denoiser: DenoiserFn, process: Process, x: Tensor, t: float, s: float) -> tuple[Tensor, Tensor]:
    """Mean and std of q(x_s | x_t, x_0 = D(x_t, t)) for any process (Kingma et al. 2021, app. A; Ho et al. 2020, eq. 7).

    A denoiser with learned variances (`Denoised(D, v)`) sets the std from v instead (Nichol & Dhariwal 2021).
    """
    a_t, s_t, a_s, s_s, a_ts, var_ts = _transition(process, t, s)
    d, v = split(denoiser(x, levels(x, t)))
    mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * d
    if v is None:
        return mean, torch.full_like(x, math.sqrt(var_ts * s_s**2 / s_t**2))
    return mean, learned_variance(process, v, t, s).sqrt()


def ancestral(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor,
              generator: torch.Generator | None = None) -> Tensor:
    """Ancestral sampling from the Gaussian posteriors q(x_s | x_t, x_0 = D) (Ho et al. 2020, Alg. 2 on the full grid).

    On a strided DDPM grid this is improved DDPM's respaced sampler, with the learned variances when the denoiser
    returns them. No noise is added on the step to a time with sigma = 0.
    """
    times = check_times(process, times)
    for t, s in zip(times[:-1], times[1:]):
        mean, std = ancestral_step(denoiser, process, x, t, s)
        # z = 0 on the step to the clean end (Alg. 2, line 3)
        x = mean if at(process, s)[1] == 0 else mean + std * randn(x, generator)
    return x


def ddim_step(denoiser: DenoiserFn, process: Process, x: Tensor, t: float, s: float, eta: float = 0.0):
    """Mean and std of DDIM's x_s = alpha_s D + sqrt(sigma_s^2 - c^2) eps_hat + c z (Song et al. 2021, "DDIM", eq. 12)."""
    a_t, s_t, a_s, s_s, a_ts, var_ts = _transition(process, t, s)
    c = eta * math.sqrt(var_ts * s_s**2 / s_t**2)  # eta times the posterior std
    d = denoise(denoiser, x, t)
    eps = (x - a_t * d) / s_t
    return a_s * d + math.sqrt(max(s_s**2 - c**2, 0.0)) * eps, c


def ddim(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor, eta: float = 0.0,
         generator: torch.Generator | None = None) -> Tensor:
    """DDIM for any process (Song et al. 2021, "DDIM", eq. 12): eta = 0 is Euler on the PF-ODE, eta = 1 is ancestral."""
    if eta < 0:
        raise ValueError(f"ddim needs eta >= 0, got eta={eta}")
    times = check_times(process, times)
    for t, s in zip(times[:-1], times[1:]):
        mean, c = ddim_step(denoiser, process, x, t, s, eta)
        x = mean + c * randn(x, generator) if c > 0 else mean
    return x


def euler_maruyama_step(denoiser: DenoiserFn, process: Process, x: Tensor, t: float, s: float):
    """Mean and std of an Euler-Maruyama step of the reverse SDE dx = [f x - g^2 score] dt + g dw (Song et al. 2021, eq. 6)."""
    a_t, s_t = at(process, t)
    f, g2 = (float(v) for v in process.sde(torch.tensor(t, dtype=torch.float64)))
    score = (a_t * denoise(denoiser, x, t) - x) / s_t**2
    dt = t - s  # the reverse SDE runs backwards in time
    return x - (f * x - g2 * score) * dt, math.sqrt(g2 * dt)


def reverse_diffusion_step(denoiser: DenoiserFn, process: Process, x: Tensor, t: float, s: float):
    """Mean and std of the reverse-diffusion predictor (Song et al. 2021, eq. 45-46) for x_t = alpha_{t|s} x_s + sigma_{t|s} z.

    Forward discretisation f = (alpha_{t|s} - 1) x, G = sigma_{t|s}; reverse step x - f + G^2 score, std G.
    """
    a_t, s_t, a_s, s_s, a_ts, var_ts = _transition(process, t, s)
    score = (a_t * denoise(denoiser, x, t) - x) / s_t**2
    return x - (a_ts - 1) * x + var_ts * score, math.sqrt(var_ts)


def euler_maruyama(denoiser: DenoiserFn, process: Process, x: Tensor, times: Tensor,
                   generator: torch.Generator | None = None) -> Tensor:
    """Euler-Maruyama on the reverse-time SDE; the last step returns its mean, without noise (Song et al. 2021, eq. 6)."""
    times = check_times(process, times)
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        mean, std = euler_maruyama_step(denoiser, process, x, t, s)
        x = mean if i == len(times) - 2 else mean + std * randn(x, generator)
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
    times = check_times(process, times)
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        a_t, s_t, _, _, a_ts, _ = _transition(process, t, s)
        for _ in range(corrector_steps):
            # Langevin corrector at t with the step set by the signal-to-noise ratio
            score = (a_t * denoise(denoiser, x, t) - x) / s_t**2
            z = randn(x, generator)
            ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp(min=1e-30)
            step = float(2 * a_ts**2 * (snr * ratio) ** 2)
            x = x + step * score + math.sqrt(2 * step) * z
        # predictor from t to s
        mean, std = predictor(denoiser, process, x, t, s)
        x = mean if i == len(times) - 2 else mean + std * randn(x, generator)
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
    times = check_times(process, times)
    sigma_last = at(process, times[-1])[1]
    if sigma_last <= 0:
        raise ValueError(f"annealed_langevin needs sigma > 0 at every time, got sigma({times[-1]}) = 0")
    ratio = step_ratio if step_ratio is not None else step_lr / sigma_last**2
    if not 0 < ratio < 4:
        given = f"step_ratio={step_ratio}" if step_ratio is not None else (
            f"step_lr={step_lr} at sigma_L={sigma_last:.3g} (step_lr / sigma_L^2 = {ratio:.3g})")
        raise ValueError(f"annealed_langevin's step must be a fraction 0 < r < 4 of each sigma_i^2 (r >= 4 diverges), "
                         f"got {given}: use step_ratio=0.2, or step_lr <= {0.2 * sigma_last**2:.3g}")
    for t in times:
        a_t, s_t = at(process, t)
        step = ratio * s_t**2  # alpha_i
        for _ in range(n_steps_each):
            # Langevin step on p_t: x + alpha_i / 2 score + sqrt(alpha_i) z
            score = (a_t * denoise(denoiser, x, t) - x) / s_t**2
            x = x + (step / 2) * score + math.sqrt(step) * randn(x, generator)
    if denoise_last:
        x = denoise(denoiser, x, times[-1])
    return x
