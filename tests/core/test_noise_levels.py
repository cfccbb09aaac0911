"""Noise-level draws and inverse CDFs, the importance sampler, and induced densities over logsnr."""

import functools
import math

from functools import partial

import pytest
import torch
from scipy import stats

from lightning_diffusion.core.noise_levels import (AdaptiveDraw, LossSecondMomentDraw, ladder, log_normal,
                                              logsnr_density, spread_logsnr_density, stratified_draws,
                                              uniform_discrete, uniform_draws, uniform_time)
from lightning_diffusion.core.processes import EDMProcess, VESDE, VPSDE, cosine_betas, ddpm, linear_betas


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- draws


def test_uniform_draws_seeded_in_unit_interval():
    u = uniform_draws(1000, gen(3))
    assert u.shape == (1000,) and (u >= 0).all() and (u < 1).all()
    assert torch.equal(u, uniform_draws(1000, gen(3)))
    assert abs(float(u.mean()) - 0.5) < 0.03


@pytest.mark.parametrize("n, world_size", [(8, 4), (5, 3), (16, 1)])
def test_stratified_draws_cover_each_stratum_once_across_ranks(n, world_size):
    N = n * world_size
    draws = [stratified_draws(n, rank, world_size, gen(rank)) for rank in range(world_size)]
    u = torch.cat(draws)
    assert (u >= 0).all() and (u < 1).all()
    assert torch.equal((u * N).floor().long().sort().values, torch.arange(N))
    # each rank every world_size-th stratum: its share spans [0, 1), so its loss is that of the whole range
    for rank, d in enumerate(draws):
        assert torch.equal((d * N).floor().long(), torch.arange(rank, N, world_size))
    # seeded
    assert torch.equal(draws[0], stratified_draws(n, 0, world_size, gen(0)))


def test_stratified_draws_reduce_variance_of_batch_mean():
    g = gen(0)
    iid = torch.stack([uniform_draws(16, g).mean() for _ in range(300)])
    strat = torch.stack([stratified_draws(16, 0, 1, g).mean() for _ in range(300)])
    assert abs(float(strat.mean()) - 0.5) < 0.01
    assert strat.std() < 0.1 * iid.std()  # theory: 1/16 of the iid std


# ---------------------------------------------------------------- inverse CDFs


def test_uniform_time_maps_unit_interval_to_range():
    p = VPSDE(t_min=1e-3)
    t = uniform_time(torch.tensor([0.0, 0.5, 1.0]), p)
    assert torch.allclose(t, torch.tensor([1e-3, 0.5005, 1.0], dtype=torch.float64))


def test_uniform_discrete_is_uniform_on_1_to_T():
    p = ddpm(T=10)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    t = uniform_discrete(u, p)
    assert t.dtype == torch.int64
    assert torch.equal(torch.bincount(t, minlength=11)[1:], torch.full((10,), 100))
    assert int(uniform_discrete(torch.tensor([0.0]), p)) == 1
    assert int(uniform_discrete(torch.tensor([1 - 1e-12]), p)) == 10


def test_log_normal_on_edm_process_is_lognormal():
    P_mean, P_std = -1.2, 1.2
    t = log_normal(uniform_draws(20000, gen(1)), EDMProcess(), P_mean, P_std)
    assert stats.kstest(t.log().numpy(), "norm", args=(P_mean, P_std)).pvalue > 0.01
    assert not stats.kstest(t.log().numpy(), "norm", args=(P_mean + 0.1, P_std)).pvalue > 0.01
    # the median maps exactly to sigma = exp(P_mean)
    assert math.isclose(float(log_normal(torch.tensor([0.5]), EDMProcess(), P_mean, P_std)), math.exp(P_mean), rel_tol=1e-9)


def test_log_normal_on_vp_hits_sigma_tilde_and_clips():
    p = VPSDE()
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    t = log_normal(u, p, P_mean=0.0, P_std=1.0)
    expected = torch.exp(torch.tensor(stats.norm.ppf(u.numpy())))
    assert torch.allclose(p.sigma_tilde(t), expected, rtol=1e-8)
    ends = log_normal(torch.tensor([0.0, 1 - 1e-16]), p, P_mean=0.0, P_std=10.0)
    assert torch.allclose(ends, torch.tensor([p.t_min, p.t_max], dtype=torch.float64), atol=1e-12)


def test_ladder_is_ncsn_geometric_sigmas():
    p = VESDE(sigma_min=0.01, sigma_max=1.0, t_min=0.0)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    t = ladder(u, p, levels=10)
    sigmas = p.sigma(t.unique())
    assert len(sigmas) == 10
    assert torch.allclose(sigmas[1:] / sigmas[:-1], torch.full((9,), 100 ** (1 / 9), dtype=torch.float64))
    assert torch.allclose(sigmas[[0, -1]], torch.tensor([0.01, 1.0], dtype=torch.float64))
    assert torch.equal(torch.unique(t, return_counts=True)[1], torch.full((10,), 100))
    explicit = ladder(u, p, levels=[0.2, 0.7])
    assert set(explicit.tolist()) == {0.2, 0.7}


# ---------------------------------------------------------------- importance sampling


def test_second_moment_sampler_uniform_until_warm_then_proportional():
    T, H = 20, 4
    proc = ddpm(T=T)
    s = LossSecondMomentDraw(T, history=H, uniform_prob=0.0)
    u = uniform_draws(500, gen(2))
    assert torch.equal(s(u, proc), uniform_discrete(u, proc))
    assert torch.equal(s.reweight(s(u, proc)), torch.ones(500, dtype=torch.float64))
    # losses with E[L_t^2] = t^2 (alternating +-t) for all but the last t: still uniform
    for _ in range(H):
        ts = torch.arange(1, T)
        s.update(ts, ts.double() * torch.where(ts % 2 == 0, 1.0, -1.0))
    assert not s.warm and torch.equal(s(u, proc), uniform_discrete(u, proc))
    for _ in range(H):
        s.update(torch.tensor([T]), torch.tensor([float(T)]))
    assert s.warm
    expected = torch.arange(1, T + 1, dtype=torch.float64)
    assert torch.allclose(s.probs(), expected / expected.sum())
    # sampled frequencies follow p_t
    draws = s(uniform_draws(100000, gen(3)), proc)
    freq = torch.bincount(draws, minlength=T + 1)[1:].double() / 100000
    assert (freq - s.probs()).abs().max() < 0.005


def test_second_moment_reweight_keeps_objective_unbiased():
    T = 50
    s = LossSecondMomentDraw(T, history=3)
    losses = torch.rand(T, generator=gen(4), dtype=torch.float64) * 10
    for _ in range(3):
        s.update(torch.arange(1, T + 1), losses)
    p = s.probs()
    ts = torch.arange(1, T + 1)
    # exact: sum_t p_t reweight(t) L_t = mean_t L_t
    assert torch.allclose((p * s.reweight(ts) * losses).sum(), losses.mean(), rtol=1e-12)
    # Monte Carlo through the sampler
    t = s(uniform_draws(200000, gen(5)), ddpm(T=T))
    mc = (s.reweight(t) * losses[t - 1]).mean()
    assert abs(float(mc / losses.mean()) - 1) < 0.01


def test_second_moment_ring_buffer_and_state_dict():
    s = LossSecondMomentDraw(3, history=2, uniform_prob=0.0)
    s.update(torch.tensor([1, 1, 1, 2, 2, 3, 3]), torch.tensor([100.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]))
    assert torch.allclose(s.probs(), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 6)  # the 100 fell out
    t = LossSecondMomentDraw(3, history=2, uniform_prob=0.0)
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.probs(), s.probs()) and t.warm
    with pytest.raises(ValueError, match="expected"):
        LossSecondMomentDraw(4, history=2).load_state_dict(s.state_dict())


def test_only_the_importance_sampled_draw_is_adaptive():
    """The training module's one capability test: the loss-second-moment draw is an AdaptiveDraw, plain draws and
    Hydra partials of them are not (they are never asked to update or reweight)."""
    assert isinstance(LossSecondMomentDraw(10), AdaptiveDraw)
    for draw in (uniform_time, uniform_discrete, log_normal, ladder, partial(log_normal, P_mean=0.0)):
        assert not isinstance(draw, AdaptiveDraw)


# ---------------------------------------------------------------- densities over logsnr


def _histogram_density(lam: torch.Tensor, edges: torch.Tensor):
    counts = torch.histogram(lam, bins=edges).hist
    return counts / len(lam) / edges.diff(), (edges[1:] + edges[:-1]) / 2


def _max_z(hist, density, n, edges):
    """Largest |observed - expected| count per bin in Poisson standard deviations."""
    expected = density * n * edges.diff()
    return float(((hist * n * edges.diff() - expected).abs() / expected.sqrt()).max())


@pytest.mark.parametrize("process", [VPSDE(), ddpm(cosine_betas, T=1000), VESDE()], ids=["vp", "ddpm-cos", "ve"])
def test_uniform_time_density_matches_histogram(process):
    lam = process.logsnr(uniform_time(uniform_draws(400000, gen(6)), process))
    edges = torch.linspace(-6, 8, 29, dtype=torch.float64)
    hist, centres = _histogram_density(lam, edges)
    fine = torch.linspace(-6, 8, 28 * 40 + 1, dtype=torch.float64)[:-1] + 0.5 * 14 / (28 * 40)
    analytic = logsnr_density(uniform_time, process, fine).reshape(28, 40).mean(1)  # cell average
    assert _max_z(hist, analytic, len(lam), edges) < 5
    assert ((hist - analytic).abs() / analytic).max() < 0.1
    # integrates to the probability of the range
    full = torch.linspace(float(lam.min()), float(lam.max()), 4000, dtype=torch.float64)
    assert abs(float(torch.trapezoid(logsnr_density(uniform_time, process, full), full)) - 1) < 1e-2


@pytest.mark.parametrize("process", [EDMProcess(), VPSDE()], ids=["edm", "vp"])
def test_log_normal_density_matches_histogram_and_closed_form(process):
    P_mean, P_std = -1.2, 1.2
    sampler = functools.partial(log_normal, P_mean=P_mean, P_std=P_std)
    lam = process.logsnr(sampler(uniform_draws(100000, gen(7)), process))
    edges = torch.linspace(-6, 8, 29, dtype=torch.float64)
    hist, centres = _histogram_density(lam, edges)
    analytic = logsnr_density(sampler, process, centres)
    mask = analytic > 0.01
    assert _max_z(hist, analytic, len(lam), edges) < 5
    assert ((hist - analytic).abs()[mask] / analytic[mask]).max() < 0.1
    # ln sigma~ = -lambda / 2 ~ N(P_mean, P_std^2)
    closed = torch.tensor(stats.norm.pdf(-centres.numpy() / 2, P_mean, P_std) / 2)
    assert torch.allclose(analytic, closed, rtol=1e-10)


def test_numerical_density_matches_analytic_and_handles_point_masses():
    p = VPSDE()
    grid = torch.linspace(-8, 10, 300, dtype=torch.float64)
    numeric = logsnr_density(lambda u, proc: uniform_time(u, proc), p, grid)
    assert ((numeric - logsnr_density(uniform_time, p, grid)).abs() / logsnr_density(uniform_time, p, grid)).max() < 2e-3
    # a ladder of 5 levels: five spikes of mass 1/5
    ve = VESDE(t_min=0.0)
    grid = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    dens = logsnr_density(functools.partial(ladder, levels=5), ve, grid)
    mass = dens * 0.01
    assert (mass > 0).sum() == 5 and torch.allclose(mass[mass > 0], torch.full((5,), 0.2, dtype=torch.float64))


@pytest.mark.parametrize("schedule", [linear_betas, cosine_betas], ids=["linear", "cosine"])
def test_spread_discrete_density_is_the_histogram_of_steps_jittered_within_them(schedule):
    """DDPM's U{1..T} draw with each step's mass spread over t in [k-1, k]: the histogram of logsnr(k - U(0, 1))
    (the forward map, not the inverse the function bisects) to Poisson noise, unit mass, and smooth, where the point
    masses' density is a comb of spikes."""
    process = ddpm(schedule, T=1000)
    k = uniform_discrete(uniform_draws(400000, gen(8)), process).to(torch.float64)
    lam = process.logsnr(k - uniform_draws(len(k), gen(9)).to(torch.float64))
    edges = torch.linspace(-8, 8, 33, dtype=torch.float64)
    hist, _ = _histogram_density(lam, edges)
    fine = torch.linspace(-8, 8, 32 * 40 + 1, dtype=torch.float64)[:-1] + 0.5 * 16 / (32 * 40)
    spread = spread_logsnr_density(uniform_discrete, process, fine)
    assert _max_z(hist, spread.reshape(32, 40).mean(1), len(lam), edges) < 5
    full = torch.linspace(float(process.logsnr(torch.tensor(float(process.T)))) - 1, 25, 20001, dtype=torch.float64)
    assert abs(float(torch.trapezoid(spread_logsnr_density(uniform_discrete, process, full), full)) - 1) < 1e-2
    plot_grid = torch.linspace(-6, 6, 301, dtype=torch.float64)
    smooth, spikes = (f(uniform_discrete, process, plot_grid) for f in (spread_logsnr_density, logsnr_density))
    assert (smooth.diff().abs() / smooth[1:]).max() < 0.05  # neighbours within 5%: a curve, not a staircase
    assert (spikes.diff().abs() / spikes[1:].clamp_min(1e-12)).max() > 0.5
    with pytest.raises(ValueError, match="needs a discrete process"):
        spread_logsnr_density(uniform_time, VPSDE(), plot_grid)


# ---------------------------------------------------------------- bad parameters


def test_bad_params_raise():
    u = torch.tensor([0.5])
    with pytest.raises(ValueError, match="P_std=0.0"):
        log_normal(u, EDMProcess(), P_std=0.0)
    with pytest.raises(ValueError, match="P_std=-1"):
        log_normal(u, EDMProcess(), P_std=-1)
    with pytest.raises(ValueError, match="levels=0"):
        ladder(u, VESDE(), levels=0)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        stratified_draws(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="n=0"):
        uniform_draws(0)
    with pytest.raises(ValueError, match="DiscreteDDPM"):
        uniform_discrete(u, VPSDE())
    with pytest.raises(ValueError, match="T=0"):
        LossSecondMomentDraw(0)
    with pytest.raises(ValueError, match="history=0"):
        LossSecondMomentDraw(10, history=0)
    with pytest.raises(ValueError, match=r"has T=10: it needs a DiscreteDDPM with T=10, got DiscreteDDPM\(T=20"):
        LossSecondMomentDraw(10)(u, ddpm(T=20))
    with pytest.raises(ValueError, match=r"t must lie in 1..10"):
        LossSecondMomentDraw(10).update(torch.tensor([0]), torch.tensor([1.0]))
