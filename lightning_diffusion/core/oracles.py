"""Exact oracles for Gaussian and Gaussian-mixture data at every noise level of every process.

If x_0 ~ sum_k pi_k N(mu_k, S_k) then x_t = alpha x_0 + sigma eps ~ sum_k pi_k N(alpha mu_k, C_k) with
C_k = alpha^2 S_k + sigma^2 I, so the score, the denoiser E[x_0 | x_t] (per component the Wiener filter
mu_k + alpha S_k C_k^-1 (x - alpha mu_k), mixed by the posterior responsibilities) and the log-density are
exact. Users test their own samplers against these; everything runs in float64.
"""

import math

import torch
from torch import Tensor

from .processes import Process


def _per_sample(v, x: Tensor) -> Tensor:
    """A scalar or (B,) noise coefficient as a float64 (B, 1, 1) tensor for (B, K, D) algebra."""
    v = torch.as_tensor(v, dtype=torch.float64, device=x.device)
    return v.reshape(-1, 1, 1) if v.ndim else v.reshape(1, 1, 1)


class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]) in D dimensions, exact under any Gaussian noising."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        K, D = self.means.shape
        if self.weights.shape != (K,) or covs.shape != (K, D, D):
            raise ValueError(f"need weights (K,), means (K, D), covs (K, D, D); got {tuple(self.weights.shape)}, "
                             f"{tuple(self.means.shape)}, {tuple(covs.shape)}")
        if (self.weights < 0).any() or not math.isclose(float(self.weights.sum()), 1.0, rel_tol=1e-6):
            raise ValueError("mixture weights must be non-negative and sum to 1")
        self.covs = covs
        self.eigvals, self.eigvecs = torch.linalg.eigh(covs)  # S_k = U_k diag(l_k) U_k^T
        if (self.eigvals < -1e-10).any():
            raise ValueError("covariances must be positive semi-definite")
        self.eigvals = self.eigvals.clamp(min=0)
        self.dim = D

    @classmethod
    def isotropic(cls, means: Tensor, std: float, weights: Tensor | None = None) -> "GaussianMixture":
        means = torch.as_tensor(means, dtype=torch.float64)
        K, D = means.shape
        weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else weights
        return cls(weights, means, std**2 * torch.eye(D, dtype=torch.float64).expand(K, D, D).clone())

    def _components(self, x: Tensor, alpha, sigma):
        """Per component: projected residual y = U^T (x - alpha mu), variances alpha^2 l + sigma^2, log N."""
        x = x.to(torch.float64).reshape(x.shape[0], 1, self.dim)
        a, s = _per_sample(alpha, x), _per_sample(sigma, x)
        y = torch.einsum("kde,bkd->bke", self.eigvecs.to(x.device), x - a * self.means.to(x.device))
        var = a**2 * self.eigvals.to(x.device) + s**2
        logn = -0.5 * (y**2 / var).sum(-1) - 0.5 * var.log().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return y, var, a, logn

    def log_prob(self, x: Tensor, alpha=1.0, sigma=0.0) -> Tensor:
        """log p_t(x) of the noised marginal (alpha=1, sigma=0 gives the data density)."""
        *_, logn = self._components(x, alpha, sigma)
        return torch.logsumexp(logn + self.weights.to(logn.device).log(), dim=1)

    def _responsibilities(self, logn: Tensor) -> Tensor:
        return torch.softmax(logn + self.weights.to(logn.device).log(), dim=1)

    def score(self, x: Tensor, alpha, sigma) -> Tensor:
        """grad_x log p_t(x) = sum_k r_k(x) (-C_k^-1 (x - alpha mu_k))."""
        y, var, _, logn = self._components(x, alpha, sigma)
        per_k = -torch.einsum("kde,bke->bkd", self.eigvecs.to(x.device), y / var)
        return (self._responsibilities(logn)[..., None] * per_k).sum(1).reshape(x.shape)

    def denoise(self, x: Tensor, alpha, sigma) -> Tensor:
        """E[x_0 | x_t = x] = sum_k r_k(x) (mu_k + alpha S_k C_k^-1 (x - alpha mu_k))."""
        y, var, a, logn = self._components(x, alpha, sigma)
        gain = a * self.eigvals.to(x.device) / var
        per_k = self.means.to(x.device) + torch.einsum("kde,bke->bkd", self.eigvecs.to(x.device), gain * y)
        return (self._responsibilities(logn)[..., None] * per_k).sum(1).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scale = self.eigvecs[k] * self.eigvals[k].sqrt()[:, None, :]
        return self.means[k] + torch.einsum("nde,ne->nd", scale, z)

    def denoiser(self, process: Process):
        """The exact D(x, t) for data noised by `process`, in the signature every sampler takes."""
        return lambda x, t: self.denoise(x, process.alpha(t), process.sigma(t)).to(x.dtype)

    def score_fn(self, process: Process):
        return lambda x, t: self.score(x, process.alpha(t), process.sigma(t)).to(x.dtype)


class Gaussian(GaussianMixture):
    """N(mean, cov): a one-component mixture whose probability-flow ODE has a closed form."""

    def __init__(self, mean: Tensor, cov: Tensor):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        super().__init__(torch.ones(1, dtype=torch.float64), mean[None], torch.as_tensor(cov, dtype=torch.float64)[None])

    def pf_ode_solution(self, x_tilde: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """Exact PF-ODE flow in the scaled space, dx~/dsigma~ = (x~ - D) / sigma~ (Karras et al. 2022, eq. 4).

        Along each principal axis l of S, y = U^T (x~ - mu) grows as sqrt(l + sigma~^2).
        """
        U, lam, mu = self.eigvecs[0], self.eigvals[0], self.means[0]
        y = (x_tilde.to(torch.float64) - mu) @ U
        y = y * ((lam + sigma_to**2) / (lam + sigma_from**2)).sqrt()
        return (mu + y @ U.T).to(x_tilde.dtype)

    def bits_per_dim(self) -> float:
        """Exact differential entropy in bits per dimension: the NLL an exact model attains on its samples."""
        logdet = torch.logdet(self.covs[0])
        nats = 0.5 * (self.dim * (1 + math.log(2 * math.pi)) + logdet)
        return float(nats / (self.dim * math.log(2)))
