"""Noise processes against their papers' closed forms."""

import math

import pytest
import torch

from lightning_diffusion.core.processes import (
    DiscreteDDPM, EDMProcess, RectifiedFlow, SubVPSDE, VESDE, VPSDE, cosine_betas, ddpm, linear_betas, sigmoid_betas,
)

PROCESSES = {
    "vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(), "edm": EDMProcess(), "flow": RectifiedFlow(),
    "ddpm_linear": ddpm(linear_betas, T=1000), "ddpm_cosine": ddpm(cosine_betas, T=1000),
    "ddpm_sigmoid": ddpm(sigmoid_betas, T=1000),
}


def grid(p, n=50):
    return torch.linspace(p.t_min + 1e-3 * (p.t_max - p.t_min), p.t_max * (1 - 1e-3), n, dtype=torch.float64)


@pytest.mark.parametrize("name", PROCESSES)
def test_logsnr_decreases_and_inverts(name):
    p = PROCESSES[name]
    t = grid(p)
    lam = p.logsnr(t)
    assert (lam.diff() < 0).all()
    torch.testing.assert_close(p.t_of_logsnr(lam), t, atol=1e-9 * p.t_max, rtol=0)
    torch.testing.assert_close(p.sigma_tilde(t), torch.exp(-lam / 2))


def test_vp_sde_matches_song_eq11():
    p, t = VPSDE(0.1, 20.0), grid(VPSDE())
    beta = 0.1 + t * (20.0 - 0.1)
    f, g2 = p.sde(t)
    torch.testing.assert_close(f, -beta / 2)
    torch.testing.assert_close(g2, beta)
    # mean coefficient exp(-1/2 int_0^t beta) and variance 1 - that squared
    torch.testing.assert_close(p.alpha(t), torch.exp(-0.25 * t**2 * 19.9 - 0.05 * t))


def test_subvp_sde_matches_song_eq29():
    p, t = SubVPSDE(0.1, 20.0), grid(VPSDE())
    beta = 0.1 + t * 19.9
    integral = 0.5 * t**2 * 19.9 + 0.1 * t
    f, g2 = p.sde(t)
    torch.testing.assert_close(f, -beta / 2)
    torch.testing.assert_close(g2, beta * (1 - torch.exp(-2 * integral)))
    torch.testing.assert_close(p.sigma(t), 1 - torch.exp(-integral))


def test_ve_sde_matches_song_eq9():
    p = VESDE(0.01, 50.0)
    t = grid(p)
    sigma = 0.01 * (50.0 / 0.01) ** t
    f, g2 = p.sde(t)
    torch.testing.assert_close(p.sigma(t), sigma)
    torch.testing.assert_close(f, torch.zeros_like(t))
    torch.testing.assert_close(g2, sigma**2 * 2 * math.log(50.0 / 0.01))


def test_edm_and_flow_sde():
    t = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    f, g2 = EDMProcess().sde(t)
    torch.testing.assert_close(g2, 2 * t)  # d sigma^2 / dt with sigma = t
    f, g2 = RectifiedFlow().sde(t)
    torch.testing.assert_close(f, -1 / (1 - t))
    torch.testing.assert_close(g2, 2 * t + 2 * t**2 / (1 - t))


def test_likelihood_weighting_identity():
    # g^2 / sigma^2 = -d logsnr / dt (Kingma et al. 2021 vs Song et al. 2021b)
    for p in PROCESSES.values():
        if isinstance(p, DiscreteDDPM):
            continue
        t = grid(p, 7)
        f, g2 = p.sde(t)
        with torch.enable_grad():
            tt = t.clone().requires_grad_(True)
            dlam = torch.autograd.grad(p.logsnr(tt).sum(), tt)[0]
        torch.testing.assert_close(g2 / p.sigma(t) ** 2, -dlam)


def test_ddpm_marginals_compose_the_steps():
    betas = linear_betas(100)
    p = DiscreteDDPM(betas)
    ints = torch.arange(0, 101, dtype=torch.float64)
    alphabar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
    torch.testing.assert_close(p.alpha(ints) ** 2, alphabar)
    torch.testing.assert_close(p.sigma(ints) ** 2, 1 - alphabar)
    # linear schedule scales with T so the curve spans the same range (improved DDPM convention)
    assert math.isclose(float(linear_betas(1000)[-1]), 0.02)
    assert math.isclose(float(linear_betas(100)[0]), 1e-3)


def test_cosine_schedule_matches_nichol_dhariwal_eq17():
    T, s = 1000, 0.008
    p = ddpm(cosine_betas, T=T)
    t = torch.arange(1, 900, dtype=torch.float64)  # before the beta clip at 0.999 bites
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(p.alpha(t) ** 2, f(t) / f(torch.zeros(1, dtype=torch.float64)))


def test_sigmoid_schedule_endpoints():
    p = ddpm(sigmoid_betas, T=1000)
    assert float(p.alpha(torch.tensor(0.0))) == 1.0
    assert float(p.alpha(torch.tensor(1000.0)) ** 2) < 1e-3
    assert (p.logsnr(torch.arange(1.0, 1000.0)).diff() < 0).all()


def test_prior_matches_the_marginal():
    assert VPSDE().prior_std() == pytest.approx(1.0)
    assert VESDE(0.01, 50.0).prior_std() == pytest.approx(math.sqrt(1 + 50.0**2))
    x = torch.randn(4, 3, 2)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(VPSDE().prior_logp(x), expected)


@pytest.mark.parametrize("make, match", [
    (lambda: VPSDE(beta_min=2.0, beta_max=1.0), "beta_min"),
    (lambda: VESDE(sigma_min=-1.0), "sigma_min"),
    (lambda: EDMProcess(sigma_min=0.0), "sigma_min"),
    (lambda: RectifiedFlow(t_max=1.5), "t_max|1.5"),
    (lambda: DiscreteDDPM(torch.tensor([0.1, 1.5])), "beta"),
    (lambda: linear_betas(0), "T must be >= 1"),
])
def test_bad_parameters_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()
