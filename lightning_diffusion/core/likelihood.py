"""Likelihoods: the probability-flow ODE's exact log-density, bits/dim, dequantisation, and DDPM's discrete VLB.

PF-ODE (Song et al. 2021, eq. 13 and appendix D.2): dx/dt = f(t) x - 1/2 g(t)^2 score(x, t) carries p_0 to p_T,
and the instantaneous change of variables (Chen et al. 2018) gives d log p_t(x_t)/dt = -div(drift), so

    log p_0(x_0) = log p_T(x_T) + int_{t_min}^{t_max} div(drift)(x_t, t) dt.

The divergence is exact (one backward pass per dimension) or Hutchinson's estimate with probes fixed over the
whole integration (Grathwohl et al. 2019, FFJORD), which keeps the ODE deterministic and the estimate unbiased.
"""

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from .denoiser import score_from_denoiser, split
from .losses import ddpm_vlb_terms
from .processes import DiscreteDDPM, Process, expand_to

# ---------------------------------------------------------------------------------------------------------------
# Divergence estimators: trace_fn(drift, x, probes) -> (B,), drift computed from x with a graph.
# ---------------------------------------------------------------------------------------------------------------


def exact_trace(drift: Tensor, x: Tensor, probes: Tensor | None = None) -> Tensor:
    """Tr(d drift / dx) per sample, exactly, by one backward pass per dimension (samples must not interact)."""
    flat = drift.flatten(1)
    diag = torch.zeros_like(flat)
    for i in range(flat.shape[1]):
        # summing over the batch gives column i of every sample's Jacobian at once
        grad = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
        diag[:, i] = grad.flatten(1)[:, i]
    return diag.sum(1)


def hutchinson_trace(drift: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson's estimate mean_k eps_k^T (d drift / dx) eps_k with fixed probes (Grathwohl et al. 2019, eq. 7)."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for eps in probes:
        # one vector-Jacobian product per probe: eps^T J, then dot with eps
        vjp = torch.autograd.grad(drift, x, grad_outputs=eps, retain_graph=True)[0]
        total = total + (vjp * eps).flatten(1).sum(1)
    return total / len(probes)


def rademacher_probes(shape, generator=None, dtype=torch.float64, device=None) -> Tensor:
    """Probes with i.i.d. +-1 entries: the minimum-variance Hutchinson probe (Hutchinson 1989)."""
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64)
    return (2 * signs - 1).to(dtype=dtype, device=device)


def gaussian_probes(shape, generator=None, dtype=torch.float64, device=None) -> Tensor:
    """Probes with i.i.d. N(0, 1) entries (Skilling 1989; Grathwohl et al. 2019)."""
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


# ---------------------------------------------------------------------------------------------------------------
# Probability-flow ODE likelihood
# ---------------------------------------------------------------------------------------------------------------


def pf_ode_drift(denoiser, process: Process, x: Tensor, t: Tensor) -> Tensor:
    """Probability-flow drift f(t) x - 1/2 g(t)^2 score(x, t), score = (alpha D - x) / sigma^2 (Song et al. 2021, eq. 13)."""
    f, g2 = process.sde(t)
    score = score_from_denoiser(x, split(denoiser(x, t))[0], process.alpha(t), process.sigma(t))
    return expand_to(f, x) * x - 0.5 * expand_to(g2, x) * score


class LogLikelihood(NamedTuple):
    """log p_0(x_0) in nats per sample (B,) and the number of drift evaluations the solver used."""

    logp: Tensor
    nfe: int


def pf_ode_log_likelihood(denoiser, process: Process, x0: Tensor, trace_fn: Callable = hutchinson_trace,
                          n_probes: int = 1, probe_fn: Callable = rademacher_probes, rtol: float = 1e-5,
                          atol: float = 1e-5, method: str = "RK45", t_min: float | None = None,
                          t_max: float | None = None, generator: torch.Generator | None = None) -> LogLikelihood:
    """log p_0(x_0) by integrating the PF-ODE with its divergence from t_min to t_max (Song et al. 2021, app. D.2).

    Args:
        trace_fn: `hutchinson_trace` (default; `n_probes` probes from `probe_fn`, drawn once with `generator`)
            or `exact_trace` (D backward passes per step; small D only).
        t_min, t_max: integration limits, default the process's own (VP: 1e-5 as in Song; EDM: sigma_min); a
            DiscreteDDPM needs t_min > 0 and rectified flow t_max < 1. The model density is that of x_{t_min} (the
            data density up to the noise sigma(t_min)); the prior is `process.prior_logp`, N(0, prior_std^2 I).
        method: any scipy `solve_ivp` method; the state is flattened to float64.
    Returns: LogLikelihood(logp (B,) in nats, nfe). Negative log-likelihood in bits/dim: `bits_per_dim(-logp, D)`.
    """
    t_min = process.t_min if t_min is None else t_min
    t_max = process.t_max if t_max is None else t_max
    if not t_min < t_max:
        raise ValueError(f"need t_min < t_max, got t_min={t_min}, t_max={t_max}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    if not float(process.sigma(torch.tensor(t_min, dtype=torch.float64))) > 0:
        raise ValueError(f"sigma(t_min) must be > 0 for the score to exist, got t_min={t_min}; pass a larger t_min "
                         f"(e.g. 1e-3 for a DiscreteDDPM)")
    if not float(process.alpha(torch.tensor(t_max, dtype=torch.float64))) > 0:
        raise ValueError(f"alpha(t_max) must be > 0 for the drift to be finite, got t_max={t_max}; pass a smaller "
                         f"t_max (e.g. 1 - 1e-4 for RectifiedFlow)")
    shape, device, batch = x0.shape, x0.device, x0.shape[0]
    n = x0.numel()
    probes = probe_fn((n_probes,) + tuple(shape), generator=generator, dtype=torch.float64, device=device)

    def ode(t: float, state: np.ndarray) -> np.ndarray:
        # state = [x_t flattened, int_{t_min}^t div dt]; returns [drift, div]
        x = torch.as_tensor(state[:n], device=device).reshape(shape).requires_grad_(True)
        tt = torch.full((batch,), t, dtype=torch.float64, device=device)
        with torch.enable_grad():
            drift = pf_ode_drift(denoiser, process, x, tt)
            div = trace_fn(drift, x, probes)
        return np.concatenate([drift.detach().cpu().numpy().ravel(), div.detach().cpu().numpy()])

    state0 = np.concatenate([x0.detach().to(torch.float64).cpu().numpy().ravel(), np.zeros(batch)])
    sol = solve_ivp(ode, (t_min, t_max), state0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"PF-ODE integration failed: {sol.message}")
    end = torch.as_tensor(sol.y[:, -1], device=device)
    x_T, delta = end[:n].reshape(shape), end[n:]
    # change of variables: log p_0(x_0) = log p_T(x_T) + int div
    return LogLikelihood(process.prior_logp(x_T) + delta, int(sol.nfev))


# ---------------------------------------------------------------------------------------------------------------
# Bits per dimension and dequantisation
# ---------------------------------------------------------------------------------------------------------------


def bits_per_dim(nll_nats: Tensor, dim: int) -> Tensor:
    """Negative log-likelihood in nats per sample -> bits per dimension: nll / (dim ln 2)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return nll_nats / (dim * math.log(2))


def uniform_dequantize(pixels: Tensor, n_bits: int = 8, generator: torch.Generator | None = None) -> Tensor:
    """y = 2 (k + u) / 2^n_bits - 1 with u ~ U[0, 1)^D: integer pixels k to [-1, 1) (Theis et al. 2016; Ho et al. 2020)."""
    levels = 2**n_bits
    k = torch.as_tensor(pixels)
    if (k < 0).any() or (k > levels - 1).any() or (k != k.round()).any():
        raise ValueError(f"pixels must be integers in [0, {levels - 1}] for n_bits={n_bits}")
    u = torch.rand(k.shape, generator=generator, dtype=torch.float64).to(k.device)
    return 2 * (k.to(torch.float64) + u) / levels - 1


def dequantized_bits_per_dim(nll_nats: Tensor, dim: int, n_bits: int = 8, data_range: tuple = (-1.0, 1.0)) -> Tensor:
    """Bits/dim of the discrete data from the continuous NLL of uniformly dequantised y (Song et al. 2021, app. D.2).

    With z = k + u in [0, 2^n) pixel units and y = lo + (hi - lo) z / 2^n, p_z(z) = p_y(y) ((hi - lo) / 2^n)^D, and by
    Jensen -log P(k) = -log int_{[0,1)^D} p_z(k + u) du <= E_u[-log p_y(y)] + D log(2^n / (hi - lo)). Hence

        bits/dim <= nll_y / (D ln 2) + n - log2(hi - lo)      (= + 7 for 8-bit data on [-1, 1]),

    with equality when p_y is constant on every bin. Pass nll_y = -log p_y(y) for y = uniform_dequantize(k).
    """
    lo, hi = data_range
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range}")
    return bits_per_dim(nll_nats, dim) + n_bits - math.log2(hi - lo)


# ---------------------------------------------------------------------------------------------------------------
# Discrete DDPM variational bound
# ---------------------------------------------------------------------------------------------------------------


def ddpm_prior_kl(process: DiscreteDDPM, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) = KL(N(alpha_T x_0, sigma_T^2) || N(0, 1)) summed per sample, nats (Ho et al. 2020, eq. 5)."""
    t = torch.full((x0.shape[0],), float(process.t_max), dtype=torch.float64, device=x0.device)
    alpha2, sigma2 = expand_to(process.alpha(t) ** 2, x0), expand_to(process.sigma(t) ** 2, x0)
    # KL(N(m, s^2) || N(0, 1)) = 1/2 (s^2 + m^2 - 1 - log s^2)
    kl = 0.5 * (sigma2 + alpha2 * x0.to(torch.float64) ** 2 - 1 - sigma2.log())
    return kl.flatten(1).sum(1)


@torch.no_grad()
def ddpm_vlb_bits_per_dim(denoiser, process: DiscreteDDPM, x0: Tensor, labels=None,
                          generator: torch.Generator | None = None, terms_fn: Callable = ddpm_vlb_terms) -> Tensor:
    """The full discrete VLB L_T + sum_{t>1} L_{t-1} + L_0 in bits/dim per sample (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021).

    x_0 is 8-bit data k / 127.5 - 1 on [-1, 1] (the decoder L_0 is a discretised Gaussian). One fresh noise draw
    (from `generator`) per t, so every term is an unbiased one-sample estimate; T denoiser calls in all.
    `terms_fn(denoiser, process, x0, t, noise, labels)` returns L_{t-1} in nats per sample (`losses.ddpm_vlb_terms`).
    """
    if not process.discrete:
        raise ValueError(f"the DDPM VLB needs a DiscreteDDPM process, got {process!r}")
    total = ddpm_prior_kl(process, x0)
    for step in range(process.T, 0, -1):
        # L_{t-1} at t = T..1, each with its own forward noise
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(device=x0.device, dtype=x0.dtype)
        t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
        total = total + terms_fn(denoiser, process, x0, t, noise, labels).to(torch.float64)
    return bits_per_dim(total, x0[0].numel())
