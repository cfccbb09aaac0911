"""Samplers against exact oracles: PF-ODE end points and convergence orders on a Gaussian, sample quality on
a Gaussian mixture, identities between samplers (DDIM = Euler, DDIM eta=1 = ancestral = DDPM Alg. 2), NFE."""

import math
from functools import partial

import pytest
import torch
from torch import Tensor

from lightning_diffusion.core import samplers as S
from lightning_diffusion.core.denoiser import Denoised
from lightning_diffusion.core.distances import energy_distance
from lightning_diffusion.core.oracles import Gaussian, GaussianMixture
from lightning_diffusion.core.processes import (EDMProcess, RectifiedFlow, VESDE, VPSDE, cosine_betas, ddpm,
                                           linear_betas)


SIGMA_MIN, SIGMA_MAX = 0.002, 80.0

PROCESSES = {
    "vp": lambda: VPSDE(),
    "ve": lambda: VESDE(SIGMA_MIN, SIGMA_MAX, t_min=0.0),
    "edm": lambda: EDMProcess(SIGMA_MIN, SIGMA_MAX),
    "flow": lambda: RectifiedFlow(),
    "ddpm_cosine": lambda: ddpm(cosine_betas, T=1000),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian() -> Gaussian:
    """4-D, full anisotropic covariance (eigenvalues 0.12 .. 3.4), non-zero mean."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.T / 4 + 0.1 * torch.eye(4, dtype=torch.float64)
    return Gaussian(torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64), cov)


def mixture() -> GaussianMixture:
    """8 modes on a circle of radius 1.5, std 0.15."""
    angle = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    return GaussianMixture.isotropic(1.5 * torch.stack([angle.cos(), angle.sin()], 1), 0.15)


def start(n=16, sigma=SIGMA_MAX):
    return sigma * torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ---------------------------------------------------------------- discretisations


def test_karras_sigmas_follow_eq_5():
    s = S.karras_sigmas(10, 0.002, 80.0, rho=7.0)
    assert s.dtype == torch.float64 and s.shape == (11,)
    assert s[0] == pytest.approx(80.0) and s[9] == pytest.approx(0.002) and s[10] == 0
    i = 4
    expect = (80 ** (1 / 7) + i / 9 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i] == pytest.approx(expect, rel=1e-12)
    assert (s[1:] < s[:-1]).all()
    assert S.karras_sigmas(1, 0.1, 1.0).tolist() == [1.0, 0.0]


def test_uniform_and_strided_times():
    vp = VPSDE(t_min=1e-3)
    assert torch.allclose(S.uniform_times(vp, 4), torch.tensor([1.0, 0.75025, 0.5005, 0.25075, 1e-3], dtype=torch.float64))
    assert S.strided_times(1000, 50).tolist() == list(range(1000, -1, -20))
    assert S.strided_times(ddpm(linear_betas, T=10), 3).tolist() == [10.0, 7.0, 3.0, 0.0]
    assert S.strided_times(7, 7).tolist() == list(range(7, -1, -1))
    # NCSN's ladder: a VESDE at evenly spaced times is geometric in sigma
    ve = VESDE(0.01, 1.0, t_min=0.0)
    sig = ve.sigma(S.uniform_times(ve, 4))
    assert torch.allclose(sig, torch.logspace(0, -2, 5, dtype=torch.float64))


@pytest.mark.parametrize("name", PROCESSES)
def test_times_and_sigmas_round_trip(name):
    process = PROCESSES[name]()
    sigmas = S.karras_sigmas(12, SIGMA_MIN, SIGMA_MAX)
    if name == "ve":
        with pytest.raises(ValueError, match="never reaches"):
            S.times_of_sigmas(process, sigmas)
        sigmas = sigmas[:-1]
    times = S.times_of_sigmas(process, sigmas)
    assert (times[1:] < times[:-1]).all()
    assert torch.allclose(S.sigmas_of_times(process, times), sigmas, rtol=1e-10, atol=0)


# ---------------------------------------------------------------- PF-ODE solvers on the Gaussian oracle

ORDERS = {"euler": (S.euler, 0.8), "heun": (S.heun, 1.7), "dpm_solver_pp_2m": (S.dpm_solver_pp_2m, 1.7)}


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("solver", ORDERS)
def test_solver_lands_on_closed_form_at_its_order(name, solver):
    process, g = PROCESSES[name](), gaussian()
    fn, min_order = ORDERS[solver]
    denoiser_tilde = S.scaled_denoiser(g.denoiser(process), process)
    x = start()
    exact = g.pf_ode_solution(x, SIGMA_MAX, 0.0)
    errors = []
    for n in (16, 32, 64):
        out = fn(denoiser_tilde, x, S.karras_sigmas(n, SIGMA_MIN, SIGMA_MAX))
        errors.append(float((out - exact).norm(dim=1).max()))
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(orders) > min_order, (errors, orders)
    assert max(orders) < min_order + 1.2, (errors, orders)  # not a higher order than the method has
    assert errors[-1] < {"euler": 0.5, "heun": 0.03, "dpm_solver_pp_2m": 0.03}[solver]


@pytest.mark.parametrize("name", PROCESSES)
def test_pf_ode_and_ddim_on_process_time_grids(name):
    """pf_ode maps a process grid to sigma~ and back; ddim(eta=0) is Euler there, to 1e-10."""
    process, g = PROCESSES[name](), gaussian()
    denoiser = g.denoiser(process)
    times = S.karras_times(process, 64, SIGMA_MIN, SIGMA_MAX)  # VE never reaches 0: its grid ends at sigma_min
    assert len(times) == 65 and (times[-1] == 0) == (name != "ve")
    x_tilde = start()
    sigma_end = float(S.sigmas_of_times(process, times[-1:]))
    exact = float(process.alpha(times[-1])) * g.pf_ode_solution(x_tilde, SIGMA_MAX, sigma_end)
    x = float(process.alpha(times[0])) * x_tilde  # a sample at t_0 in the process's own scale
    out = S.pf_ode(denoiser, process, x, times, solver=S.heun)
    assert float((out - exact).norm(dim=1).max()) < 0.03
    eul = S.pf_ode(denoiser, process, x, times, solver=S.euler)
    dd = S.ddim(denoiser, process, x, times, eta=0.0)
    assert torch.allclose(dd, eul, rtol=0, atol=1e-10)
    assert float((dd - exact).norm(dim=1).max()) < 0.5
    # sanity: neither is the start point or a constant
    assert float((dd - x).abs().max()) > 1.0


def test_ddim_equals_euler_on_a_strided_ddpm_grid():
    process, g = ddpm(linear_betas, T=1000), gaussian()
    times = S.strided_times(1000, 25)
    x = torch.randn(32, 4, dtype=torch.float64)
    dd = S.ddim(g.denoiser(process), process, x, times)
    eul = S.pf_ode(g.denoiser(process), process, x, times, solver=S.euler)
    assert torch.allclose(dd, eul, rtol=0, atol=1e-10)


def test_ddim_on_rectified_flow_is_the_flow_euler_step():
    """x_s = x_t + (s - t) v with the flow velocity v = (x_t - D) / t (Liu et al. 2023)."""
    process, g = RectifiedFlow(t_min=0.0), gaussian()
    denoiser = g.denoiser(process)
    times = S.uniform_times(process, 10)
    x = torch.randn(16, 4, dtype=torch.float64)
    ref = x.clone()
    for t, s in zip(times[:-1].tolist(), times[1:].tolist()):
        v = (ref - denoiser(ref, torch.full((16,), t, dtype=torch.float64))) / t
        ref = ref + (s - t) * v
    assert torch.allclose(S.ddim(denoiser, process, x, times), ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="alpha"):  # sigma~ is infinite at t = 1
        S.pf_ode(denoiser, process, x, times, solver=S.euler)


@pytest.mark.parametrize("name", ["vp", "ddpm_cosine"])
def test_rk45_lands_on_closed_form_and_counts_nfe(name):
    process, g = PROCESSES[name](), gaussian()
    denoiser_tilde = S.scaled_denoiser(g.denoiser(process), process)
    x = start(8)
    exact = g.pf_ode_solution(x, SIGMA_MAX, 0.0)
    errors, nfes = [], []
    for tol in (1e-4, 1e-7):
        counted = S.CountingDenoiser(denoiser_tilde)
        out = S.rk45(counted, x, S.karras_sigmas(5, SIGMA_MIN, SIGMA_MAX), rtol=tol, atol=tol)
        errors.append(float((out - exact).norm(dim=1).max()))
        nfes.append(counted.nfe)
    assert errors[1] < 1e-4 and errors[1] < errors[0] / 10, errors
    # scipy's RK45: 2 calls to start (f(y0), initial step guess) + 6 per step; + 1 final denoise
    assert nfes[0] % 6 == 3 and nfes[1] > nfes[0]


# ---------------------------------------------------------------- stochastic samplers on the mixture oracle

VE_AL = VESDE(0.02, 3.0, t_min=0.0)
EDM_10 = EDMProcess(0.002, 10.0)
STOCHASTIC = {
    # name: (sampler, process, times); 1000 DDPM steps because beta~ on a coarse grid narrows the modes
    # (mode spread 0.82 at 100 cosine steps, 0.92 at 250, 0.99 at 1000: improved DDPM's case for learned variances)
    "ancestral": (S.ancestral, ddpm(cosine_betas, T=1000), S.strided_times(1000, 1000)),
    "ddim_eta1": (partial(S.ddim, eta=1.0), ddpm(cosine_betas, T=1000), S.strided_times(1000, 1000)),
    "euler_maruyama": (S.euler_maruyama, VPSDE(), S.uniform_times(VPSDE(), 300)),
    "pc_ve": (S.predictor_corrector, VESDE(0.01, 5.0, t_min=0.0), S.uniform_times(VESDE(0.01, 5.0, t_min=0.0), 200)),
    "reverse_diffusion_ve": (partial(S.predictor_corrector, corrector_steps=0), VESDE(0.01, 5.0, t_min=0.0),
                             S.uniform_times(VESDE(0.01, 5.0, t_min=0.0), 200)),
    "pc_vp_em": (partial(S.predictor_corrector, predictor=S.euler_maruyama_step), VPSDE(), S.uniform_times(VPSDE(), 200)),
    "annealed_langevin": (partial(S.annealed_langevin, n_steps_each=50, step_lr=1e-3), VE_AL, S.uniform_times(VE_AL, 9)),
    # the step as a fraction of each sigma^2 runs on a process whose last level (2e-3) NCSN's step_lr would blow up;
    # NCSN's geometric ladder (at r = 0.2 the 50 steps per level leave the modes 1.3x too wide: measured)
    "annealed_langevin_ratio": (partial(S.annealed_langevin, n_steps_each=50, step_lr=None, step_ratio=2.0), EDM_10,
                                torch.logspace(1, math.log10(0.002), 10, dtype=torch.float64)),
    "heun_churn": (partial(S.pf_ode, solver=partial(S.heun, S_churn=20.0, S_tmax=5.0)), EDM_10, S.karras_times(EDM_10, 64)),
}
ED_THRESHOLD = 0.015  # two true 1000-sample sets: ~0.004; D scaled by 1.05: > 0.05


def mode_spread(x: Tensor, gm: GaussianMixture) -> float:
    """Mean squared distance to the nearest mode over its exact value D std^2 (modes are 7.6 std apart): ~1 +- 0.03."""
    d2 = torch.cdist(x.to(torch.float64), gm.means).min(1).values ** 2
    return float(d2.mean() / (gm.dim * gm.covs[0, 0, 0]))


@pytest.mark.parametrize("name", STOCHASTIC)
@pytest.mark.parametrize("scale", [1.0, 1.05])
def test_stochastic_sampler_matches_mixture(name, scale):
    """Energy distance to true samples, and the within-mode spread, which catches a wrong noise scale."""
    sampler, process, times = STOCHASTIC[name]
    gm = mixture()
    exact = gm.denoiser(process)
    denoiser = exact if scale == 1.0 else (lambda x, t: scale * exact(x, t))  # broken: D too large
    x, nfe = S.generate(sampler, lambda p: times, denoiser, process, (1000, 2),
                        generator=torch.Generator().manual_seed(1))
    dist = float(energy_distance(x, gm.sample(1000, generator=torch.Generator().manual_seed(123))))
    spread = mode_spread(x, gm)
    if scale == 1.0:
        assert dist < ED_THRESHOLD and abs(spread - 1) < 0.12, (dist, spread)
    else:
        assert dist > ED_THRESHOLD, dist


def test_ddim_eta_one_is_ancestral_and_ancestral_is_ddpm_algorithm_2():
    process, g = ddpm(linear_betas, T=1000), gaussian()
    denoiser = g.denoiser(process)
    times = S.strided_times(1000, 1000)
    x = torch.randn(8, 4, dtype=torch.float64)
    anc = S.ancestral(denoiser, process, x, times, generator=torch.Generator().manual_seed(5))
    dd = S.ddim(denoiser, process, x, times, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(anc, dd, rtol=0, atol=1e-10)
    # DDPM Algorithm 2 written with betas
    betas = process.betas
    alphas, alphabar = 1 - betas, torch.cumprod(1 - betas, 0)
    gen, ref = torch.Generator().manual_seed(5), x.clone()
    for t in range(1000, 0, -1):
        a, ab, b = alphas[t - 1], alphabar[t - 1], betas[t - 1]
        ab_prev = alphabar[t - 2] if t > 1 else torch.tensor(1.0, dtype=torch.float64)
        eps = (ref - ab.sqrt() * denoiser(ref, torch.full((8,), float(t), dtype=torch.float64))) / (1 - ab).sqrt()
        z = torch.randn(ref.shape, generator=gen, dtype=ref.dtype) if t > 1 else torch.zeros_like(ref)
        sigma_t = ((1 - ab_prev) / (1 - ab) * b).sqrt()  # beta~_t
        ref = (ref - b / (1 - ab).sqrt() * eps) / a.sqrt() + sigma_t * z
    assert torch.allclose(anc, ref, rtol=0, atol=1e-8)


def test_ancestral_takes_the_learned_variance_from_the_same_call():
    """A denoiser returning Denoised(D, v) sets each step's variance by improved DDPM's eq. 15: v = -1 is the
    posterior's beta~ (the plain sampler, draw for draw), v = 1 is beta = 1 - alpha_t^2 / alpha_s^2; one call each."""
    process, g = ddpm(cosine_betas, T=100), gaussian()
    denoiser, times, x = g.denoiser(process), S.strided_times(100, 10), torch.randn(8, 4, dtype=torch.float64)

    def with_v(value):
        return S.CountingDenoiser(lambda x, t: Denoised(denoiser(x, t), torch.full_like(x, value)))

    plain = S.ancestral(denoiser, process, x, times, generator=torch.Generator().manual_seed(3))
    small, large = with_v(-1.0), with_v(1.0)
    assert torch.allclose(S.ancestral(small, process, x, times, generator=torch.Generator().manual_seed(3)), plain,
                          rtol=0, atol=1e-12)
    assert not torch.allclose(S.ancestral(large, process, x, times, generator=torch.Generator().manual_seed(3)), plain)
    assert small.nfe == large.nfe == 10
    t, s = times[1].item(), times[2].item()
    mean, std = S.ancestral_step(with_v(1.0), process, x, t, s)
    beta = 1 - (process.alpha(torch.tensor(t, dtype=torch.float64)) / process.alpha(torch.tensor(s, dtype=torch.float64))) ** 2
    assert torch.allclose(std, beta.sqrt().expand_as(x), rtol=1e-12)
    assert torch.allclose(mean, S.ancestral_step(denoiser, process, x, t, s)[0], rtol=0, atol=1e-12)


def test_heun_churn_uses_the_generator_and_zero_churn_is_deterministic():
    process, g = EDMProcess(), gaussian()
    den = S.scaled_denoiser(g.denoiser(process), process)
    sig, x = S.karras_sigmas(10, 0.002, 80.0), start(4)
    a = S.heun(den, x, sig, S_churn=10.0, S_tmax=50.0, generator=torch.Generator().manual_seed(0))
    b = S.heun(den, x, sig, S_churn=10.0, S_tmax=50.0, generator=torch.Generator().manual_seed(0))
    c = S.heun(den, x, sig, S_churn=10.0, S_tmax=50.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(S.heun(den, x, sig), S.heun(den, x, sig, generator=torch.Generator().manual_seed(9)))


# ---------------------------------------------------------------- guidance and NFE


def conditional_denoiser(process):
    """denoiser(x, t, labels) of a 2-class mixture: label k is component k; label 2 (null) the whole mixture."""
    gm = GaussianMixture.isotropic(torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=torch.float64), 0.3)
    parts = [GaussianMixture.isotropic(gm.means[k:k + 1], 0.3) for k in range(2)] + [gm]

    def denoiser(x, t, labels):
        out = torch.empty_like(x)
        for k, part in enumerate(parts):
            m = labels == k
            if m.any():
                out[m] = part.denoise(x[m], process.alpha(t[m]), process.sigma(t[m]))
        return out

    return denoiser, parts


def test_classifier_free_guidance_limits_and_one_call_per_evaluation():
    process = VPSDE()
    denoiser, parts = conditional_denoiser(process)
    x = torch.randn(6, 2, dtype=torch.float64)
    t = torch.full((6,), 0.5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    a, s = process.alpha(t), process.sigma(t)
    d_u = parts[2].denoise(x, a, s)
    d_c = torch.where((labels == 0)[:, None], parts[0].denoise(x, a, s), parts[1].denoise(x, a, s))
    guide = partial(S.classifier_free_guidance, denoiser, labels, null_label=2)
    assert torch.allclose(guide(scale=0.0)(x, t), d_u, atol=1e-12)
    assert torch.allclose(guide(scale=1.0)(x, t), d_c, atol=1e-12)
    assert torch.allclose(guide(scale=3.0)(x, t), d_u + 3 * (d_c - d_u), atol=1e-12)
    assert not torch.allclose(d_u, d_c, atol=1e-3)
    counted = S.CountingDenoiser(denoiser)
    out = S.ddim(S.classifier_free_guidance(counted, labels, 2.0, 2), process, x, S.uniform_times(process, 7))
    assert counted.nfe == 7 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="labels"):
        guide(scale=1.0)(x[:3], t[:3])


NFE = {
    # name: (sampler, process, expected NFE with n = 6 steps, i.e. 7 grid points)
    "ancestral": (S.ancestral, ddpm(linear_betas, T=100), 6),
    "ddim": (S.ddim, ddpm(linear_betas, T=100), 6),
    "euler_maruyama": (S.euler_maruyama, VPSDE(), 6),
    "pc_2": (partial(S.predictor_corrector, corrector_steps=2), VESDE(), 18),
    "annealed_langevin": (partial(S.annealed_langevin, n_steps_each=3), VESDE(), 7 * 3 + 1),
    "euler": (partial(S.pf_ode, solver=S.euler), EDMProcess(), 6),
    "heun_to_zero": (partial(S.pf_ode, solver=S.heun), EDMProcess(), 11),
    "heun_to_positive": (partial(S.pf_ode, solver=S.heun), VPSDE(), 12),
    "dpm_solver_pp_2m": (partial(S.pf_ode, solver=S.dpm_solver_pp_2m), EDMProcess(), 6),
}


@pytest.mark.parametrize("name", NFE)
def test_generate_counts_nfe_and_draws_the_prior(name):
    sampler, process, nfe = NFE[name]
    disc = S.karras_times if isinstance(process, EDMProcess) else S.strided_times if name in ("ancestral", "ddim") \
        else S.uniform_times
    gm = mixture()
    x, counted = S.generate(sampler, partial(disc, steps=6), gm.denoiser(process), process, (64, 2),
                            generator=torch.Generator().manual_seed(0))
    assert counted == nfe and x.shape == (64, 2) and x.dtype == torch.float64 and torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["vp", "ve", "ddpm_cosine"])
def test_generate_draws_the_marginal_at_the_first_time(name):
    """x ~ N(0, (alpha^2 + sigma^2) I) at t_0: process.prior_sample's law at t_max, here at an earlier t_0 too."""
    process = PROCESSES[name]()
    identity = lambda denoiser, process, x, times, generator=None: x  # noqa: E731
    for t_max in (process.t_max, process.t_max / 2):
        disc = partial(S.uniform_times, t_max=t_max)
        x, nfe = S.generate(identity, partial(disc, steps=4), None, process, (20000, 2),
                            generator=torch.Generator().manual_seed(0))
        t0 = torch.tensor(t_max, dtype=torch.float64)
        std = float((process.alpha(t0) ** 2 + process.sigma(t0) ** 2).sqrt())
        noise = torch.randn((20000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert nfe == 0 and torch.allclose(x, std * noise)
    assert x.std().item() == pytest.approx(std, rel=0.02)


def test_rk45_nfe_through_generate():
    process = EDMProcess()
    x, nfe = S.generate(partial(S.pf_ode, solver=partial(S.rk45, rtol=1e-4, atol=1e-4)),
                        partial(S.karras_times, steps=4), mixture().denoiser(process), process, (32, 2))
    assert nfe > 6 and nfe % 6 == 3 and torch.isfinite(x).all()  # 2 + 6 per RK45 step + 1 final denoise


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error_naming_the_value():
    process, g = EDMProcess(), gaussian()
    den = S.scaled_denoiser(g.denoiser(process), process)
    x = start(2)
    with pytest.raises(ValueError, match=r"strictly decreasing.*\[1\.0, 2\.0, 0\.0\]"):
        S.euler(den, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match=r">= 0"):
        S.heun(den, x, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        S.dpm_solver_pp_2m(den, x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="S_churn=-1"):
        S.heun(den, x, torch.tensor([1.0, 0.0]), S_churn=-1)
    with pytest.raises(ValueError, match="rtol=0"):
        S.rk45(den, x, torch.tensor([1.0, 0.0]), rtol=0)
    with pytest.raises(ValueError, match=r"sigma~ \[100\.0\] lies outside"):
        den(x, torch.full((2,), 100.0))
    d = g.denoiser(process)
    with pytest.raises(ValueError, match="eta=-0.5"):
        S.ddim(d, process, x, torch.tensor([1.0, 0.5]), eta=-0.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.ancestral(d, process, x, torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="t_max=80"):
        S.euler_maruyama(d, process, x, torch.tensor([100.0, 1.0]))
    with pytest.raises(ValueError, match="corrector_steps"):
        S.predictor_corrector(d, process, x, torch.tensor([1.0, 0.5]), corrector_steps=-1)
    with pytest.raises(ValueError, match="snr"):
        S.predictor_corrector(d, process, x, torch.tensor([1.0, 0.5]), snr=0.0)
    with pytest.raises(ValueError, match="sigma"):
        S.annealed_langevin(d, process, x, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"step_lr=2e-05 at sigma_L=0.002 \(step_lr / sigma_L\^2 = 5\).*step_ratio=0.2"):
        S.annealed_langevin(d, EDMProcess(0.002, 80.0), x, torch.tensor([80.0, 0.002]))
    with pytest.raises(ValueError, match="exactly one of step_lr"):
        S.annealed_langevin(d, process, x, torch.tensor([1.0, 0.5]), step_ratio=0.2)
    with pytest.raises(ValueError, match="n >= 1"):
        S.karras_sigmas(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="sigma_max < inf"):
        S.karras_times(RectifiedFlow(), 10)  # sigma~(1) is infinite: pass sigma_max
    with pytest.raises(ValueError, match="steps=11"):
        S.strided_times(10, 11)
    with pytest.raises(ValueError, match="t_min=1.0"):
        S.uniform_times(process, 5, t_min=1.0, t_max=0.5)


def test_geometric_times_are_ncsns_ladder_on_any_process():
    ve = VESDE(0.01, 5.0, t_min=0.0)
    torch.testing.assert_close(S.geometric_times(ve, 9), S.uniform_times(ve, 9))  # VE's sigma is geometric in t
    vp = VPSDE()
    sigmas = vp.sigma_tilde(S.geometric_times(vp, 6, sigma_min=0.01, sigma_max=10.0))
    torch.testing.assert_close(sigmas, torch.logspace(1, -2, 7, dtype=torch.float64))
    lowest, highest = vp.sigma_tilde_range()  # levels outside the process's range are moved to its ends
    torch.testing.assert_close(vp.sigma_tilde(S.geometric_times(vp, 6, sigma_min=0.0, sigma_max=1e4))[[0, -1]],
                               torch.tensor([float(highest), float(lowest)], dtype=torch.float64))
    with pytest.raises(ValueError, match="n=0"):
        S.geometric_times(vp, 0)


@pytest.mark.parametrize("process", [VPSDE(), VESDE()], ids=["vp", "ve"])
@pytest.mark.parametrize("disc", [S.uniform_times, S.karras_times], ids=["uniform", "karras"])
def test_every_sampler_instantiates_from_a_hydra_partial(process, disc):
    """The one top-level signature: `_target_` + `_partial_: true`, a solver nested as pf_ode's partial."""
    from hydra.utils import instantiate

    base = "lightning_diffusion.core.samplers."
    configs = [
        {"_target_": base + "ancestral", "_partial_": True},
        {"_target_": base + "ddim", "_partial_": True, "eta": 0.5},
        {"_target_": base + "euler_maruyama", "_partial_": True},
        {"_target_": base + "predictor_corrector", "_partial_": True, "corrector_steps": 1, "snr": 0.1,
         "predictor": {"_target_": base + "euler_maruyama_step", "_partial_": True}},
        {"_target_": base + "annealed_langevin", "_partial_": True, "n_steps_each": 2, "step_lr": None, "step_ratio": 0.2},
    ] + [{"_target_": base + "pf_ode", "_partial_": True, "solver": {"_target_": base + solver, "_partial_": True}}
         for solver in ("euler", "heun", "dpm_solver_pp_2m", "rk45")]
    clean_end = float(process.sigma(disc(process, 4)[-1])) == 0
    for cfg in configs:
        sampler = instantiate(cfg)
        if cfg["_target_"].endswith("annealed_langevin") and clean_end:
            with pytest.raises(ValueError, match="sigma > 0"):  # Langevin needs a score at every level
                S.generate(sampler, partial(disc, steps=4), mixture().denoiser(process), process, (8, 2))
            continue
        x, nfe = S.generate(sampler, partial(disc, steps=4), mixture().denoiser(process), process, (8, 2),
                            generator=torch.Generator().manual_seed(0))
        assert nfe > 0 and torch.isfinite(x).all(), cfg["_target_"]
    with pytest.raises(ValueError, match="outside"):
        S.karras_times(process, 4, sigma_max=1e4)  # beyond VP's sigma~(1) = 152 and VE's 50


def test_pf_ode_reads_grid_times_from_its_table(monkeypatch):
    """On the grid, t(sigma~) comes from the grid itself: no bisection (it cost ~11 ms per call on DDPM)."""
    process = VPSDE()
    denoiser = mixture().denoiser(process)
    times, x = S.uniform_times(process, 8), torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    expected = S.pf_ode(denoiser, process, x.double(), times, solver=S.heun)
    monkeypatch.setattr(process, "t_of_sigma_tilde", lambda sigmas: pytest.fail("bisection on a grid level"))
    torch.testing.assert_close(S.pf_ode(denoiser, process, x.double(), times, solver=S.heun), expected)
