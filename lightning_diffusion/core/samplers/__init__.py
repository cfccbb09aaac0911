"""Sampling: grids (where the denoiser is evaluated), PF-ODE solvers and the samplers that run on a process's grid.

Three catalogs, kept apart as in Karras et al. 2022 (Table 1) and k-diffusion, each one signature:

* grids      `grid(process, steps) -> times` (`grids`)
* solvers    `solver(denoiser_tilde, x~, sigmas, generator=None) -> x~` in EDM's scaled space, run by `pf_ode` (`solvers`)
* samplers   `sampler(denoiser, process, x, times, generator=None) -> x` (`stochastic`, and `solvers.pf_ode`)

`generate(sampler, grid, denoiser, process, shape)` draws the prior and runs a sampler on a grid (`generate`). Hydra
picks each by `_target_` with `_partial_: true` (conf/sampler/, conf/grid/).
"""

from .generate import CountingDenoiser, classifier_free_guidance, generate
from .grids import (geometric_times, karras_sigmas, karras_times, sigmas_of_times, strided_times, times_of_sigmas,
                    uniform_times)
from .solvers import dpm_solver_pp_2m, euler, heun, pf_ode, rk45, scaled_denoiser
from .stochastic import (ancestral, ancestral_step, annealed_langevin, ddim, ddim_step, euler_maruyama,
                         euler_maruyama_step, learned_variance, predictor_corrector, reverse_diffusion_step)

__all__ = ["CountingDenoiser", "ancestral", "ancestral_step", "annealed_langevin", "classifier_free_guidance", "ddim",
           "ddim_step", "dpm_solver_pp_2m", "euler", "euler_maruyama", "euler_maruyama_step", "generate",
           "geometric_times", "heun", "karras_sigmas", "karras_times", "learned_variance", "pf_ode",
           "predictor_corrector", "reverse_diffusion_step", "rk45", "scaled_denoiser", "sigmas_of_times",
           "strided_times", "times_of_sigmas", "uniform_times"]
