"""Call for call against k-diffusion's sampling functions, on the same exact Gaussian denoiser, grid and noise.

Both sides see the oracle D(x~; sigma~) in float64; every denoiser call's (sigma~, x~) is recorded on both sides and
compared, then the end points. The stochastic samplers share one noise source: k-diffusion's BrownianTreeNoiseSampler
(torchsde), handed to ours as its `noise`, or the global RNG re-seeded for EDM's churn (k-diffusion draws its churn
noise with torch.randn_like on every step, as ours does when gamma > 0 on every step).
k-diffusion's package __init__ imports its training stack (scikit-image, CLIP, ...); its `sampling` module needs only
torchsde, torchdiffeq and scipy, so it is loaded on its own.
"""

import importlib.util
import math
import sys
import types
from functools import partial

import pytest
import torch

from lightning_diffusion.core import samplers as S
from lightning_diffusion.core.processes import EDMProcess
from sampler_oracles import Recorded, gaussian


def load_kdiffusion_sampling():
    """k_diffusion.sampling without k_diffusion/__init__.py (which imports the training stack)."""
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(importlib.util.find_spec("k_diffusion").submodule_search_locations)
        sys.modules["k_diffusion"] = package
    import k_diffusion.sampling

    return k_diffusion.sampling


K = load_kdiffusion_sampling()
pytestmark = pytest.mark.usefixtures("one_thread")
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def brownian(seed: int):
    """k-diffusion's Brownian-tree noise over the grid's range, as our `noise(x, sigmas, generator)`.

    Queried at float64 levels on both sides: torch.as_tensor of a Python float is float32, and the tree's increments
    at two levels 1e-7 apart differ by ~1e-3.
    """
    def noise(x, sigmas, generator=None):
        tree = K.BrownianTreeNoiseSampler(x, float(sigmas[sigmas > 0].min()), float(sigmas.max()), seed=seed)
        return lambda a, b: tree(torch.tensor(float(a), dtype=torch.float64), torch.tensor(float(b), dtype=torch.float64))
    return noise


# ours -> (k-diffusion's function, its keywords); `noise` marks the stochastic ones (same Brownian tree on both sides)
PAIRS = {
    "euler": (S.euler, K.sample_euler, {}),
    "heun": (S.heun, K.sample_heun, {}),
    "dpm_2": (S.dpm_2, K.sample_dpm_2, {}),
    "lms": (S.lms, K.sample_lms, {}),
    "lms_order2": (partial(S.lms, order=2), K.sample_lms, {"order": 2}),
    "dpm_solver_pp_2m": (S.dpm_solver_pp_2m, K.sample_dpmpp_2m, {}),
    "dpm_solver_pp_3m": (partial(S.dpm_solver_pp_3m, lower_order_final=False), K.sample_dpmpp_3m_sde, {"eta": 0.0}),
    "euler_ancestral": (partial(S.euler_ancestral, noise=brownian(3)), K.sample_euler_ancestral,
                        {"noise_sampler": "brownian"}),
    "euler_ancestral_eta": (partial(S.euler_ancestral, eta=0.5, s_noise=0.9, noise=brownian(3)),
                            K.sample_euler_ancestral, {"eta": 0.5, "s_noise": 0.9, "noise_sampler": "brownian"}),
    "dpm_solver_pp_2s_ancestral": (partial(S.dpm_solver_pp_2s_ancestral, noise=brownian(3)),
                                   K.sample_dpmpp_2s_ancestral, {"noise_sampler": "brownian"}),
    "dpm_solver_pp_sde": (partial(S.dpm_solver_pp_sde, noise=brownian(3)), K.sample_dpmpp_sde,
                          {"noise_sampler": "brownian"}),
    "dpm_solver_pp_sde_r": (partial(S.dpm_solver_pp_sde, r=0.3, eta=0.7, noise=brownian(3)), K.sample_dpmpp_sde,
                            {"r": 0.3, "eta": 0.7, "noise_sampler": "brownian"}),
    "dpm_solver_pp_2m_sde": (partial(S.dpm_solver_pp_2m_sde, noise=brownian(3)), K.sample_dpmpp_2m_sde,
                             {"noise_sampler": "brownian"}),
    "dpm_solver_pp_2m_sde_heun": (partial(S.dpm_solver_pp_2m_sde, solver_type="heun", noise=brownian(3)),
                                  K.sample_dpmpp_2m_sde, {"solver_type": "heun", "noise_sampler": "brownian"}),
    "dpm_solver_pp_3m_sde": (partial(S.dpm_solver_pp_3m_sde, noise=brownian(3)), K.sample_dpmpp_3m_sde,
                             {"noise_sampler": "brownian"}),
}


@pytest.mark.parametrize("steps", [4, 12])
@pytest.mark.parametrize("name", PAIRS)
def test_every_call_matches_kdiffusion(name, steps):
    ours, theirs, kwargs = PAIRS[name]
    g, sigmas = gaussian(), S.karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX)
    x = SIGMA_MAX * torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if kwargs.get("noise_sampler") == "brownian":
        kwargs = {**kwargs, "noise_sampler": brownian(3)(x, sigmas)}
    a, b = Recorded(g), Recorded(g)
    out_ours, out_theirs = ours(a, x, sigmas), theirs(b, x, sigmas, disable=True, **kwargs)
    assert [s for s, _ in a.calls] == pytest.approx([s for s, _ in b.calls], rel=1e-13)
    for (_, xa), (_, xb) in zip(a.calls, b.calls):
        torch.testing.assert_close(xa, xb, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-11, atol=1e-11)
    assert float((out_ours - x).abs().max()) > 1.0  # it moved


@pytest.mark.parametrize("name", ["heun", "dpm_2"])
def test_churn_matches_kdiffusion(name):
    """S_churn on every step: both draw one randn_like(x) per step from the global RNG (k-diffusion always draws)."""
    ours, theirs, _ = PAIRS[name]
    g, sigmas = gaussian(), S.karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    x = SIGMA_MAX * torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    churn = {"S_churn": 5.0, "S_noise": 1.003}
    torch.manual_seed(7)
    out_ours = ours(Recorded(g), x, sigmas, **churn)
    torch.manual_seed(7)
    out_theirs = theirs(Recorded(g), x, sigmas, disable=True, s_churn=5.0, s_noise=1.003)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-11, atol=1e-11)
    torch.manual_seed(7)
    assert not torch.allclose(ours(Recorded(g), x, sigmas), out_ours)  # the churn did something


def test_kdiffusion_grids_match_ours():
    """get_sigmas_karras and get_sigmas_vp = karras_sigmas and vp_times on the VP SDE's own range."""
    torch.testing.assert_close(S.karras_sigmas(10, 0.03, 14.6), K.get_sigmas_karras(10, 0.03, 14.6).double(),
                               rtol=1e-6, atol=0)
    edm = EDMProcess(0.001, 200.0)
    vp = K.get_sigmas_vp(12).double()  # beta_d = 19.9, beta_min = 0.1, eps_s = 1e-3: sigma(1) ~ 152, sigma(1e-3) ~ 0.01
    ours = S.sigmas_of_times(edm, S.vp_times(edm, 12, sigma_min=float(vp[-2]), sigma_max=float(vp[0])))
    torch.testing.assert_close(ours, vp, rtol=1e-4, atol=0)  # k-diffusion's ramp is float32
    assert math.isclose(float(vp[0]), 152.0, rel_tol=0.01)
