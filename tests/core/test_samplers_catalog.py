"""The sampler catalog against exact oracles: convergence orders on the Gaussian PF-ODE, identities between solvers,
stochastic samplers against true mixture samples, the Brownian-tree noise, EDM's ablation axes, the grid catalog,
the NFE budget, bad input refused before the first denoiser call, and every conf/sampler config on every process."""

import math
from functools import partial

import pytest
import torch
from hydra.utils import instantiate

from helpers import CONF, compose_config
from lightning_diffusion.core import samplers as S
from lightning_diffusion.core.distances import energy_distance
from lightning_diffusion.core.oracles import Gaussian, GaussianMixture
from lightning_diffusion.core.processes import EDMProcess, RectifiedFlow, VESDE, VPSDE, cosine_betas, ddpm
from sampler_oracles import gaussian, mixture

pytestmark = pytest.mark.usefixtures("one_thread")
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def oracle_tilde(g):
    process = EDMProcess(SIGMA_MIN, SIGMA_MAX)
    return S.scaled_denoiser(g.denoiser(process), process)


def start(n=16, sigma=SIGMA_MAX):
    return sigma * torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def geometric(n: int) -> torch.Tensor:
    """n steps evenly spaced in log sigma~ from 80 to 0.002 (no step to 0: its error is D's at 0.002, not the order's)."""
    return torch.logspace(math.log10(SIGMA_MAX), math.log10(SIGMA_MIN), n + 1, dtype=torch.float64)


# ---------------------------------------------------------------- convergence orders on the Gaussian PF-ODE

# solver -> (the global order it shows here, the paper's order). The multistep methods start at order 1: its local
# error O(h^2) on the first step bounds the global order by 2 whatever the later steps' order (DPM-Solver++(3M),
# iPNDM's fixed-step weights); UniPC's corrector lifts that first step, DEIS's eps form makes it tiny here.
ORDERS = {
    "euler": (S.euler, 1, 1),
    "heun": (S.heun, 2, 2),
    "dpm_2": (S.dpm_2, 2, 2),
    "dpm_solver_pp_2m": (S.dpm_solver_pp_2m, 2, 2),
    "dpm_solver_pp_3m": (S.dpm_solver_pp_3m, 2, 3),
    "unipc_1": (partial(S.unipc, order=1), 2, 2),
    "unipc_2": (S.unipc, 3, 3),
    "unipc_2_bh1": (partial(S.unipc, variant="bh1"), 3, 3),
    "ipndm": (S.ipndm, 2, 4),
    "lms": (S.lms, 3, 4),
    "deis_2": (S.deis, 2, 2),
    "deis_3": (partial(S.deis, order=3), 3, 3),
    "dpm_solver_2": (S.dpm_solver_singlestep, 2, 2),
    "dpm_solver_3": (partial(S.dpm_solver_singlestep, order=3), 3, 3),
    "dpm_solver_3_eps": (partial(S.dpm_solver_singlestep, order=3, solver_type="heun", noise_prediction=True), 3, 3),
    "edm_ablation_vp": (None, 2, 2),
}


def solve(name: str, g: Gaussian, x, n: int):
    fn = ORDERS[name][0]
    if fn is not None:
        return fn(oracle_tilde(g), x, geometric(n))
    process = EDMProcess(SIGMA_MIN, SIGMA_MAX)  # EDM's VP schedule and scaling on the same levels
    return S.edm_ablation(g.denoiser(process), process, x, geometric(n), schedule="vp", scaling="vp")


@pytest.mark.parametrize("name", ORDERS)
def test_deterministic_solver_converges_at_its_order(name):
    g, x = gaussian(), start()
    exact = g.pf_ode_solution(x, SIGMA_MAX, SIGMA_MIN)
    errors = [float((solve(name, g, x, n) - exact).norm(dim=1).max()) for n in (16, 32, 64, 128)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(3)]
    order = ORDERS[name][1]
    assert min(orders[1:]) > order - 0.3, (errors, orders)
    assert orders[-1] < order + 0.8, (errors, orders)  # not a higher order than it has
    assert errors[-1] < {1: 0.2, 2: 0.01, 3: 1e-3}[order], errors


def test_third_order_multistep_beats_second_order_at_every_step_count():
    """3M's first step is first order, but each later step is third order: from 16 steps on (at 8, its steps of
    h = 1.3 extrapolate D too far) its error is a fraction of 2M's."""
    g, x = gaussian(), start()
    exact = g.pf_ode_solution(x, SIGMA_MAX, SIGMA_MIN)
    for n in (16, 32, 64, 128):
        e2, e3 = (float((fn(oracle_tilde(g), x, geometric(n)) - exact).norm(dim=1).max())
                  for fn in (S.dpm_solver_pp_2m, S.dpm_solver_pp_3m))
        assert e3 < (1.0 if n == 16 else 0.6) * e2, (n, e2, e3)


# ---------------------------------------------------------------- identities between solvers


def test_first_order_members_are_euler_and_the_sdes_at_eta_zero_are_their_odes():
    g, x = gaussian(), start()
    den, sig = oracle_tilde(g), S.karras_sigmas(12, SIGMA_MIN, SIGMA_MAX)
    euler = S.euler(den, x, sig)
    for first_order in (partial(S.deis, order=1), partial(S.unipc, order=1, corrector=False),
                        partial(S.dpm_solver_singlestep, order=1), partial(S.ipndm, order=1),
                        partial(S.lms, order=1), partial(S.euler_ancestral, eta=0.0)):
        torch.testing.assert_close(first_order(den, x, sig), euler, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S.dpm_solver_pp_3m_sde(den, x, sig, eta=0.0),
                               S.dpm_solver_pp_3m(den, x, sig, lower_order_final=False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S.dpm_solver_pp_2m_sde(den, x, sig, eta=0.0), S.dpm_solver_pp_2m(den, x, sig),
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(S.dpm_solver_pp_3m(den, x, sig), euler, atol=1e-3)


def test_ipndm_is_lms_on_equal_steps():
    """On an evenly spaced sigma~ grid the Lagrange integrals of LMS are Adams-Bashforth's fixed weights (iPNDM's)."""
    g = gaussian()
    x, sig = start(sigma=5.0), torch.linspace(5.0, 0.5, 17, dtype=torch.float64)
    torch.testing.assert_close(S.ipndm(oracle_tilde(g), x, sig), S.lms(oracle_tilde(g), x, sig), rtol=1e-11,
                               atol=1e-11)
    sig = S.karras_sigmas(16, 0.5, 5.0)[:-1]  # unequal steps: no longer the same method
    assert not torch.allclose(S.ipndm(oracle_tilde(g), x, sig), S.lms(oracle_tilde(g), x, sig), atol=1e-6)


@pytest.mark.parametrize("process", [EDMProcess(), VPSDE(), ddpm(cosine_betas, T=1000)], ids=["edm", "vp", "ddpm"])
def test_edm_ablation_with_linear_schedule_and_no_scaling_is_heun_and_euler(process):
    """Karras et al. 2022, Table 1: sigma(t) = t and s(t) = 1 make Alg. 1 the scaled-space Heun (and Euler)."""
    g = gaussian()
    times = S.karras_times(process, 12)
    x = float(process.alpha(times[0])) * start(sigma=process.sigma_tilde_range()[1])
    den = g.denoiser(process)
    for solver, ours in (("heun", S.heun), ("euler", S.euler)):
        torch.testing.assert_close(S.edm_ablation(den, process, x, times, solver=solver, schedule="linear",
                                                  scaling="none"), S.pf_ode(den, process, x, times, solver=ours),
                                   rtol=1e-12, atol=1e-12)
    other = S.edm_ablation(den, process, x, times, schedule="vp", scaling="vp")
    assert not torch.allclose(other, S.pf_ode(den, process, x, times, solver=S.heun), atol=1e-4)


# ---------------------------------------------------------------- stochastic samplers on the mixture oracle

EDM_10 = EDMProcess(0.002, 10.0)
STOCHASTIC = {  # name -> (solver, steps on Karras' grid): about 100 NFE each
    "euler_ancestral": (S.euler_ancestral, 100),
    "euler_ancestral_brownian": (partial(S.euler_ancestral, noise=S.brownian_noise), 100),
    "dpm_solver_pp_2s_ancestral": (S.dpm_solver_pp_2s_ancestral, 50),
    "dpm_solver_pp_sde": (S.dpm_solver_pp_sde, 50),
    "dpm_solver_pp_sde_gaussian": (partial(S.dpm_solver_pp_sde, noise=S.gaussian_noise), 50),
    "dpm_solver_pp_2m_sde": (S.dpm_solver_pp_2m_sde, 100),
    "dpm_solver_pp_2m_sde_heun": (partial(S.dpm_solver_pp_2m_sde, solver_type="heun"), 100),
    "dpm_solver_pp_3m_sde": (S.dpm_solver_pp_3m_sde, 100),
}
ED_THRESHOLD = 0.015  # two true 1000-sample sets: ~0.004; passing samplers 0.002-0.005; D x 1.05: > 0.25


def mode_spread(x, gm: GaussianMixture) -> float:
    """Mean squared distance to the nearest mode over its exact value D std^2: ~1 for true samples."""
    return float((torch.cdist(x, gm.means).min(1).values ** 2).mean() / (gm.dim * gm.covs[0, 0, 0]))


def sample_mixture(solver, steps, denoiser_scale=1.0, **opts):
    gm = mixture()
    exact = gm.denoiser(EDM_10)
    denoiser = exact if denoiser_scale == 1.0 else (lambda x, t: denoiser_scale * exact(x, t))
    sampler = partial(S.pf_ode, solver=partial(solver, **opts))
    x, _ = S.generate(sampler, partial(S.karras_times, steps=steps), denoiser, EDM_10, (1000, 2),
                      generator=torch.Generator().manual_seed(1))
    reference = gm.sample(1000, generator=torch.Generator().manual_seed(123))
    return float(energy_distance(x, reference)), mode_spread(x, gm)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_matches_mixture(name):
    """Energy distance to true samples and the within-mode spread; a denoiser 5% too large, or 40% too much noise
    (s_noise), fails one of them."""
    solver, steps = STOCHASTIC[name]
    distance, spread = sample_mixture(solver, steps)
    assert distance < ED_THRESHOLD and abs(spread - 1) < 0.15, (distance, spread)
    assert sample_mixture(solver, steps, denoiser_scale=1.05)[0] > ED_THRESHOLD
    distance, spread = sample_mixture(solver, steps, s_noise=1.4)
    assert distance > ED_THRESHOLD or abs(spread - 1) > 0.15, (distance, spread)


def test_edm_ablation_with_churn_matches_mixture():
    gm, reference = mixture(), mixture().sample(1000, generator=torch.Generator().manual_seed(123))
    for scale, ok in ((1.0, True), (1.05, False)):
        exact = gm.denoiser(EDM_10)
        sampler = partial(S.edm_ablation, S_churn=20.0, S_tmax=5.0, schedule="vp", scaling="vp")
        x, nfe = S.generate(sampler, partial(S.karras_times, steps=64), lambda x, t: scale * exact(x, t), EDM_10,
                            (1000, 2), generator=torch.Generator().manual_seed(1))
        assert (float(energy_distance(x, reference)) < ED_THRESHOLD) == ok and nfe == 127


# ---------------------------------------------------------------- the Brownian-tree noise


def test_brownian_tree_is_one_path_whatever_the_queries():
    like = torch.zeros(20000, dtype=torch.float64)
    tree = S.BrownianTree(like, 0.0, 1.0, seed=5)
    w = {t: tree(t) for t in (0.9, 0.1, 0.5, 0.3)}
    again = S.BrownianTree(like, 0.0, 1.0, seed=5)
    for t in (0.3, 0.5, 0.1, 0.9):  # another order, another tree object: the same values
        torch.testing.assert_close(again(t), w[t], rtol=0, atol=0)
    # Brownian: independent increments of variance dt
    inc = [w[0.3] - w[0.1], w[0.5] - w[0.3], w[0.9] - w[0.5]]
    for dw, dt in zip(inc, (0.2, 0.2, 0.4)):
        assert abs(float(dw.var()) / dt - 1) < 0.05 and abs(float(dw.mean())) < 0.02
    assert abs(float(torch.corrcoef(torch.stack(inc[:2]))[0, 1])) < 0.03
    assert not torch.equal(S.BrownianTree(like, 0.0, 1.0, seed=6)(0.5), w[0.5])


def test_brownian_noise_is_normal_and_shared_between_grids():
    """The normalised increment over a coarse step is the sum of the fine ones, rescaled: both grids read one path."""
    x = torch.zeros(50000, dtype=torch.float64)
    sig = S.karras_sigmas(8, SIGMA_MIN, SIGMA_MAX)
    draw = S.brownian_noise(x, sig, torch.Generator().manual_seed(0))
    z = draw(10.0, 1.0)
    assert abs(float(z.std()) - 1) < 0.02 and abs(float(z.mean())) < 0.02
    mid = math.sqrt(10.0)  # the midpoint in log sigma
    half = math.log(10.0) / 2
    fine = (draw(10.0, mid) + draw(mid, 1.0)) * math.sqrt(half) / math.sqrt(2 * half)
    torch.testing.assert_close(fine, z, rtol=1e-9, atol=1e-9)
    other = S.brownian_noise(x, sig, torch.Generator().manual_seed(1))(10.0, 1.0)
    assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 0.02


def test_brownian_noise_makes_the_sample_converge_with_the_step_count():
    """With one Brownian path the SDE sample at 2n steps stays near the one at n; with fresh draws it does not."""
    gm = mixture()
    den = S.scaled_denoiser(gm.denoiser(EDM_10), EDM_10)
    x = 10.0 * torch.randn(500, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run(n, noise):
        return S.dpm_solver_pp_2m_sde(den, x, S.karras_sigmas(n, 0.002, 10.0), noise=noise,
                                      generator=torch.Generator().manual_seed(4))

    gap = {noise.__name__: float((run(50, noise) - run(100, noise)).norm(dim=1).median())
           for noise in (S.brownian_noise, S.gaussian_noise)}
    assert gap["brownian_noise"] < 0.1 * gap["gaussian_noise"], gap


# ---------------------------------------------------------------- the grid catalog


def test_iddpm_levels_are_the_cosine_ddpm_noise_levels():
    """EDM's u_j recursion (Table 1) is sigma~ of improved DDPM's cosine schedule at t = M - j."""
    u = S.iddpm_levels(1000)
    process = ddpm(cosine_betas, T=1000)
    torch.testing.assert_close(u, process.sigma_tilde(torch.arange(1000, -1, -1, dtype=torch.float64)), rtol=1e-9,
                               atol=1e-12)
    times = S.iddpm_times(EDMProcess(0.002, 80.0), 10)
    assert len(times) == 11 and times[-1] == 0 and 0.002 <= float(times[-2]) and float(times[0]) <= 80.0
    assert all(float((u - t).abs().min()) < 1e-9 * t for t in times[:-1].tolist())  # each one of iDDPM's levels


@pytest.mark.parametrize("grid", [S.vp_times, S.iddpm_times, S.time_quadratic_times, S.geometric_times,
                                  S.karras_times, S.logsnr_times], ids=lambda f: f.__name__)
@pytest.mark.parametrize("process", [VPSDE(), VESDE(0.01, 50.0), EDMProcess(), ddpm(cosine_betas, T=1000),
                                     RectifiedFlow(t_max=0.999)], ids=["vp", "ve", "edm", "ddpm", "flow"])
def test_every_grid_is_steps_plus_one_decreasing_times_in_range(grid, process):
    times = grid(process, 10)
    assert len(times) == 11 and (times[1:] < times[:-1]).all() and float(times[0]) <= process.t_max
    # the sigma~ grids end at sigma~ = 0 where the process gets there (else at its lowest level); time grids at t_min
    # (NCSN's ladder, geometric_times, never steps to 0)
    clean_end = process.t_min == 0 if grid is S.time_quadratic_times else (
        grid is not S.geometric_times and float(process.sigma(torch.tensor(0.0))) == 0)
    assert float(times[-1]) >= 0 and (float(times[-1]) == 0) == clean_end


def test_logsnr_times_are_geometric_then_zero():
    sigmas = EDMProcess().sigma_tilde(S.logsnr_times(EDMProcess(0.002, 80.0), 4))
    torch.testing.assert_close(sigmas[:-1], torch.logspace(math.log10(80), math.log10(0.002), 4, dtype=torch.float64))
    assert sigmas[-1] == 0


def test_time_quadratic_is_dense_near_the_data():
    times = S.time_quadratic_times(VPSDE(t_min=0.0), 4)
    torch.testing.assert_close(times, torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------- NFE: counted, budgeted, refused


def test_steps_for_nfe_and_the_budget():
    process = EDMProcess()
    heun, sde = partial(S.pf_ode, solver=S.heun), partial(S.pf_ode, solver=S.dpm_solver_pp_sde)
    assert S.steps_for_nfe(heun, S.karras_times, process, 10) == 5  # 2 * 5 - 1 = 9
    assert S.steps_for_nfe(partial(S.pf_ode, solver=S.unipc), S.karras_times, process, 10) == 10
    assert S.steps_for_nfe(sde, S.karras_times, process, 6) == 3
    assert S.steps_for_nfe(partial(S.pf_ode, solver=S.lms), S.karras_times, process, 6) == 6  # order 4: 3..6 steps
    calls = S.CountingDenoiser(gaussian().denoiser(process))
    with pytest.raises(ValueError, match=r"needs 11 denoiser calls, over the budget nfe=10"):
        S.generate(heun, partial(S.karras_times, steps=6), calls, process, (4, 4), nfe=10)
    assert calls.nfe == 0  # refused before the first call
    x, nfe = S.generate(heun, partial(S.karras_times, steps=5), calls, process, (4, 4), nfe=10)
    assert nfe == 9 == calls.nfe
    rk45 = partial(S.pf_ode, solver=S.rk45)
    assert S.count_nfe(rk45, partial(S.karras_times, steps=2), process) == 51  # on the stand-in D = 0
    with pytest.raises(RuntimeError, match="more than nfe=60"):  # the real run needs more: stopped at the budget
        S.generate(rk45, partial(S.karras_times, steps=2), calls, process, (4, 4), nfe=60)


SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


@pytest.mark.parametrize("name", SAMPLERS)
def test_count_nfe_is_the_real_nfe_of_every_sampler_config(name):
    cfg = compose_config([f"sampler={name}", "grid.steps=6"] + (["sampler.n_steps_each=2"]
                                                                 if name == "annealed_langevin" else []))
    sampler, grid = instantiate(cfg.sampler), instantiate(cfg.grid)
    process = ddpm(cosine_betas, T=1000) if name == "ancestral" else VPSDE() if name == "annealed_langevin" else (
        EDMProcess())
    if name == "annealed_langevin":
        grid = partial(S.geometric_times, steps=6)
    _, nfe = S.generate(sampler, grid, mixture().denoiser(process), process, (16, 2),
                        generator=torch.Generator().manual_seed(0))
    assert nfe == S.count_nfe(sampler, grid, process, (16, 2)) or name == "rk45"


# ---------------------------------------------------------------- every new sampler config on every process

NEW = ["deis", "dpm_2", "dpm_solver_2", "dpm_solver_3", "dpm_solver_pp_2m_sde", "dpm_solver_pp_2s_ancestral",
       "dpm_solver_pp_3m", "dpm_solver_pp_3m_sde", "dpm_solver_pp_sde", "edm_ablation", "euler_ancestral", "ipndm",
       "lms", "unipc", "unipc_bh1"]
PROCESSES = {"vp": VPSDE(), "ve": VESDE(0.01, 5.0, t_min=0.0), "edm": EDMProcess(0.002, 80.0),
             "ddpm": ddpm(cosine_betas, T=1000), "flow": RectifiedFlow(t_max=0.999)}


def test_the_new_configs_are_the_new_catalog():
    assert set(NEW) <= set(SAMPLERS)


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("name", NEW)
def test_every_new_sampler_config_samples_the_mixture_on_every_process(name, process):
    """Each config with its own grid at 50 steps (the rho = 7 grid needs them from sigma~ = 2e4, DDPM cosine), fed the
    exact denoiser of the process: near true samples."""
    cfg = compose_config([f"sampler={name}", "grid.steps=50"])
    p = PROCESSES[process]
    gm = mixture()
    x, nfe = S.generate(instantiate(cfg.sampler), instantiate(cfg.grid), gm.denoiser(p), p, (500, 2),
                        generator=torch.Generator().manual_seed(0))
    distance = float(energy_distance(x, gm.sample(500, generator=torch.Generator().manual_seed(1))))
    assert nfe > 0 and distance < 0.03, (distance, nfe)


# ---------------------------------------------------------------- bad input, refused before the first call


class Refusing:
    """A denoiser that fails the test if it is ever called."""

    def __call__(self, x, sigma):
        pytest.fail("the denoiser was called before the bad input was refused")


@pytest.mark.parametrize("call,match", [
    (lambda d, x: S.dpm_solver_pp_3m(d, x, torch.tensor([10.0, 1.0])), r"order 3 reads 2 earlier levels: it needs a "
                                                                      r"grid of at least 2 steps, got 1"),
    (lambda d, x: S.unipc(d, x, S.karras_sigmas(8, 0.1, 10.0), order=4), r"unipc has orders \[1, 2, 3\], got order=4"),
    (lambda d, x: S.unipc(d, x, S.karras_sigmas(8, 0.1, 10.0), variant="bh3"), "'bh1' or 'bh2', got 'bh3'"),
    (lambda d, x: S.ipndm(d, x, S.karras_sigmas(8, 0.1, 10.0), order=5), r"got order=5"),
    (lambda d, x: S.lms(d, x, S.karras_sigmas(2, 0.1, 10.0)), r"lms of order 4 .* at least 3 steps, got 2"),
    (lambda d, x: S.deis(d, x, S.karras_sigmas(8, 0.1, 10.0), order=0), r"got order=0"),
    (lambda d, x: S.dpm_solver_singlestep(d, x, S.karras_sigmas(8, 0.1, 10.0), order=4), r"got order=4"),
    (lambda d, x: S.dpm_solver_singlestep(d, x, torch.tensor([10.0, 0.0]), order=3), r"at least 2 steps, got 1"),
    (lambda d, x: S.dpm_solver_pp_2m(d, x, S.karras_sigmas(8, 0.1, 10.0), solver_type="rk"), "got 'rk'"),
    (lambda d, x: S.euler_ancestral(d, x, S.karras_sigmas(8, 0.1, 10.0), s_noise=-0.1), r"s_noise=-0.1"),
    (lambda d, x: S.dpm_solver_pp_sde(d, x, S.karras_sigmas(8, 0.1, 10.0), eta=-1.0), r"eta=-1.0"),
    (lambda d, x: S.dpm_solver_pp_sde(d, x, S.karras_sigmas(8, 0.1, 10.0), r=0.0), r"r=0.0"),
    (lambda d, x: S.dpm_solver_pp_3m_sde(d, x, S.karras_sigmas(8, 0.1, 10.0), s_noise=-1.0), r"s_noise=-1.0"),
    (lambda d, x: S.dpm_2(d, x, S.karras_sigmas(8, 0.1, 10.0), S_noise=-1.0), r"S_noise=-1.0"),
    (lambda d, x: S.dpm_solver_pp_2m_sde(d, x, torch.tensor([1.0, 2.0])), "strictly decreasing"),
])
def test_bad_solver_input_is_refused_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call(Refusing(), start(2))


def test_bad_sampler_and_grid_input_is_refused_naming_the_value():
    process, x, times = EDMProcess(), start(2), S.karras_times(EDMProcess(), 4)
    for kwargs, match in (({"solver": "rk4"}, "'euler' or 'heun', got 'rk4'"),
                          ({"schedule": "cosine"}, r"\['linear', 've', 'vp'\], got 'cosine'"),
                          ({"scaling": "ve"}, "'vp' or 'none', got 've'"), ({"alpha": 0.0}, "alpha=0.0"),
                          ({"S_churn": -1.0}, "S_churn=-1.0")):
        with pytest.raises(ValueError, match=match):
            S.edm_ablation(Refusing(), process, x, times, **kwargs)
    with pytest.raises(ValueError, match=r"12 levels asked, only 9 of iDDPM's M=10 lie"):
        S.iddpm_times(EDMProcess(), 12, M=10)
    with pytest.raises(ValueError, match="steps >= 1, got steps=0"):
        S.time_quadratic_times(VPSDE(), 0)
    with pytest.raises(ValueError, match="nfe must be >= 1, got nfe=0"):
        S.steps_for_nfe(partial(S.pf_ode, solver=S.heun), S.karras_times, process, 0)
