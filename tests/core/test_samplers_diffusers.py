"""Call for call against diffusers' schedulers: UniPC, DPMSolverMultistep (order 3), DPMSolverSinglestep, DEIS, LMS,
EulerAncestral and DPMSolverSDE, on DDPM's linear betas and the same exact Gaussian denoiser.

diffusers keeps its sigmas in float32; ours run on those sigmas (as float64). Every model call's level and input
(in the scaled space x~ = x / alpha) is compared, then the end point; what remains is diffusers' float32 rounding
(DPMSolverMultistep also computes its samples in float32). The VP-space schedulers (UniPC, DPM-Solver, DEIS) see
x = alpha x~ with alpha = 1 / sqrt(1 + sigma~^2), the others x~ itself.
"""

import math
from functools import partial

import pytest
import torch
from diffusers import (DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSDEScheduler,
                       DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler, LMSDiscreteScheduler,
                       UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

from lightning_diffusion.core import samplers as S
from lightning_diffusion.core.oracles import Gaussian
from lightning_diffusion.core.processes import linear_betas
from sampler_oracles import Recorded, gaussian

pytestmark = pytest.mark.usefixtures("one_thread")
T, B = 1000, 8


def run_vp(sched, g: Gaussian, x_tilde):
    """diffusers' loop in its VP space from x = alpha_0 x~: (calls as (sigma~, x~), final x~)."""
    sigmas, calls = sched.sigmas.double(), []
    x = x_tilde / math.sqrt(1 + float(sigmas[0]) ** 2)
    for i, t in enumerate(sched.timesteps):
        s = float(sigmas[i])
        a = 1 / math.sqrt(1 + s**2)
        calls.append((s, x / a))
        eps = (x - a * g.denoise(x / a, 1.0, s)) / (a * s)
        x = sched.step(eps, t, x).prev_sample.double()
    return calls, x * math.sqrt(1 + float(sigmas[-1]) ** 2)


def run_ve(sched, g: Gaussian, x_tilde, generator=None):
    """diffusers' loop on x~ itself; the model's level is its sigmas[step] (or DPMSolverSDE's midpoint level)."""
    calls, x = [], x_tilde
    for t in sched.timesteps:
        second = not getattr(sched, "state_in_first_order", True)
        s = float(sched.mid_point_sigma if second else sched.sigmas[sched.step_index or 0])
        calls.append((s, x))
        eps = (x - g.denoise(x, 1.0, s)) / s
        x = sched.step(eps, t, x, **({"generator": generator} if generator else {})).prev_sample.double()
    return calls, x


def compare(ours_calls, ours_out, theirs_calls, theirs_out, rtol):
    assert len(ours_calls) == len(theirs_calls)
    assert [s for s, _ in ours_calls] == pytest.approx([s for s, _ in theirs_calls], rel=1e-6)
    for (_, a), (_, b) in [*zip(ours_calls, theirs_calls), ((0, ours_out), (0, theirs_out))]:
        scale = float(b.abs().max().clamp(min=1.0))
        assert float((a - b).abs().max()) < rtol * scale, float((a - b).abs().max()) / scale


BETAS = linear_betas(T).numpy()
VP = {  # ours -> diffusers' scheduler (its loop in the VP space)
    "unipc_bh2": (partial(S.unipc, order=2, variant="bh2"),
                  lambda: UniPCMultistepScheduler(trained_betas=BETAS, solver_order=2, solver_type="bh2")),
    # bh1's B(h) = -h is infinite on a step to 0 (diffusers returns NaN there): end at sigma_min as diffusers offers
    "unipc_bh1": (partial(S.unipc, order=2, variant="bh1"),
                  lambda: UniPCMultistepScheduler(trained_betas=BETAS, solver_order=2, solver_type="bh1",
                                                  final_sigmas_type="sigma_min")),
    "unipc_3": (partial(S.unipc, order=3),
                lambda: UniPCMultistepScheduler(trained_betas=BETAS, solver_order=3, solver_type="bh2")),
    "unipc_1": (partial(S.unipc, order=1), lambda: UniPCMultistepScheduler(trained_betas=BETAS, solver_order=1)),
    "dpm_solver_pp_3m": (partial(S.dpm_solver_pp_3m, solver_type="midpoint"), lambda: DPMSolverMultistepScheduler(
        trained_betas=BETAS, algorithm_type="dpmsolver++", solver_order=3, final_sigmas_type="zero")),
    "singlestep_2": (S.dpm_solver_singlestep, lambda: DPMSolverSinglestepScheduler(trained_betas=BETAS,
                                                                                  solver_order=2)),
    "singlestep_3": (partial(S.dpm_solver_singlestep, order=3), lambda: DPMSolverSinglestepScheduler(
        trained_betas=BETAS, solver_order=3)),
    "singlestep_3_heun": (partial(S.dpm_solver_singlestep, order=3, solver_type="heun"),
                          lambda: DPMSolverSinglestepScheduler(trained_betas=BETAS, solver_order=3,
                                                               solver_type="heun")),
    "singlestep_3_lower_final": (partial(S.dpm_solver_singlestep, order=3, lower_order_final=True),
                                 lambda: DPMSolverSinglestepScheduler(trained_betas=BETAS, solver_order=3,
                                                                      lower_order_final=True)),
    "singlestep_2_eps": (partial(S.dpm_solver_singlestep, noise_prediction=True, lower_order_final=True),
                         lambda: DPMSolverSinglestepScheduler(trained_betas=BETAS, solver_order=2,
                                                              algorithm_type="dpmsolver",
                                                              final_sigmas_type="sigma_min", lower_order_final=True)),
    "deis_2": (S.deis, lambda: DEISMultistepScheduler(trained_betas=BETAS, solver_order=2)),
    "deis_3": (partial(S.deis, order=3), lambda: DEISMultistepScheduler(trained_betas=BETAS, solver_order=3)),
}


@pytest.mark.parametrize("steps", [6, 10, 20])
@pytest.mark.parametrize("name", VP)
def test_vp_space_schedulers_call_for_call(name, steps):
    ours, make = VP[name]
    sched = make()
    sched.set_timesteps(steps)
    if not name.startswith("dpm_solver"):  # its levels in float64: the same diffusers code, without float32 rounding
        sched.sigmas = sched.sigmas.double()
    if name.startswith(("dpm_solver_pp_3m", "deis")) and steps >= 15:
        ours = partial(ours, lower_order_final=False)  # diffusers lowers the final orders only below 15 steps
    g, sigmas = gaussian(), sched.sigmas.double()
    x = float(sigmas[0]) * torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs_calls, theirs_out = run_vp(sched, g, x)
    rec = Recorded(g)
    out = ours(rec, x, sigmas)
    # DPMSolverMultistep rounds its sample to float32 in every step
    compare(rec.calls, out, theirs_calls, theirs_out, 2e-5 if name.startswith("dpm_solver") else 1e-10)


def test_lms_matches_lms_discrete_scheduler():
    sched = LMSDiscreteScheduler(trained_betas=BETAS)
    sched.set_timesteps(12)
    sched.sigmas = sched.sigmas.double()
    g, sigmas = gaussian(), sched.sigmas.double()
    x = float(sigmas[0]) * torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs_calls, theirs_out = run_ve(sched, g, x)
    rec = Recorded(g)
    compare(rec.calls, S.lms(rec, x, sigmas), theirs_calls, theirs_out, 1e-10)  # its quadrature is exact on cubics


def test_euler_ancestral_matches_its_scheduler_draw_for_draw():
    """Both draw randn of the sample's shape and dtype from the same generator, once per step."""
    sched = EulerAncestralDiscreteScheduler(trained_betas=BETAS)
    sched.set_timesteps(12)
    g, sigmas = gaussian(), sched.sigmas.double()
    x = float(sigmas[0]) * torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs_calls, theirs_out = run_ve(sched, g, x, generator=torch.Generator().manual_seed(5))
    rec = Recorded(g)
    out = S.euler_ancestral(rec, x, sigmas, generator=torch.Generator().manual_seed(5))
    compare(rec.calls, out, theirs_calls, theirs_out, 1e-6)  # it steps its sample in float32


def test_dpm_solver_sde_matches_its_scheduler_on_the_same_brownian_tree():
    """Two calls per step (the second at the lambda-midpoint); the noise is diffusers' own Brownian tree, seeded alike."""
    sched = DPMSolverSDEScheduler(trained_betas=BETAS, noise_sampler_seed=11)
    sched.set_timesteps(8)
    sched.sigmas = sched.sigmas.double()  # so its tree is queried at the float64 levels ours computes
    g, inter = gaussian(), sched.sigmas.double()
    sigmas = torch.cat([inter[:1], inter[1::2]])
    x = float(sigmas[0]) * torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs_calls, theirs_out = run_ve(sched, g, x)
    tree = BrownianTreeNoiseSampler(x, float(sched.sigmas[sched.sigmas > 0].min()), float(sched.sigmas.max()), 11)
    rec = Recorded(g)
    out = S.dpm_solver_pp_sde(rec, x, sigmas, noise=lambda *_: lambda a, b: tree(torch.tensor(a, dtype=torch.float64),
                                                                             torch.tensor(b, dtype=torch.float64)))
    compare(rec.calls, out, theirs_calls, theirs_out, 1e-10)
