"""Gaussian noise processes x_t = alpha(t) x_0 + sigma(t) eps (Kingma et al. 2021, "VDM"; Karras et al. 2022).

Every family is one of these curves. A process states alpha(t) and sigma(t); everything else
(logsnr, its inverse, the forward SDE's drift and diffusion, the prior) follows generically, so a
new schedule is one small subclass.
"""

import math

import torch
from torch import Tensor


def expand_to(v: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample (B,) tensor (or a scalar) against a batch x of shape (B, ...)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class Process:
    """x_t = alpha(t) x_0 + sigma(t) eps on t in [t_min, t_max]; subclasses define `log_alpha` and `sigma`."""

    t_min: float = 0.0
    t_max: float = 1.0
    discrete: bool = False  # whether t runs over the integers 1..T (DDPM's chain), with `T` the number of steps

    def log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        return self.log_alpha(t).exp()

    def logsnr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2); strictly decreasing in t."""
        return 2.0 * (self.log_alpha(t) - self.sigma(t).log())

    def sigma_tilde(self, t: Tensor) -> Tensor:
        """Noise level of the scaled variable x / alpha (EDM's sigma): exp(-logsnr / 2)."""
        return self.sigma(t) / self.alpha(t)

    def sigma_tilde_range(self) -> tuple[float, float]:
        """The smallest positive and the largest scaled noise level the process trains on (a sampling grid's ends)."""
        ends = self.sigma_tilde(torch.tensor([self.t_min, self.t_max], dtype=torch.float64)).tolist()
        return ends[0], ends[1]

    def t_of_logsnr(self, logsnr: Tensor, iters: int = 64) -> Tensor:
        """Inverse of logsnr(t) by bisection in float64 (logsnr is monotone for every process)."""
        target = torch.as_tensor(logsnr, dtype=torch.float64)
        lo = torch.full_like(target, self.t_min)
        hi = torch.full_like(target, self.t_max)
        for _ in range(iters):
            mid = (lo + hi) / 2
            above = self.logsnr(mid) > target  # still too clean: move right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return ((lo + hi) / 2).to(torch.as_tensor(logsnr).dtype if torch.is_tensor(logsnr) else torch.float64)

    def t_of_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        return self.t_of_logsnr(-2.0 * torch.as_tensor(sigma_tilde).log())

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(d alpha / dt, d sigma / dt) by autograd, so subclasses only state the curves."""
        with torch.enable_grad():
            t = torch.as_tensor(t).detach().clone().requires_grad_(True)
            dalpha = torch.autograd.grad(self.alpha(t).sum(), t)[0]
            dsigma = torch.autograd.grad(self.sigma(t).sum(), t)[0]
        return dalpha, dsigma

    def sde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Forward SDE dx = f(t) x dt + g(t) dw matching the marginals (VDM, eq. 30-31).

        f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2. Returns (f, g^2).
        """
        dalpha, dsigma = self.derivatives(t)
        alpha, sigma = self.alpha(t), self.sigma(t)
        f = dalpha / alpha
        return f, 2 * sigma * dsigma - 2 * f * sigma**2

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        """d lambda / dt = -g^2 / sigma^2 (negative); the likelihood weighting is its negative."""
        f, g2 = self.sde(t)
        return -g2 / self.sigma(t) ** 2

    def prior_std(self) -> float:
        """Std of the prior N(0, alpha^2 + sigma^2) at t_max: the marginal of unit-variance data (1 for VP)."""
        t = torch.tensor(self.t_max, dtype=torch.float64)
        return float((self.alpha(t) ** 2 + self.sigma(t) ** 2).sqrt())

    def prior_sample(self, shape, generator=None, device=None, dtype=torch.float32) -> Tensor:
        return self.prior_std() * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, x: Tensor) -> Tensor:
        """log N(x; 0, prior_std^2 I), summed over all but the batch dimension."""
        s = self.prior_std()
        d = x[0].numel()
        return -0.5 * (x.flatten(1) ** 2).sum(1) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class VPSDE(Process):
    """Variance preserving SDE, beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, eq. 11).

    log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2;  sigma^2 = 1 - alpha^2.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"VPSDE needs 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        if not 0 <= t_min < 1:
            raise ValueError(f"t_min must be in [0, 1), got {t_min}")
        self.beta_min, self.beta_max, self.t_min, self.t_max = beta_min, beta_max, t_min, 1.0

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sigma(self, t):
        return (-torch.expm1(2 * self.log_alpha(t))).sqrt()


class SubVPSDE(VPSDE):
    """sub-VP SDE: the VP mean with sigma(t) = 1 - alpha(t)^2 (Song et al. 2021, eq. 29)."""

    def sigma(self, t):
        return -torch.expm1(2 * self.log_alpha(t))


class VESDE(Process):
    """Variance exploding SDE, sigma(t) = sigma_min (sigma_max / sigma_min)^t, alpha = 1 (Song et al. 2021, eq. 9).

    NCSN's geometric ladder of L sigmas is this process at L evenly spaced times (Song & Ermon 2019).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.t_min, self.t_max = sigma_min, sigma_max, t_min, 1.0

    def log_alpha(self, t):
        return 0.0 * torch.as_tensor(t)

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def t_of_logsnr(self, logsnr, iters: int = 64):
        """t = log(sigma / sigma_min) / log(sigma_max / sigma_min) with sigma = exp(-logsnr / 2), in closed form."""
        log_sigma = -torch.as_tensor(logsnr, dtype=torch.float64) / 2
        t = (log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)
        return t.clamp(self.t_min, self.t_max)


class EDMProcess(Process):
    """EDM's process: alpha = 1, sigma(t) = t, so time is the noise level (Karras et al. 2022, Table 1)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDMProcess needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.t_min, self.t_max = sigma_min, sigma_max

    def log_alpha(self, t):
        return 0.0 * torch.as_tensor(t)

    def sigma(self, t):
        return torch.as_tensor(t)

    def t_of_logsnr(self, logsnr, iters: int = 64):
        """sigma = exp(-logsnr / 2), in closed form."""
        return torch.exp(-torch.as_tensor(logsnr, dtype=torch.float64) / 2).clamp(self.t_min, self.t_max)


class RectifiedFlow(Process):
    """Straight paths x_t = (1 - t) x_0 + t eps (Liu et al. 2023; Lipman et al. 2023)."""

    def __init__(self, t_min: float = 1e-4, t_max: float = 1.0):
        if not 0 <= t_min < t_max <= 1:
            raise ValueError(f"RectifiedFlow needs 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        self.t_min, self.t_max = t_min, t_max

    def log_alpha(self, t):
        return torch.log1p(-torch.as_tensor(t))

    def sigma(self, t):
        return torch.as_tensor(t)


class DiscreteDDPM(Process):
    """Discrete-time DDPM with alphabar_t = prod_{s<=t} (1 - beta_s), t = 1..T (Ho et al. 2020).

    alpha(t) = sqrt(alphabar_t), sigma(t) = sqrt(1 - alphabar_t), alphabar_0 = 1. Between integers,
    log alphabar is interpolated linearly, so continuous-time samplers can also run on it.
    """

    discrete = True

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("every beta must lie in (0, 1)")
        self.T = len(betas)
        self.betas = betas
        self.t_min, self.t_max = 0.0, float(self.T)
        self._log_alphabar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log1p(-betas).cumsum(0)])

    def log_alpha(self, t):
        t = torch.as_tensor(t)
        table = self._log_alphabar.to(t.device)
        tc = t.to(torch.float64).clamp(0, self.T)
        i = tc.floor().clamp(max=self.T - 1).long()
        frac = tc - i
        return (0.5 * (table[i] * (1 - frac) + table[i + 1] * frac)).to(t.dtype if t.is_floating_point() else torch.float64)

    def sigma(self, t):
        return (-torch.expm1(2 * self.log_alpha(t))).sqrt()

    def sigma_tilde_range(self) -> tuple[float, float]:
        """sigma~ at t = 1 and t = T: the noise levels DDPM trains on (t = 0 is the clean data)."""
        ends = self.sigma_tilde(torch.tensor([1.0, float(self.T)], dtype=torch.float64)).tolist()
        return ends[0], ends[1]

    def __repr__(self) -> str:
        return f"DiscreteDDPM(T={self.T}, beta_1={float(self.betas[0]):.3g}, beta_T={float(self.betas[-1]):.3g})"


def linear_betas(T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> Tensor:
    """DDPM's linear schedule, scaled by 1000 / T so any T spans the same curve (Ho et al. 2020)."""
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    scale = 1000 / T
    return torch.linspace(scale * beta_1, min(scale * beta_T, 0.999), T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """alphabar(t) = cos^2((t/T + s) / (1 + s) * pi / 2), betas clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17)."""
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def sigmoid_betas(T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999) -> Tensor:
    """alphabar(t) from a rescaled sigmoid between `start` and `end` with temperature tau (Chen 2023, Alg. 1)."""
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not start < end or tau <= 0:
        raise ValueError(f"sigmoid schedule needs start < end and tau > 0, got {start}, {end}, {tau}")
    u = torch.arange(T + 1, dtype=torch.float64) / T
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
    f = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
    return (1 - f[1:] / f[:-1]).clamp(min=1e-8, max=max_beta)


def ddpm(schedule=linear_betas, T: int = 1000, **kwargs) -> DiscreteDDPM:
    """A DiscreteDDPM from a beta schedule function, e.g. `ddpm(cosine_betas, T=4000)`."""
    return DiscreteDDPM(schedule(T, **kwargs))
