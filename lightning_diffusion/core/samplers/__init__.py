"""Sampling: grids (where the denoiser is evaluated), PF-ODE solvers and the samplers that run on a process's grid.

Three catalogs, kept apart as in Karras et al. 2022 (Table 1) and k-diffusion, each one signature:

* grids      `grid(process, steps) -> times` (`grids`)
* solvers    `solver(denoiser_tilde, x~, sigmas, generator=None) -> x~` in EDM's scaled space, run by `pf_ode`:
             single-stage and Runge-Kutta (`solvers`), multistep (`multistep`), singlestep (`singlestep`) and the
             stochastic ones of k-diffusion (`ancestral_sde`, with the noise sources of `brownian`)
* samplers   `sampler(denoiser, process, x, times, generator=None) -> x` (`stochastic`, `edm_ablation`, and
             `solvers.pf_ode`)

`generate(sampler, grid, denoiser, process, shape)` draws the prior and runs a sampler on a grid (`generate`). Hydra
picks each by `_target_` with `_partial_: true` (conf/sampler/, conf/grid/).
"""

from .ancestral_sde import (ancestral_levels, dpm_solver_pp_2m_sde, dpm_solver_pp_2s_ancestral, dpm_solver_pp_3m_sde,
                            dpm_solver_pp_sde, euler_ancestral)
from .brownian import BrownianTree, brownian_noise, gaussian_noise
from .edm_ablation import edm_ablation
from .generate import CountingDenoiser, classifier_free_guidance, count_nfe, generate, steps_for_nfe
from .grids import (geometric_times, iddpm_levels, iddpm_times, karras_sigmas, karras_times, logsnr_times,
                    sigmas_of_times,
                    strided_times, time_quadratic_times, times_of_sigmas, uniform_times, vp_times)
from .multistep import deis, dpm_solver_pp_2m, dpm_solver_pp_3m, dpm_solver_pp_multistep, ipndm, lms, unipc
from .singlestep import dpm_2, dpm_solver_singlestep
from .solvers import euler, heun, pf_ode, rk45, scaled_denoiser
from .stochastic import (ancestral, ancestral_step, annealed_langevin, ddim, ddim_step, euler_maruyama,
                         euler_maruyama_step, learned_variance, predictor_corrector, reverse_diffusion_step)

__all__ = ["BrownianTree", "CountingDenoiser", "ancestral", "ancestral_levels", "ancestral_step", "annealed_langevin",
           "brownian_noise", "classifier_free_guidance", "count_nfe", "ddim", "ddim_step", "deis", "dpm_2",
           "dpm_solver_pp_2m", "dpm_solver_pp_2m_sde", "dpm_solver_pp_2s_ancestral", "dpm_solver_pp_3m",
           "dpm_solver_pp_3m_sde", "dpm_solver_pp_multistep", "dpm_solver_pp_sde", "dpm_solver_singlestep",
           "edm_ablation", "euler", "euler_ancestral", "euler_maruyama", "euler_maruyama_step", "gaussian_noise",
           "generate", "geometric_times", "heun", "iddpm_levels", "iddpm_times", "ipndm", "karras_sigmas",
           "karras_times", "learned_variance", "lms", "logsnr_times", "pf_ode", "predictor_corrector", "reverse_diffusion_step",
           "rk45", "scaled_denoiser", "sigmas_of_times", "steps_for_nfe", "strided_times", "time_quadratic_times", "times_of_sigmas",
           "uniform_times", "unipc", "vp_times"]
