"""Quality per NFE on an exact oracle: energy distance to true samples of an 8-mode 2-D mixture, ours vs peers.

    python benchmarks/quality_per_nfe.py [--quick]

Every sampler gets the same exact denoiser (`GaussianMixture.denoiser`, Wiener filters mixed by posterior
responsibilities) on the same process, DDPM's linear betas with T = 1000, and the same prior draws (seeded).
diffusers' schedulers are fed that denoiser as an eps-prediction model at the noise level their own sample sits
at (the way tests/test_samplers_reference.py feeds them), so any difference is the schedule and the solver, not
the model. k-diffusion's Heun / DPM++(2M) are run the same way when k-diffusion is importable.
A sampler whose step count cannot hit an NFE exactly uses the most steps within it (Heun: 2n - 1, PC: 2n).
"""

import math

from functools import partial

import torch

from _common import arguments, header, table
from lightning_diffusion.core import samplers as S
from lightning_diffusion.core.distances import energy_distance
from lightning_diffusion.core.oracles import GaussianMixture
from lightning_diffusion.core.processes import ddpm, linear_betas

T = 1000


def mixture() -> GaussianMixture:
    """8 modes on a circle of radius 1.5, std 0.15 (the test suite's mixture; about unit variance)."""
    angle = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    return GaussianMixture.isotropic(1.5 * torch.stack([angle.cos(), angle.sin()], 1), 0.15)


# ---- ours: steps for a budget, then samplers.generate -------------------------------------------------------------


def ours(process):
    """name -> (steps for an NFE budget, sampler, grid(process, steps))."""
    sig = S.sigmas_of_times(process, torch.tensor([1.0, float(T)], dtype=torch.float64)).tolist()
    karras = partial(S.karras_times, sigma_min=sig[0], sigma_max=sig[1])  # diffusers' range
    ode = lambda solver: partial(S.pf_ode, solver=solver)  # noqa: E731
    one = lambda nfe: nfe  # noqa: E731
    return {
        "ancestral (strided)": (one, S.ancestral, S.strided_times),
        "ddim (strided)": (one, S.ddim, S.strided_times),
        "euler_maruyama (uniform)": (one, S.euler_maruyama, S.uniform_times),
        "predictor_corrector (uniform)": (lambda nfe: nfe // 2, S.predictor_corrector, S.uniform_times),
        "pf_ode euler (karras)": (one, ode(S.euler), karras),
        "pf_ode heun (karras)": (lambda nfe: (nfe + 1) // 2, ode(S.heun), karras),
        "pf_ode heun (strided)": (lambda nfe: (nfe + 1) // 2, ode(S.heun), S.strided_times),
        "pf_ode dpm_solver_pp_2m (karras)": (one, ode(S.dpm_solver_pp_2m), karras),
        "pf_ode dpm_solver_pp_2m (strided)": (one, ode(S.dpm_solver_pp_2m), S.strided_times),
    }


def run_ours(g, process, spec, nfe: int, n: int, seed: int):
    steps_of, sampler, grid = spec
    return S.generate(sampler, partial(grid, steps=steps_of(nfe)), g.denoiser(process), process, (n, 2),
                      generator=torch.Generator().manual_seed(seed))


# ---- diffusers: its scheduler loop, the oracle as eps-prediction ---------------------------------------------------


def diffusers_peers():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
    from diffusers.utils import logging
    logging.set_verbosity_error()
    betas = linear_betas(T).numpy()
    one = lambda nfe: nfe  # noqa: E731
    heun_steps = lambda nfe: (nfe + 1) // 2  # noqa: E731
    return {
        "diffusers DDIM (leading, default)": (one, "vp", lambda: DDIMScheduler(trained_betas=betas, clip_sample=False,
                                                                               set_alpha_to_one=True)),
        "diffusers DDIM (trailing)": (one, "vp", lambda: DDIMScheduler(trained_betas=betas, clip_sample=False,
                                                                       set_alpha_to_one=True,
                                                                       timestep_spacing="trailing")),
        "diffusers Euler (default)": (one, "ve", lambda: EulerDiscreteScheduler(trained_betas=betas)),
        "diffusers Euler (karras)": (one, "ve", lambda: EulerDiscreteScheduler(trained_betas=betas,
                                                                               use_karras_sigmas=True)),
        "diffusers Heun (default)": (heun_steps, "ve", lambda: HeunDiscreteScheduler(trained_betas=betas)),
        "diffusers Heun (karras)": (heun_steps, "ve", lambda: HeunDiscreteScheduler(trained_betas=betas,
                                                                                    use_karras_sigmas=True)),
        "diffusers DPMSolverMultistep 2M (default)": (one, "dpm", lambda: DPMSolverMultistepScheduler(
            trained_betas=betas, algorithm_type="dpmsolver++", solver_order=2)),
        "diffusers DPMSolverMultistep 2M (karras)": (one, "dpm", lambda: DPMSolverMultistepScheduler(
            trained_betas=betas, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    }


def run_diffusers(g, spec, nfe: int, n: int, seed: int):
    steps_of, space, make = spec
    sched = make()
    sched.set_timesteps(steps_of(nfe))
    x = float(sched.init_noise_sigma) * torch.randn((n, 2), generator=torch.Generator().manual_seed(seed),
                                                    dtype=torch.float64)
    for i, t in enumerate(sched.timesteps):
        sched.scale_model_input(x, t)  # diffusers' bookkeeping; the oracle takes x and the level directly
        if space == "vp":  # DDIM: x is at alpha = sqrt(alphabar_t) of its integer timestep
            ac = float(sched.alphas_cumprod[int(t)])
            a, s = math.sqrt(ac), math.sqrt(1 - ac)
            eps = (x - a * g.denoise(x, a, s)) / s
        elif space == "ve":  # Euler / Heun: x is x~ at its sigmas[i]; the model sees x~ / sqrt(1 + sigma^2)
            s = float(sched.sigmas[i])
            eps = (x - g.denoise(x, 1.0, s)) / s
        else:  # DPMSolverMultistep: x = alpha x~ with alpha = 1 / sqrt(1 + sigma~^2) at its sigmas[i]
            s = float(sched.sigmas[i])
            a = 1 / math.sqrt(1 + s**2)
            eps = (x - a * g.denoise(x / a, 1.0, s)) / (a * s)
        x = sched.step(eps, t, x).prev_sample.to(torch.float64)
    return x, len(sched.timesteps)


# ---- k-diffusion, when installed -----------------------------------------------------------------------------------


def kdiffusion_peers():
    try:
        from k_diffusion import sampling as K
    except ImportError:
        return None
    steps = {"heun": lambda nfe: (nfe + 1) // 2, "dpmpp_2m": lambda nfe: nfe}
    return {f"k-diffusion {name} (karras)": (steps[name], getattr(K, f"sample_{name}"), K.get_sigmas_karras)
            for name in steps}


def run_kdiffusion(g, process, spec, nfe: int, n: int, seed: int):
    steps_of, sample, get_sigmas = spec
    sig = S.sigmas_of_times(process, torch.tensor([1.0, float(T)], dtype=torch.float64)).tolist()
    sigmas = get_sigmas(steps_of(nfe), sig[0], sig[1], rho=7.0, device="cpu").to(torch.float64)
    counter = {"nfe": 0}

    def model(x, sigma):
        counter["nfe"] += 1
        return torch.stack([g.denoise(x[i:i + 1], 1.0, float(s)) for i, s in enumerate(sigma)])[:, 0] \
            if len(set(sigma.tolist())) > 1 else g.denoise(x, 1.0, float(sigma[0])).to(x.dtype)

    x = float(sigmas[0]) * torch.randn((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return sample(model, x, sigmas, disable=True), counter["nfe"]


def main():
    args = arguments(__doc__.splitlines()[0])
    header("Quality per NFE: energy distance to the exact 8-mode mixture (exact denoiser)", args.quick)
    nfes, n, seeds = ([5, 10], 100, [0]) if args.quick else ([5, 10, 20, 50], 2000, [0, 1, 2])
    g, process = mixture(), ddpm(linear_betas, T=T)
    references = {seed: g.sample(n, torch.Generator().manual_seed(1000 + seed)) for seed in seeds}

    def score(run) -> tuple[float, float, int]:
        """Mean and standard error over seeds of the energy distance, and the NFE used."""
        values, used = [], 0
        for seed in seeds:
            x, used = run(seed)
            values.append(float(energy_distance(x, references[seed])))
        v = torch.tensor(values)
        return float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0, used

    rows, best = [], {nfe: {"ours": None, "peer": None} for nfe in nfes}
    groups = [("ours", ours(process), lambda spec, nfe: lambda seed: run_ours(g, process, spec, nfe, n, seed))]
    groups.append(("peer", diffusers_peers(), lambda spec, nfe: lambda seed: run_diffusers(g, spec, nfe, n, seed)))
    kd = kdiffusion_peers()
    if kd:
        groups.append(("peer", kd, lambda spec, nfe: lambda seed: run_kdiffusion(g, process, spec, nfe, n, seed)))
    for side, catalog, runner in groups:
        for name, spec in catalog.items():
            row = [("**ours** " if side == "ours" else "") + name]
            for nfe in nfes:
                mean, err, used = score(runner(spec, nfe))
                row.append(f"{1e3 * mean:.2f} ± {1e3 * err:.2f}" + (f" ({used})" if used != nfe else ""))
                if best[nfe][side] is None or mean < best[nfe][side][1]:
                    best[nfe][side] = (name, mean, err)
            rows.append(row)
    if not kd:
        rows.append(["k-diffusion Heun / DPM++(2M)"] + ["not installed"] * len(nfes))
    floor = [float(energy_distance(g.sample(n, torch.Generator().manual_seed(2000 + s)), references[s])) for s in seeds]
    rows.append(["exact samples (the floor at this sample size)"]
                + [f"{1e3 * sum(floor) / len(floor):.2f}"] * len(nfes))
    table(f"energy distance x 1e3 (mean ± s.e. over {len(seeds)} seeds, {n} samples each; NFE used in brackets "
          "where below the budget)", ["sampler"] + [f"NFE {nfe}" for nfe in nfes], rows)

    verdicts = []
    for nfe in nfes:
        (on, om, oe), (pn, pm, pe) = best[nfe]["ours"], best[nfe]["peer"]
        verdict = "yes" if om <= pm else ("tie (within 2 s.e.)" if om - pm <= 2 * math.hypot(oe, pe) else "no")
        verdicts.append([nfe, f"{on}: {1e3 * om:.2f}", f"{pn}: {1e3 * pm:.2f}", verdict])
    table("goal: at every NFE our best sampler is at least as good as the best peer",
          ["NFE", "our best (x 1e3)", "best peer (x 1e3)", "ours <= peer?"], verdicts)


if __name__ == "__main__":
    main()
