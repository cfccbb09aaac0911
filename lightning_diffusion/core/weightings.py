"""Loss weightings w(t) in one canonical space, the eps-MSE (Kingma & Gao 2023, sec. 2).

    L = E_{t ~ p(t)} [ w(t) * || eps_hat - eps ||^2 ],   eps_hat = (x_t - alpha D) / sigma.

Every paper states its weight on its own error; they convert at the edges. From D - x_0 = -(sigma / alpha)
(eps_hat - eps) and score_hat - score = -(eps_hat - eps) / sigma:

    || D - x_0 ||^2         = || eps_hat - eps ||^2 / snr          (snr = alpha^2 / sigma^2 = exp(logsnr))
    || score_hat - score ||^2 = || eps_hat - eps ||^2 / sigma^2
    || v_hat - v ||^2       = || eps_hat - eps ||^2 (alpha^2 + sigma^2)^2 / alpha^2   (= (snr + 1) / snr on VP)

so a weight lambda on the x_0-error is lambda / snr here, a weight on the score error is lambda / sigma^2, and a
weight on the v-error is lambda (alpha^2 + sigma^2)^2 / alpha^2. A weighting is a plain function
`w(t, process, **params) -> (B,)` (float64), chosen in Hydra with `_target_` and `_partial_: true`. Positive constant
factors of the papers (the ELBO's 1/2) are dropped: they rescale the loss, not the objective's minimiser.

The density p(t) the noise level is drawn from lives in `noise_levels`; the objective is the product
p(logsnr) w(logsnr), see `effective_weighting` and `same_objective`.
"""

import math

import torch
from torch import Tensor, nn

from .noise_levels import logsnr_density, spread_logsnr_density
from .processes import Process


def _logsnr(t: Tensor, process: Process) -> Tensor:
    return process.logsnr(torch.as_tensor(t).to(torch.float64))


def _check_positive(name: str, value: float, weighting: str) -> None:
    if not value > 0:
        raise ValueError(f"{weighting} needs {name} > 0, got {name}={value}")


def l_simple(t: Tensor, process: Process) -> Tensor:
    """DDPM's L_simple, the unweighted eps-MSE (Ho et al. 2020, eq. 14): w = 1."""
    return torch.ones_like(_logsnr(t, process))


def snr(t: Tensor, process: Process) -> Tensor:
    """SNR weighting, snr ||x_0 - x_hat||^2 (Salimans & Ho 2022, sec. 4): w = 1, the same objective as L_simple."""
    return torch.ones_like(_logsnr(t, process))


def x0_mse(t: Tensor, process: Process) -> Tensor:
    """The unweighted x_0-MSE ||x_0 - x_hat||^2 (Kingma et al. 2021, VDM, eq. 13 with w = 1): w = 1 / snr."""
    return (-_logsnr(t, process)).exp()


def truncated_snr(t: Tensor, process: Process) -> Tensor:
    """Truncated SNR, max(snr, 1) ||x_0 - x_hat||^2 (Salimans & Ho 2022, sec. 4): w = max(1, 1 / snr)."""
    return (-_logsnr(t, process)).exp().clamp(min=1.0)


def snr_plus_one(t: Tensor, process: Process) -> Tensor:
    """SNR+1 weighting, (snr + 1) ||x_0 - x_hat||^2 = the v-MSE on VP (Salimans & Ho 2022, sec. 4): w = 1 + 1 / snr."""
    return 1.0 + (-_logsnr(t, process)).exp()


def velocity_mse(t: Tensor, process: Process) -> Tensor:
    """Flow matching's ||v_hat - v||^2 with v = alpha' x_0 + sigma' eps (Lipman et al. 2023): w = (sigma' - alpha' sigma / alpha)^2.

    v_hat - v = alpha' (D - x_0) + sigma' (eps_hat - eps); on rectified flow w = 1 / (1 - t)^2.
    """
    t = torch.as_tensor(t).to(torch.float64)
    dalpha, dsigma = process.derivatives(t)
    return (dsigma - dalpha * process.sigma(t) / process.alpha(t)) ** 2


def p2(t: Tensor, process: Process, k: float = 1.0, gamma: float = 1.0) -> Tensor:
    """Perception-prioritised weighting on the eps-MSE, 1 / (k + snr)^gamma (Choi et al. 2022, eq. 8)."""
    _check_positive("k", k, "p2")
    if not gamma >= 0:
        raise ValueError(f"p2 needs gamma >= 0 (gamma = 0 is L_simple), got gamma={gamma}")
    return (k + _logsnr(t, process).exp()) ** (-gamma)


def min_snr(t: Tensor, process: Process, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma, min(snr, gamma) ||x_0 - x_hat||^2 (Hang et al. 2023, eq. 8): w = min(snr, gamma) / snr."""
    _check_positive("gamma", gamma, "min_snr")
    lam = _logsnr(t, process)
    # min(snr, gamma) / snr = min(1, gamma / snr), written without overflow at large snr
    return (math.log(gamma) - lam).exp().clamp(max=1.0)


def ncsn_sigma2(t: Tensor, process: Process) -> Tensor:
    """NCSN's lambda(sigma) = sigma^2 on the score error (Song & Ermon 2019, eq. 6): w = 1."""
    return torch.ones_like(_logsnr(t, process))


def likelihood(t: Tensor, process: Process) -> Tensor:
    """Likelihood weighting, g(t)^2 on the score error (Song et al. 2021b, eq. 8): w = g^2 / sigma^2 = -d logsnr / dt."""
    return -process.dlogsnr_dt(torch.as_tensor(t).to(torch.float64))


def edm(t: Tensor, process: Process, sigma_data: float = 0.5) -> Tensor:
    """EDM's lambda = (s^2 + sigma_data^2) / (s sigma_data)^2 on the D-error, s = sigma / alpha (Karras et al. 2022, eq. 8).

    ||D - x_0||^2 = s^2 ||eps_hat - eps||^2, so w = (s^2 + sigma_data^2) / sigma_data^2.
    """
    _check_positive("sigma_data", sigma_data, "edm")
    s2 = (-_logsnr(t, process)).exp()
    return (s2 + sigma_data**2) / sigma_data**2


def sigmoid(t: Tensor, process: Process, b: float = -2.0) -> Tensor:
    """Kingma & Gao's sigmoid weighting, -d logsnr/dt * sigmoid(b - logsnr) on the eps-MSE (Kingma & Gao 2023, eq. 7, sec. 5).

    The factor -d logsnr/dt turns the integral over t into one over logsnr, so the objective does not depend on the
    schedule when t is uniform; b shifts the weight towards high noise (b < 0).
    """
    t64 = torch.as_tensor(t).to(torch.float64)
    return -process.dlogsnr_dt(t64) * torch.sigmoid(b - process.logsnr(t64))


class UncertaintyWeighting(nn.Module):
    """EDM2's learned uncertainty u(sigma): loss / exp(u) + u (Karras et al. 2024, "EDM2", eq. 21).

    u is a linear layer on Fourier features of c_noise = -logsnr / 8 (= ln(sigma~) / 4), initialised to 0, so
    the model starts with the plain loss and learns to equalise its magnitude across noise levels.
    """

    def __init__(self, channels: int = 128, seed: int = 0):
        super().__init__()
        if channels < 1:
            raise ValueError(f"UncertaintyWeighting needs channels >= 1, got channels={channels}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(channels, generator=g))
        self.register_buffer("phases", torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def logvar(self, logsnr: Tensor) -> Tensor:
        """u(logsnr), shape (B,): the learned log-variance of the loss at this noise level."""
        c_noise = (-logsnr / 8).to(self.freqs.dtype)
        features = math.sqrt(2) * torch.cos(2 * math.pi * (c_noise[:, None] * self.freqs + self.phases))
        return self.linear(features).squeeze(-1)

    def forward(self, per_sample_loss: Tensor, logsnr: Tensor) -> Tensor:
        """per_sample_loss / exp(u(logsnr)) + u(logsnr), shape (B,)."""
        u = self.logvar(logsnr).to(per_sample_loss.dtype)
        return per_sample_loss / u.exp() + u


def effective_weighting(weighting, draw, process: Process, logsnr_grid: Tensor, spread_atoms: bool = False):
    """The objective as a function of logsnr: (p(logsnr), w(logsnr), p * w) on `logsnr_grid` (Kingma & Gao 2023, sec. 2).

    E_{t ~ p(t)} [w(t) ||eps_hat - eps||^2] = int p(lambda) w(lambda) E||eps_hat - eps||^2_lambda d lambda, and the
    eps-error at a given logsnr does not depend on the schedule, so two configurations (weighting, noise-level
    draw, process) are the same objective iff their products are proportional (a constant only rescales the
    learning rate). The density is zero outside the process's logsnr range; `spread_atoms` draws a discrete process's
    point masses spread over their steps (`noise_levels.spread_logsnr_density`), for plots.
    """
    grid = torch.as_tensor(logsnr_grid, dtype=torch.float64)
    density = spread_logsnr_density(draw, process, grid) if spread_atoms else logsnr_density(draw, process, grid)
    t = process.t_of_logsnr(grid)
    w = weighting(t, process).to(torch.float64)
    return density, w, density * w


def same_objective(config_a, config_b, process: Process, logsnr_grid: Tensor, rtol: float = 1e-2) -> bool:
    """Whether two (weighting, noise-level draw[, process]) configs have proportional effective weightings on the grid.

    A config's optional third element overrides `process` (e.g. the ELBO on VP and on VE). Grid points where exactly
    one product vanishes make them different; otherwise the ratio of the products must be constant to `rtol`.
    """
    products = []
    for config in (config_a, config_b):
        weighting, draw, *rest = config
        products.append(effective_weighting(weighting, draw, rest[0] if rest else process, logsnr_grid)[2])
    a, b = products
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    on_a, on_b = a.abs() > 1e-12 * scale, b.abs() > 1e-12 * scale
    if not torch.equal(on_a, on_b):
        return False
    if not on_a.any():
        return True
    ratio = a[on_a] / b[on_b]
    return bool(((ratio / ratio.median() - 1).abs() <= rtol).all())
