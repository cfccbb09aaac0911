"""The denoising loss against the exact Gaussian oracle, and improved DDPM's VLB terms and hybrid loss."""

import functools
import math

import pytest
import torch
from scipy import stats
from torch import nn

from helpers import FixedOutput
from lightning_diffusion.core.losses import (ddpm_vlb_terms, denoising_loss, discretized_gaussian_nll, hybrid_loss,
                                        vlb_loss)
from lightning_diffusion.core.oracles import Gaussian
from lightning_diffusion.core.denoiser import Denoiser
from lightning_diffusion.core.parameterizations import EpsPrediction, VPrediction
from lightning_diffusion.core.processes import VPSDE, cosine_betas, ddpm, expand_to
from lightning_diffusion.core.weightings import edm, l_simple

DIM = 6


class TinyMLP(nn.Module):
    """network(x, c_noise, labels) with separate mean and variance heads (out_mult=2 for learned variance)."""

    def __init__(self, dim=DIM, hidden=32, learned_variance=False, num_classes=None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU())
        self.mean_head = nn.Linear(hidden, dim)
        self.var_head = nn.Linear(hidden, dim) if learned_variance else None
        self.embed = nn.Embedding(num_classes + 1, dim + 1) if num_classes else None
        self.double()

    def forward(self, x, c_noise, labels=None):
        h = torch.cat([x, c_noise[:, None]], dim=1)
        if labels is not None:
            h = h + self.embed(labels)
        h = self.body(h)
        out = self.mean_head(h)
        return out if self.var_head is None else torch.cat([out, torch.tanh(self.var_head(h))], dim=1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def noised(process, x0, t, noise):
    return expand_to(process.alpha(t), x0) * x0 + expand_to(process.sigma(t), x0) * noise


# ---------------------------------------------------------------- denoising loss


@pytest.mark.parametrize("weighting", [l_simple, functools.partial(edm, sigma_data=0.7)], ids=["simple", "edm"])
def test_denoising_loss_of_exact_denoiser_is_the_mmse(weighting):
    """For x_0 ~ N(0, s^2 I), E||eps_hat - eps||^2 per dim = Var(eps | x_t) = alpha^2 s^2 / (alpha^2 s^2 + sigma^2)."""
    s, n, process = 0.7, 20000, VPSDE()
    data = Gaussian(torch.zeros(DIM), s**2 * torch.eye(DIM))
    for t_value in [0.05, 0.3, 0.7]:
        t = torch.full((n,), t_value, dtype=torch.float64)
        x0, noise = data.sample(n, gen(1)), torch.randn(n, DIM, generator=gen(2), dtype=torch.float64)
        loss, logsnr = denoising_loss(data.denoiser(process), x0, t, noise, weighting, process)
        alpha, sigma = process.alpha(t[:1]), process.sigma(t[:1])
        mmse = alpha**2 * s**2 / (alpha**2 * s**2 + sigma**2)
        expected = weighting(t[:1], process) * mmse
        assert abs(float(loss.mean() / expected) - 1) < 0.03, t_value
        assert torch.allclose(logsnr, process.logsnr(t))


def test_denoising_loss_passes_labels_and_trains_in_float32():
    process = VPSDE()
    den = Denoiser(TinyMLP(num_classes=3).float(), VPrediction(), process)
    x0, noise = torch.randn(16, DIM), torch.randn(16, DIM)
    t, labels = torch.rand(16) * 0.9 + 0.05, torch.randint(0, 4, (16,))
    loss, logsnr = denoising_loss(den, x0, t, noise, l_simple, process, labels)
    assert loss.dtype == torch.float32 and loss.shape == (16,) and logsnr.shape == (16,)
    x_t = noised(process, x0, t, noise)
    snr = process.logsnr(t).exp()
    assert torch.allclose(loss, snr * ((den(x_t, t, labels) - x0) ** 2).mean(1), rtol=1e-5)
    assert not torch.allclose(loss, denoising_loss(den, x0, t, noise, l_simple, process)[0], rtol=1e-3)
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in den.network.parameters())


def test_denoising_loss_on_images_means_over_all_non_batch_dims():
    process = ddpm(T=100)
    x0 = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 10, 50, 100])
    D = lambda x, t: torch.zeros_like(x)  # noqa: E731
    loss, _ = denoising_loss(D, x0, t, noise, l_simple, process)
    assert torch.allclose(loss, process.logsnr(t).exp() * (x0**2).mean((1, 2, 3)))


# ---------------------------------------------------------------- discrete VLB


def _vlb_setup(T=50, schedule=None):
    process = ddpm(T=T) if schedule is None else ddpm(schedule, T=T)
    g = gen(3)
    x0 = torch.randint(0, 256, (32, DIM), generator=g).double() * 2 / 255 - 1
    x0[0, :2] = torch.tensor([-1.0, 1.0])
    noise = torch.randn(32, DIM, generator=g, dtype=torch.float64)
    t = torch.randint(1, T + 1, (32,), generator=g)
    return process, x0, noise, t


def _fixed_denoiser(process, x0, t, noise, D, v):
    """A learned-variance Denoiser whose network makes D and v exactly the given tensors."""
    den = Denoiser(TinyMLP(), EpsPrediction(), process, learned_variance=True)
    F = den.target(noised(process, x0, t, noise), t, D)
    den.network = FixedOutput(torch.cat([F, v], dim=1).detach())
    return den


def _posterior(process, t):
    """beta_t, beta~_t and the posterior coefficients from the beta table directly (Ho et al. 2020, eq. 7)."""
    betas = process.betas
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    b, ab, abp = betas[t - 1], abar[t - 1], abar_prev[t - 1]
    return b, (1 - abp) / (1 - ab) * b, abp.sqrt() * b / (1 - ab), (1 - b).sqrt() * (1 - abp) / (1 - ab), ab


def test_vlb_kl_vanishes_at_the_true_posterior():
    process, x0, noise, t = _vlb_setup()
    t = t.clamp(min=2)
    # D = x_0 and v = -1, i.e. log var = log beta~_t: p(x_{t-1} | x_t) = q(x_{t-1} | x_t, x_0)
    den = _fixed_denoiser(process, x0, t, noise, x0, -torch.ones_like(x0))
    assert ddpm_vlb_terms(den, process, x0, t, noise).abs().max() < 1e-10
    # v = +1 gives variance beta_t: KL = (beta~/beta - 1 - log(beta~/beta)) / 2
    den = _fixed_denoiser(process, x0, t, noise, x0, torch.ones_like(x0))
    beta, beta_tilde, *_ = _posterior(process, t)
    r = beta_tilde / beta
    assert torch.allclose(ddpm_vlb_terms(den, process, x0, t, noise), DIM * 0.5 * (r - 1 - r.log()), rtol=1e-8)
    # the interpolation v' = (v + 1) / 2 on log variances: v = 0 is the geometric mean
    den = _fixed_denoiser(process, x0, t, noise, x0, torch.zeros_like(x0))
    r = (beta_tilde / beta).sqrt()
    assert torch.allclose(ddpm_vlb_terms(den, process, x0, t, noise), DIM * 0.5 * (r - 1 - r.log()), rtol=1e-8)


def test_vlb_kl_with_fixed_variance_matches_ho_eps_form():
    process, x0, noise, t = _vlb_setup(schedule=cosine_betas)
    t = t.clamp(min=2)
    den = Denoiser(TinyMLP(), EpsPrediction(), process)
    x_t = noised(process, x0, t, noise)
    eps_hat = den.network(x_t, -process.logsnr(t) / 8)  # c_in = 1 on VP with sigma_data = 1
    beta, beta_tilde, c0, ct, abar = _posterior(process, t)
    bt = lambda v: v[:, None]  # noqa: E731
    mu_q = bt(c0) * x0 + bt(ct) * x_t
    mu_theta = (x_t - bt(beta / (1 - abar).sqrt()) * eps_hat) / bt((1 - beta).sqrt())  # Ho et al. eq. 11
    expected = ((mu_q - mu_theta) ** 2 / (2 * bt(beta_tilde))).sum(1)
    terms = ddpm_vlb_terms(den, process, x0, t, noise)
    assert torch.allclose(terms, expected, rtol=1e-6)
    assert (terms > 0).all()
    # a plain denoiser callable (no forward_with_variance) takes the same fixed-variance path
    plain = lambda x, s: den(x, s)  # noqa: E731
    assert torch.allclose(ddpm_vlb_terms(plain, process, x0, t, noise), terms, rtol=1e-12)


def test_vlb_kl_with_learned_variance_matches_torch_distributions():
    process, x0, noise, t = _vlb_setup()
    t = t.clamp(min=2)
    g = gen(6)
    D = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = 2 * torch.rand(x0.shape, generator=g, dtype=torch.float64) - 1
    den = _fixed_denoiser(process, x0, t, noise, D, v)
    beta, beta_tilde, c0, ct, _ = _posterior(process, t)
    x_t = noised(process, x0, t, noise)
    frac = (v + 1) / 2
    std_p = torch.exp(0.5 * (frac * beta.log()[:, None] + (1 - frac) * beta_tilde.log()[:, None]))
    q = torch.distributions.Normal(c0[:, None] * x0 + ct[:, None] * x_t, beta_tilde.sqrt()[:, None].expand_as(x0))
    p = torch.distributions.Normal(c0[:, None] * D + ct[:, None] * x_t, std_p)
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(ddpm_vlb_terms(den, process, x0, t, noise), expected, rtol=1e-8)


def test_decoder_nll_matches_normal_cdfs():
    process, x0, noise, _ = _vlb_setup(T=1000)
    t = torch.ones(len(x0), dtype=torch.int64)
    g = gen(5)
    D = x0 + 0.01 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = 2 * torch.rand(x0.shape, generator=g, dtype=torch.float64) - 1
    den = _fixed_denoiser(process, x0, t, noise, D, v)
    terms = ddpm_vlb_terms(den, process, x0, t, noise)
    # variance at t = 1: v' log beta_1 + (1 - v') log beta~_2 (beta~_1 = 0 is clipped to beta~_2)
    beta1 = float(process.betas[0])
    _, beta_tilde2, *_ = _posterior(process, torch.tensor([2]))
    frac = (v + 1) / 2
    std = torch.exp(0.5 * (frac * math.log(beta1) + (1 - frac) * beta_tilde2.log())).numpy()
    x, m = x0.numpy(), D.numpy()
    upper = torch.tensor(stats.norm.cdf(x + 1 / 255, m, std))
    lower = torch.tensor(stats.norm.cdf(x - 1 / 255, m, std))
    upper[x0 == 1.0], lower[x0 == -1.0] = 1.0, 0.0
    expected = -(upper - lower).log().sum(1)
    assert torch.allclose(terms, expected, rtol=1e-6)


def test_discretized_gaussian_sums_to_one_over_the_256_bins():
    bins = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    for mean, log_var in [(0.3, -4.0), (-0.999, -9.0), (1.5, 0.0), (0.0, -20.0)]:
        nll = discretized_gaussian_nll(bins, torch.full_like(bins, mean), torch.full_like(bins, log_var))
        assert torch.isfinite(nll).all()
        assert abs(float((-nll).exp().sum()) - 1) < 1e-9


def test_hybrid_loss_value_and_stop_gradient_on_the_mean():
    process, x0, noise, t = _vlb_setup()
    den = Denoiser(TinyMLP(learned_variance=True), EpsPrediction(), process, learned_variance=True)
    total, logsnr = hybrid_loss(den, x0, t, noise, l_simple, process)
    simple, _ = denoising_loss(den, x0, t, noise, l_simple, process)
    vlb = ddpm_vlb_terms(den, process, x0, t, noise)
    assert torch.allclose(total, simple + 0.001 * process.T * vlb / (DIM * math.log(2)), rtol=1e-12)
    assert torch.allclose(logsnr, process.logsnr(t))

    def grads(loss):
        den.zero_grad()
        loss.mean().backward()
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in den.network.named_parameters()}

    g_hybrid = grads(hybrid_loss(den, x0, t, noise, l_simple, process)[0])
    g_simple = grads(denoising_loss(den, x0, t, noise, l_simple, process)[0])
    g_vlb = grads(vlb_loss(den, x0, t, noise, None, process)[0])
    for name in ("mean_head.weight", "mean_head.bias"):
        assert torch.allclose(g_hybrid[name], g_simple[name], rtol=1e-10, atol=1e-14), name
        assert g_vlb[name].abs().max() > 1e-6, name  # L_vlb alone does train the mean
    assert g_hybrid["var_head.weight"].abs().max() > 1e-8  # the variance learns only through L_vlb
    assert g_simple["var_head.weight"].abs().max() == 0


def test_vlb_loss_is_T_times_term_in_bits_per_dim():
    process, x0, noise, t = _vlb_setup()
    den = Denoiser(TinyMLP(learned_variance=True), EpsPrediction(), process, learned_variance=True)
    loss, _ = vlb_loss(den, x0, t, noise, None, process)
    assert torch.allclose(loss, process.T * ddpm_vlb_terms(den, process, x0, t, noise) / (DIM * math.log(2)), rtol=1e-12)


def test_vlb_bad_inputs_raise():
    process, x0, noise, t = _vlb_setup(T=50)
    den = Denoiser(TinyMLP(), EpsPrediction(), process)
    with pytest.raises(ValueError, match=r"integers in 1..T=50, got values in \[0"):
        ddpm_vlb_terms(den, process, x0, torch.zeros_like(t), noise)
    with pytest.raises(ValueError, match=r"\[1.0, 51.0\]"):
        ddpm_vlb_terms(den, process, x0, t.clamp(min=1) * 0 + torch.tensor([1] * 31 + [51]), noise)
    with pytest.raises(ValueError, match="integers in 1..T=50"):
        ddpm_vlb_terms(den, process, x0, t + 0.5, noise)
    with pytest.raises(ValueError, match="DiscreteDDPM"):
        ddpm_vlb_terms(den, VPSDE(), x0, torch.full((32,), 0.5), noise)
    with pytest.raises(ValueError, match="lambda_vlb=-1"):
        hybrid_loss(den, x0, t, noise, l_simple, process, lambda_vlb=-1)
