"""Every parameterization maps its paper's target to the exact x_0, and round-trips through D."""

import math

import pytest
import torch
from torch import nn

from helpers import FixedOutput
from lightning_diffusion.core.oracles import Gaussian
from lightning_diffusion.core.denoiser import Denoised, Denoiser, eps_from_denoiser, score_from_denoiser
from lightning_diffusion.core.parameterizations import (EDMPreconditioning, EpsPrediction, FlowVelocity,
                                                        ScorePrediction, VPrediction, X0Prediction, nearest_ddpm_step)
from lightning_diffusion.core.processes import EDMProcess, RectifiedFlow, VESDE, VPSDE, cosine_betas, ddpm

PROCESSES = [VPSDE(), VESDE(), EDMProcess(), RectifiedFlow(), ddpm(cosine_betas, T=100)]


def paper_targets(process, t, x0, eps):
    """Each target in its paper's own definition."""
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    dalpha, dsigma = (d[:, None] for d in process.derivatives(t))
    x = alpha * x0 + sigma * eps
    s, sd = sigma / alpha, 0.5
    return x, {
        EpsPrediction(): eps,                                            # Ho et al. 2020
        X0Prediction(): x0,
        VPrediction(): (alpha * eps - sigma * x0),                       # Salimans & Ho 2022
        ScorePrediction(divide_by_sigma=False): -eps / sigma,            # grad log q(x_t | x_0)
        ScorePrediction(divide_by_sigma=True): -eps,                     # NCSNv2: score = F / sigma
        # EDM: F = (x0 - c_skip x~) / c_out in the scaled space (Karras et al. 2022, eq. 8)
        EDMPreconditioning(sd): (x0 - sd**2 / (s**2 + sd**2) * x / alpha) / (s * sd / (s**2 + sd**2).sqrt()),
        FlowVelocity(): dalpha * x0 + dsigma * eps,                      # Lipman et al. 2023
    }


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_paper_targets_give_x0(process):
    g = torch.Generator().manual_seed(1)
    t = process.t_min + (process.t_max - process.t_min) * (0.05 + 0.9 * torch.rand(16, generator=g, dtype=torch.float64))
    x0 = torch.randn(16, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, generator=g, dtype=torch.float64)
    x, targets = paper_targets(process, t, x0, eps)
    alpha, sigma = process.alpha(t), process.sigma(t)
    dalpha, dsigma = process.derivatives(t)
    for param, F in targets.items():
        c_skip, c_out = param.coefficients(alpha, sigma, dalpha, dsigma)
        D = c_skip[:, None] * x + c_out[:, None] * F
        torch.testing.assert_close(D, x0, msg=lambda m: f"{param}: {m}")


@pytest.mark.parametrize("param", [EpsPrediction(), X0Prediction(), VPrediction(), ScorePrediction(),
                                   EDMPreconditioning(), FlowVelocity()], ids=repr)
@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_round_trip_and_oracle(param, process):
    """network output -> D -> target is the identity, and the oracle's own target yields the oracle's D."""
    g = torch.Generator().manual_seed(2)
    gauss = Gaussian(torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.3], [0.3, 0.5]]))
    t = process.t_min + (process.t_max - process.t_min) * (0.05 + 0.9 * torch.rand(32, generator=g, dtype=torch.float64))
    x = process.alpha(t)[:, None] * gauss.sample(32, g) + process.sigma(t)[:, None] * torch.randn(32, 2, generator=g, dtype=torch.float64)
    F = torch.randn(32, 2, generator=g, dtype=torch.float64)
    den = Denoiser(FixedOutput(F), param, process)
    torch.testing.assert_close(den.target(x, t, den(x, t)), F)
    # feed the oracle's own prediction: D must be the exact posterior mean
    exact = gauss.denoiser(process)(x, t)
    den_exact = Denoiser(FixedOutput(den.target(x, t, exact)), param, process)
    torch.testing.assert_close(den_exact(x, t), exact)


def test_network_sees_unit_variance_inputs_and_logsnr():
    seen = {}

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, c_noise, labels=None):
            seen["x"], seen["c_noise"] = x, c_noise
            return torch.zeros_like(x)

    process = VESDE(0.01, 50.0)
    t = torch.full((4096,), 0.9)
    x = 1.0 * torch.randn(4096, 2) + process.sigma(t)[:, None] * torch.randn(4096, 2)
    Denoiser(Spy(), EpsPrediction(), process)(x, t)
    assert abs(float(seen["x"].std()) - 1.0) < 0.05
    torch.testing.assert_close(seen["c_noise"], (-process.logsnr(t.double()) / 8).float())


def test_tweedie_helpers_agree_with_oracle_score():
    gauss = Gaussian(torch.zeros(2), torch.eye(2) * 2.0)
    process = VPSDE()
    t = torch.full((8,), 0.4, dtype=torch.float64)
    x = torch.randn(8, 2, dtype=torch.float64)
    alpha, sigma = process.alpha(t), process.sigma(t)
    D = gauss.denoise(x, alpha, sigma)
    torch.testing.assert_close(score_from_denoiser(x, D, alpha, sigma), gauss.score(x, alpha, sigma))
    torch.testing.assert_close(eps_from_denoiser(x, D, alpha, sigma), -sigma[:, None] * gauss.score(x, alpha, sigma))


def test_learned_variance_splits_channels():
    out = torch.randn(5, 6, dtype=torch.float64)
    den = Denoiser(FixedOutput(out), EpsPrediction(), VPSDE(), learned_variance=True)
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.full((5,), 0.5, dtype=torch.float64)
    D, v = den(x, t)  # one call: D and the variance interpolation together
    assert isinstance(den(x, t), Denoised) and D.shape == (5, 3)
    torch.testing.assert_close(v, out[:, 3:])
    assert not isinstance(Denoiser(FixedOutput(out[:, :3]), EpsPrediction(), VPSDE())(x, t), Denoised)


def test_bad_sigma_data():
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPreconditioning(sigma_data=0.0)


def test_nearest_ddpm_step_is_iddpm_preconditionings_noise_input():
    """EDM's iDDPMPrecond (Karras et al. 2022, Table 1): u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1) / abar(j),
    C_1) - 1) with abar(j) = sin^2(pi j / (2 M (1 + C_2))), and c_noise = M - 1 - argmin_j |u_j - sigma|: the table
    is the cosine schedule's sigma~ at the steps, and the noise input the nearest step's 0-based index."""
    M, C_1, C_2 = 1000, 0.001, 0.008
    abar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2  # noqa: E731
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar(j - 1) / abar(j), C_1) - 1)
    u = torch.tensor(u, dtype=torch.float64)
    process = ddpm(cosine_betas, T=M, s=C_2, max_beta=1 - C_1)
    torch.testing.assert_close(process.sigma_tilde(torch.arange(M, -1, -1, dtype=torch.float64)), u, rtol=1e-9, atol=0)
    sigma = torch.exp(torch.linspace(math.log(float(u[M - 1])), math.log(float(u[0])), 301, dtype=torch.float64))
    t = process.t_of_sigma_tilde(sigma)
    expected = M - 1 - (sigma[:, None] - u[None, :]).abs().argmin(1)
    assert torch.equal(nearest_ddpm_step(process, t), expected.to(torch.float64))
    with pytest.raises(ValueError, match="rounds to the steps of a discrete process"):
        nearest_ddpm_step(VPSDE(), torch.tensor([0.5]))
