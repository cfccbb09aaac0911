"""Weightings against each paper's own formula, invariance to the prediction target, and effective weightings."""

import functools
import math

import pytest
import torch
from torch import nn

from helpers import FixedOutput
from lightning_diffusion.core import weightings as W
from lightning_diffusion.core.losses import denoising_loss
from lightning_diffusion.core.noise_levels import log_normal, uniform_discrete, uniform_time
from lightning_diffusion.core.denoiser import Denoiser, eps_from_denoiser
from lightning_diffusion.core.parameterizations import (EDMPreconditioning, EpsPrediction, FlowVelocity,
                                                        ScorePrediction, VPrediction, X0Prediction)
from lightning_diffusion.core.processes import (EDMProcess, RectifiedFlow, SubVPSDE, VESDE, VPSDE, cosine_betas, ddpm,
                                           expand_to)

B, DIM = 64, 4


class TinyMLP(nn.Module):
    """network(x, c_noise, labels) -> output, random weights, float64 so comparisons hold to 1e-10."""

    def __init__(self, dim: int = DIM, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim)).double()

    def forward(self, x, c_noise, labels=None):
        return self.net(torch.cat([x, c_noise[:, None]], dim=1))


def batch(process, discrete=False):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(B, DIM, generator=g, dtype=torch.float64)
    noise = torch.randn(B, DIM, generator=g, dtype=torch.float64)
    u = torch.rand(B, generator=g, dtype=torch.float64)
    t = uniform_discrete(u, process) if discrete else uniform_time(u, process)
    return x0, t, noise


def network_output(den, x0, t, noise):
    """The raw network output F(c_in x_t, c_noise) with c_in, c_noise computed here by hand, and x_t."""
    p, t64 = den.process, t.to(torch.float64)
    alpha, sigma = p.alpha(t64), p.sigma(t64)
    x_t = expand_to(alpha, x0) * x0 + expand_to(sigma, x0) * noise
    sd = den.parameterization.sigma_data
    c_in = 1 / (sigma**2 + alpha**2 * sd**2).sqrt()
    c_noise = -torch.log(alpha**2 / sigma**2) / 8
    return den.network(expand_to(c_in, x0) * x_t, c_noise), x_t, alpha, sigma


def ours(den, weighting, x0, t, noise):
    return denoising_loss(den, x0, t, noise, weighting, den.process)[0]


def msum(e):
    return (e**2).mean(1)


# ---------------------------------------------------------------- each weighting in its paper's own space


def test_l_simple_is_ho_eps_mse():
    den = Denoiser(TinyMLP(), EpsPrediction(), ddpm(T=1000))
    x0, t, noise = batch(den.process, discrete=True)
    eps_theta, *_ = network_output(den, x0, t, noise)
    assert torch.allclose(ours(den, W.l_simple, x0, t, noise), msum(noise - eps_theta), rtol=1e-6, atol=0)


@pytest.mark.parametrize("k, gamma", [(1.0, 1.0), (1.0, 0.5), (0.5, 2.0)])
def test_p2_is_choi_weighted_eps_mse(k, gamma):
    den = Denoiser(TinyMLP(), EpsPrediction(), ddpm(cosine_betas, T=1000))
    x0, t, noise = batch(den.process, discrete=True)
    eps_theta, _, alpha, sigma = network_output(den, x0, t, noise)
    snr = alpha**2 / sigma**2
    paper = msum(noise - eps_theta) / (k + snr) ** gamma
    assert torch.allclose(ours(den, functools.partial(W.p2, k=k, gamma=gamma), x0, t, noise), paper, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["snr", "truncated_snr", "snr_plus_one", "x0_mse"])
def test_salimans_ho_weightings_on_x0_error(name):
    den = Denoiser(TinyMLP(), X0Prediction(), VPSDE())
    x0, t, noise = batch(den.process)
    x_hat, _, alpha, sigma = network_output(den, x0, t, noise)
    snr = alpha**2 / sigma**2
    lam = {"snr": snr, "truncated_snr": snr.clamp(min=1), "snr_plus_one": snr + 1, "x0_mse": torch.ones_like(snr)}[name]
    assert torch.allclose(ours(den, getattr(W, name), x0, t, noise), lam * msum(x0 - x_hat), rtol=1e-6, atol=0)


def test_snr_plus_one_is_v_mse_on_vp():
    den = Denoiser(TinyMLP(), VPrediction(), VPSDE())
    x0, t, noise = batch(den.process)
    v_hat, _, alpha, sigma = network_output(den, x0, t, noise)
    v = expand_to(alpha, x0) * noise - expand_to(sigma, x0) * x0
    assert torch.allclose(ours(den, W.snr_plus_one, x0, t, noise), msum(v_hat - v), rtol=1e-6, atol=0)


@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_is_hang_on_x0_and_eps_errors(gamma):
    # x_0-prediction: min(snr, gamma) ||x_0 - x_hat||^2 (Hang et al. 2023, eq. 8)
    den = Denoiser(TinyMLP(), X0Prediction(), VPSDE())
    x0, t, noise = batch(den.process)
    x_hat, _, alpha, sigma = network_output(den, x0, t, noise)
    snr = alpha**2 / sigma**2
    w = functools.partial(W.min_snr, gamma=gamma)
    assert torch.allclose(ours(den, w, x0, t, noise), snr.clamp(max=gamma) * msum(x0 - x_hat), rtol=1e-6, atol=0)
    # eps-prediction: min(snr, gamma) / snr ||eps - eps_hat||^2
    den = Denoiser(TinyMLP(), EpsPrediction(), VPSDE())
    eps_hat, _, alpha, sigma = network_output(den, x0, t, noise)
    snr = alpha**2 / sigma**2
    paper = snr.clamp(max=gamma) / snr * msum(noise - eps_hat)
    assert torch.allclose(ours(den, w, x0, t, noise), paper, rtol=1e-6, atol=0)


@pytest.mark.parametrize("process", [VPSDE(), ddpm(cosine_betas, T=1000)], ids=["vpsde", "ddpm-cosine"])
def test_min_snr_with_v_prediction(process):
    """min(snr, gamma) / (snr + 1) ||v_hat - v||^2 on VP (the diffusers bug #5654: not min(snr, gamma) / snr)."""
    den = Denoiser(TinyMLP(), VPrediction(), process)
    x0, t, noise = batch(process, discrete=hasattr(process, "T"))
    v_hat, _, alpha, sigma = network_output(den, x0, t, noise)
    snr = alpha**2 / sigma**2
    v = expand_to(alpha, x0) * noise - expand_to(sigma, x0) * x0
    loss = ours(den, W.min_snr, x0, t, noise)
    assert torch.allclose(loss, snr.clamp(max=5.0) / (snr + 1) * msum(v_hat - v), rtol=1e-6, atol=0)
    wrong = snr.clamp(max=5.0) / snr * msum(v_hat - v)
    assert ((loss - wrong).abs() / loss).max() > 0.5


def test_ncsn_sigma2_is_song_ermon_score_loss():
    den = Denoiser(TinyMLP(), ScorePrediction(divide_by_sigma=True), VESDE(sigma_min=0.01, sigma_max=50.0))
    x0, t, noise = batch(den.process)
    F, x_t, _, sigma = network_output(den, x0, t, noise)
    s = expand_to(sigma, x0)
    score_theta = F / s  # NCSNv2: s_theta(x, sigma) = F(x) / sigma
    paper = sigma**2 * msum(score_theta + (x_t - x0) / s**2)  # lambda(sigma) = sigma^2, eq. 6
    assert torch.allclose(ours(den, W.ncsn_sigma2, x0, t, noise), paper, rtol=1e-6, atol=0)


@pytest.mark.parametrize("process", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_likelihood_is_g2_on_score_error(process):
    den = Denoiser(TinyMLP(), ScorePrediction(divide_by_sigma=False), process)
    x0, t, noise = batch(process)
    score_theta, x_t, alpha, sigma = network_output(den, x0, t, noise)  # c_out = sigma^2 / alpha: F is the score
    target = -(x_t - expand_to(alpha, x0) * x0) / expand_to(sigma, x0) ** 2
    _, g2 = process.sde(t)
    assert torch.allclose(ours(den, W.likelihood, x0, t, noise), g2 * msum(score_theta - target), rtol=1e-6, atol=0)
    if isinstance(process, VPSDE) and not isinstance(process, SubVPSDE):
        beta = process.beta_min + t * (process.beta_max - process.beta_min)  # g^2 = beta(t) by hand
        assert torch.allclose(g2, beta, rtol=1e-10)


@pytest.mark.parametrize("process", [EDMProcess(), VPSDE()], ids=["edm", "vp-scaled"])
def test_edm_weighting_on_d_error(process):
    sd = 0.5
    den = Denoiser(TinyMLP(), EDMPreconditioning(sigma_data=sd), process)
    x0, t, noise = batch(process)
    alpha, sigma = process.alpha(t), process.sigma(t)
    x_t = expand_to(alpha, x0) * x0 + expand_to(sigma, x0) * noise
    # EDM Table 1 by hand, in the scaled space x~ = x / alpha, s = sigma / alpha
    s, xs = sigma / alpha, x_t / expand_to(alpha, x0)
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (s**2 + sd**2).sqrt(), s.log() / 4
    D = expand_to(c_skip, x0) * xs + expand_to(c_out, x0) * den.network(expand_to(c_in, x0) * xs, c_noise)
    lam = (s**2 + sd**2) / (s * sd) ** 2
    assert torch.allclose(ours(den, functools.partial(W.edm, sigma_data=sd), x0, t, noise), lam * msum(D - x0),
                          rtol=1e-6, atol=0)


@pytest.mark.parametrize("b", [-2.0, 1.0])
@pytest.mark.parametrize("process", [VPSDE(), RectifiedFlow()], ids=["vp", "flow"])
def test_sigmoid_is_kingma_gao(process, b):
    den = Denoiser(TinyMLP(), EpsPrediction(), process)
    x0, t, noise = batch(process)
    eps_hat, _, alpha, sigma = network_output(den, x0, t, noise)
    lam = torch.log(alpha**2 / sigma**2)
    # d lambda / dt by hand: VP -beta(t) / sigma^2; flow lambda = 2 log((1 - t) / t) -> -2 / (t (1 - t))
    if isinstance(process, VPSDE):
        dlam = -(process.beta_min + t * (process.beta_max - process.beta_min)) / sigma**2
    else:
        dlam = -2 / (t * (1 - t))
    # Kingma & Gao eq. 7 without the 1/2: -d lambda/dt w(lambda) ||eps_hat - eps||^2, w = sigmoid(b - lambda)
    paper = -dlam * torch.sigmoid(b - lam) * msum(eps_hat - noise)
    w = functools.partial(W.sigmoid, b=b)
    assert torch.allclose(ours(den, w, x0, t, noise), paper, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- invariance to the prediction target

WEIGHTINGS = [W.l_simple, W.snr, W.x0_mse, W.truncated_snr, W.snr_plus_one, W.p2, W.min_snr, W.ncsn_sigma2,
              W.likelihood, W.edm, W.sigmoid]
TARGETS = [EpsPrediction(), X0Prediction(), VPrediction(), EDMPreconditioning(), FlowVelocity()]
PROCESSES = {"vp": VPSDE(), "ve": VESDE(), "edm": EDMProcess(), "flow": RectifiedFlow(t_max=0.999)}


@pytest.mark.parametrize("pname", list(PROCESSES))
@pytest.mark.parametrize("target", TARGETS, ids=lambda p: type(p).__name__)
def test_loss_is_weighted_eps_mse_whatever_the_target(target, pname):
    process = PROCESSES[pname]
    den = Denoiser(TinyMLP(), target, process)
    x0, t, noise = batch(process)
    x_t = expand_to(process.alpha(t), x0) * x0 + expand_to(process.sigma(t), x0) * noise
    D = den(x_t, t)
    eps_hat = eps_from_denoiser(x_t, D, process.alpha(t), process.sigma(t))
    # the same D produced by an eps-prediction network must give the same loss
    den_eps = Denoiser(TinyMLP(), EpsPrediction(), process)
    den_eps.network = FixedOutput(Denoiser(TinyMLP(), EpsPrediction(), process).target(x_t, t, D).detach())
    for w in WEIGHTINGS:
        loss = ours(den, w, x0, t, noise)
        assert torch.allclose(loss, w(t, process) * msum(eps_hat - noise), rtol=1e-6, atol=0), w.__name__
        assert torch.allclose(loss, ours(den_eps, w, x0, t, noise), rtol=1e-6, atol=0), w.__name__


# ---------------------------------------------------------------- EDM2 uncertainty weighting


def test_uncertainty_weighting_starts_neutral_and_learns_log_loss():
    uw = UncertaintyWeighting = W.UncertaintyWeighting(channels=64)
    logsnr = torch.linspace(-10, 10, 128)
    loss = 0.3 + torch.sigmoid(-logsnr) * 2.0  # a per-noise-level loss magnitude
    assert torch.equal(uw(loss, logsnr), loss)  # u = 0 at init
    opt = torch.optim.Adam(uw.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        uw(loss, logsnr).mean().backward()
        opt.step()
    # argmin_u L / e^u + u = log L
    assert (uw.logvar(logsnr) - loss.log()).abs().max() < 0.05
    assert isinstance(UncertaintyWeighting, torch.nn.Module)


# ---------------------------------------------------------------- effective weighting, same objective

GRID = torch.linspace(-7, 9, 400)


def test_effective_weighting_is_density_times_weight():
    p = VPSDE()
    density, w, product = W.effective_weighting(W.likelihood, uniform_time, p, GRID)
    assert torch.allclose(product, density * w)
    # uniform t with the likelihood weighting: -dlambda/dt / ((t_max - t_min) |dlambda/dt|) is flat
    assert torch.allclose(product, torch.full_like(product, 1 / (p.t_max - p.t_min)), rtol=1e-6)


@pytest.mark.parametrize("a, b", [
    ((W.l_simple, uniform_time), (W.snr, uniform_time)),
    ((W.likelihood, uniform_time, VPSDE()), (W.likelihood, uniform_time, VESDE())),  # the ELBO ignores the schedule
    ((W.sigmoid, uniform_time, VPSDE()), (W.sigmoid, uniform_time, RectifiedFlow())),  # Kingma & Gao's point
    ((W.edm, log_normal, EDMProcess()), (W.edm, log_normal, VPSDE())),
    ((W.l_simple, uniform_time), (W.l_simple, lambda u, p: uniform_time(u, p))),  # numerical density path
    ((functools.partial(W.p2, gamma=0.0), uniform_time), (W.l_simple, uniform_time)),
], ids=["simple-vs-snr", "elbo-vp-ve", "sigmoid-vp-flow", "edm-edm-vp", "numerical", "p2-gamma0"])
def test_same_objective_flagged(a, b):
    assert W.same_objective(a, b, VPSDE(), GRID, rtol=1e-2)


@pytest.mark.parametrize("a, b", [
    ((W.l_simple, uniform_time), (W.min_snr, uniform_time)),
    ((W.edm, log_normal), (W.l_simple, log_normal)),
    ((W.likelihood, uniform_time), (W.l_simple, uniform_time)),
    ((W.sigmoid, uniform_time), (functools.partial(W.sigmoid, b=-1.0), uniform_time)),
    ((W.edm, log_normal), (W.edm, functools.partial(log_normal, P_mean=-1.0))),
    ((W.l_simple, uniform_time, VPSDE()), (W.l_simple, uniform_time, VESDE())),
], ids=["simple-vs-minsnr", "edm-vs-simple", "elbo-vs-simple", "sigmoid-bias", "lognormal-mean", "vp-vs-ve"])
def test_different_objectives_not_flagged(a, b):
    assert not W.same_objective(a, b, VPSDE(), GRID, rtol=1e-2)


# ---------------------------------------------------------------- bad parameters


@pytest.mark.parametrize("fn, kwargs, match", [
    (W.p2, {"gamma": -1.0}, "gamma=-1.0"),
    (W.p2, {"k": 0.0}, "k=0.0"),
    (W.min_snr, {"gamma": 0.0}, "gamma=0.0"),
    (W.min_snr, {"gamma": -5.0}, "gamma=-5.0"),
    (W.edm, {"sigma_data": 0.0}, "sigma_data=0.0"),
])
def test_bad_params_raise(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(torch.tensor([0.5]), VPSDE(), **kwargs)
    with pytest.raises(ValueError, match="channels=0"):
        W.UncertaintyWeighting(channels=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        W.effective_weighting(W.l_simple, uniform_time, VPSDE(), torch.tensor([1.0, 0.0]))


def test_weightings_return_float64_per_sample_and_are_finite():
    t = torch.linspace(0.01, 0.99, 7, dtype=torch.float32)
    for w in WEIGHTINGS:
        out = w(t, VPSDE())
        assert out.shape == (7,) and out.dtype == torch.float64 and torch.isfinite(out).all() and (out > 0).all()
    assert math.isclose(float(W.edm(torch.tensor([1.0]), EDMProcess(), sigma_data=1.0)), 2.0)


def test_velocity_mse_is_flow_matching_on_rectified_flow():
    """w ||eps_hat - eps||^2 equals ||v_hat - v||^2 with v = eps - x_0 (Liu et al. 2023) for any prediction."""
    from lightning_diffusion.core.processes import RectifiedFlow
    from lightning_diffusion.core.weightings import velocity_mse

    process = RectifiedFlow()
    g = torch.Generator().manual_seed(3)
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=torch.float64)
    x0, eps, D = (torch.randn(64, 3, generator=g, dtype=torch.float64) for _ in range(3))
    x = (1 - t)[:, None] * x0 + t[:, None] * eps
    eps_hat = (x - (1 - t)[:, None] * D) / t[:, None]
    v_hat, v = eps_hat - D, eps - x0
    torch.testing.assert_close(velocity_mse(t, process) * ((eps_hat - eps) ** 2).sum(1), ((v_hat - v) ** 2).sum(1))
    torch.testing.assert_close(velocity_mse(t, process), 1 / (1 - t) ** 2)
