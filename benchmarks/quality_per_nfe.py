"""Quality per NFE: every sampler x grid of ours beside diffusers' schedulers and k-diffusion's samplers, each fed
the same exact (or the same trained) denoiser, on four problems.

    python benchmarks/quality_per_nfe.py [--quick] [--ckpt RUN/checkpoints/last.ckpt] [--extractor digits-cnn.pt]

Problems: an 8-mode 2-D mixture, a 64-D anisotropic Gaussian and a 16-mode 64-D mixture (exact denoisers; energy
distance x 1e3 to true samples), and the digits (a DDPM trained here for a few hundred CPU steps, or --ckpt;
Frechet distance in the offline digits-cnn feature space, trained here unless --extractor). All four on DDPM's
linear betas, T = 1000. A peer is run the way its library is used: diffusers' scheduler loop with the denoiser as an
eps-prediction model at the level its own sample sits at, k-diffusion's functions on the scaled denoiser. NFE counts
every denoiser call; a sampler whose step count cannot hit an NFE uses the most steps within it (bracketed).
"optimized" is ours: `optimize_times` on 400 (digits: 64) prior draws of another seed than the evaluation's.
The goal tables compare errors as the excess over the converged value (the score of a 256-step Heun solve of the
PF-ODE from the same prior draws, which every deterministic sampler tends to), since near convergence the raw
distances are the metric's own floor; on the digits, the distances themselves.
"""

import argparse
import importlib.util
import math
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from _common import arguments, compose, header, table
from lightning_diffusion.core import samplers as S
from lightning_diffusion.core.distances import energy_distance
from lightning_diffusion.core.oracles import Gaussian, GaussianMixture
from lightning_diffusion.core.processes import ddpm, linear_betas
from lightning_diffusion.core.samplers.optimize import optimize_times

T = 1000
PROCESS = ddpm(linear_betas, T=T)


# ---- problems: (denoiser(x, t), sample shape, score(samples, seed) -> float) ---------------------------------------


def oracle_problem(data: GaussianMixture, n: int, seeds: list[int]) -> dict:
    references = {seed: data.sample(n, torch.Generator().manual_seed(1000 + seed)) for seed in seeds}
    return {"denoiser_of": lambda n: data.denoiser(PROCESS), "shape": (data.dim,), "n": n,
            "score": lambda x, seed: 1e3 * float(energy_distance(x, references[seed])),
            "floor": 1e3 * float(np.mean([float(energy_distance(data.sample(n, torch.Generator().manual_seed(2000 + s)),
                                                                  references[s])) for s in seeds]))}


def mixture_2d() -> GaussianMixture:
    """8 modes on a circle of radius 1.5, std 0.15 (the test suite's mixture)."""
    angle = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    return GaussianMixture.isotropic(1.5 * torch.stack([angle.cos(), angle.sin()], 1), 0.15)


def gaussian_64d() -> Gaussian:
    """Eigenvalues log-spaced over 1e-2 .. 1, random axes, mean 0.3."""
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return Gaussian(torch.full((64,), 0.3, dtype=torch.float64), q @ torch.diag(torch.logspace(-2, 0, 64,
                                                                                               dtype=torch.float64)) @ q.T)


def mixture_64d() -> GaussianMixture:
    """16 modes at random points of norm 1 in 64-D, std 0.2 each."""
    means = torch.randn(16, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return GaussianMixture.isotropic(means / means.norm(dim=1, keepdim=True), 0.2)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets (Heusel et al. 2017, FID's formula)."""
    a, b = a.double().numpy(), b.double().numpy()
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * root))


def digits_problem(args, n: int, seeds: list[int], work: Path) -> tuple[dict, str]:
    """The trained digits model, guided as it samples, scored by the Frechet distance in digits-cnn features."""
    from lightning_diffusion.lightning.checkpoints import load_model
    from lightning_diffusion.lightning.data import DigitsDataModule
    from lightning_diffusion.lightning.metrics.digits_extractor import train_digits_extractor
    from lightning_diffusion.lightning.metrics.extractors import extract_features, load_extractor
    from lightning_diffusion.lightning.metrics.sharding import class_labels
    from lightning_diffusion.train import train

    ckpt, made = args.ckpt, []
    if ckpt is None:
        steps = 2 if args.quick else 400
        overrides = ["logger=csv", "trainer.enable_progress_bar=false", f"trainer.max_steps={steps}",
                     f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1", "callbacks.sample_grid=null",
                     "callbacks.final_samples=null"]
        train(compose(overrides, str(work / "digits")))
        ckpt, made = str(work / "digits" / "checkpoints" / "last.ckpt"), [f"DDPM trained here for {steps} steps"]
    weights = args.extractor
    if weights is None:
        weights = str(work / "digits-cnn.pt")
        train_digits_extractor(weights, epochs=1 if args.quick else 20)
        made.append("digits-cnn trained here")
    model, _ = load_model(ckpt)
    extractor = load_extractor("digits-cnn", weights, metrics=("fid",))
    real = extract_features(extractor, DigitsDataModule(seed=0).train_tensor())["64"]
    problem = {"denoiser_of": lambda n: model.guided_denoiser(class_labels(n, model.num_classes, model.device), None),
               "shape": tuple(model.sample_shape), "n": n,
               "score": lambda x, seed: frechet_distance(extract_features(extractor, x.float().clamp(-1, 1))["64"],
                                                         real), "floor": None, "opt_n": 32 if args.quick else 64,
               "reference_steps": 64}
    return problem, f"{ckpt} ({'; '.join(made) or 'given'})"


# ---- ours: (sampler, grid) pairs, steps for a budget ---------------------------------------------------------------

SOLVERS = {"euler": S.euler, "heun": S.heun, "dpm_2": S.dpm_2, "dpm_solver_pp_2m": S.dpm_solver_pp_2m,
           "dpm_solver_pp_3m": S.dpm_solver_pp_3m, "dpm_solver_3": partial(S.dpm_solver_singlestep, order=3),
           "unipc": S.unipc, "unipc_bh1": partial(S.unipc, variant="bh1"), "deis": partial(S.deis, order=3),
           "ipndm": S.ipndm, "lms": S.lms, "euler_ancestral": S.euler_ancestral,
           "dpm_solver_pp_2m_sde": S.dpm_solver_pp_2m_sde, "dpm_solver_pp_sde": S.dpm_solver_pp_sde}
GRIDS = {"karras": S.karras_times, "logsnr": S.logsnr_times, "uniform": S.uniform_times,
         "time_quadratic": S.time_quadratic_times, "iddpm": S.iddpm_times, "vp": S.vp_times,
         "strided": S.strided_times}
OPTIMIZED = ["unipc", "deis", "ipndm", "dpm_solver_pp_3m", "dpm_solver_pp_2m"]  # deterministic, multistep: 1 call/step


def ours(solvers, grids) -> dict:
    """`<solver> (<grid>)` -> (sampler, grid(process, steps)); `ancestral` is DDPM's own sampler on its steps."""
    catalog = {f"{name} ({grid})": (partial(S.pf_ode, solver=SOLVERS[name]), GRIDS[grid])
               for name in solvers for grid in grids}
    if "strided" in grids:
        catalog["ancestral (strided)"] = (S.ancestral, S.strided_times)
    return catalog


def steps_and_grid(sampler, grid, nfe: int):
    try:
        steps = S.steps_for_nfe(sampler, grid, PROCESS, nfe, max_steps=T)
    except ValueError:
        return None
    return partial(grid, steps=steps)


def optimized_grid(problem, sampler, nfe: int, iterations: int, reference_steps: int):
    """The grid optimize_times finds for this sampler and NFE from the catalog's candidates, on draws of seed 99."""
    steps = S.steps_for_nfe(sampler, S.karras_times, PROCESS, nfe)
    n = problem.get("opt_n", 400)
    x = torch.randn((n, *problem["shape"]), generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    denoiser = problem["denoiser_of"](n)
    with torch.no_grad():
        reference = S.pf_ode(denoiser, PROCESS, x, S.karras_times(PROCESS, reference_steps), solver=S.heun)
        candidates = [g(PROCESS, steps) for g in (S.karras_times, S.logsnr_times, S.uniform_times,
                                                  S.time_quadratic_times, partial(S.karras_times, rho=3.0))]
        times, _ = optimize_times(sampler, denoiser, PROCESS, x, reference, candidates, iterations)
    return lambda process: times


def run_ours(problem, sampler, grid, seed: int):
    with torch.no_grad():
        return S.generate(sampler, grid, problem["denoiser_of"](problem["n"]), PROCESS, (problem["n"], *problem["shape"]),
                          generator=torch.Generator().manual_seed(seed))


# ---- peers ---------------------------------------------------------------------------------------------------------

VE_SPACE = ("EulerDiscrete", "HeunDiscrete", "LMSDiscrete", "EulerAncestralDiscrete", "DPMSolverSDE")


# the peers that were best somewhere on the 2-D mixture, for the costlier problems (64-D, digits)
STRONG_PEERS = ["diffusers DDIM (default)", "diffusers LMS (default)", "diffusers DPMSolverMultistep 2M (default)",
                "diffusers DPMSolverMultistep 3M (default)", "diffusers DPMSolverSinglestep 3 (karras)",
                "diffusers UniPC bh2 (default)", "diffusers UniPC bh2 (exponential)", "diffusers UniPC bh1 p3 (default)",
                "diffusers DEIS 3 (default)", "diffusers DEIS 3 (karras)", "diffusers DEIS 3 (exponential)",
                "k-diffusion dpmpp_2m (karras)", "k-diffusion lms (karras)"]


def diffusers_peers(quick: bool) -> dict:
    """`diffusers <scheduler> (<spacing>)` -> (steps for an NFE, scheduler factory)."""
    import diffusers
    from diffusers.utils import logging
    logging.set_verbosity_error()
    betas = linear_betas(T).numpy()
    one, two = (lambda nfe: nfe), (lambda nfe: (nfe + 1) // 2)  # noqa: E731
    spacings = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
    schedulers = {  # name: (class, steps of an NFE, keywords, spacings it is run with)
        "DDIM": ("DDIMScheduler", one, {"clip_sample": False, "set_alpha_to_one": True}, ["default", "trailing"]),
        "DDPM": ("DDPMScheduler", one, {"clip_sample": False}, ["default"]),
        "Euler": ("EulerDiscreteScheduler", one, {}, ["default", "karras"]),
        "Heun": ("HeunDiscreteScheduler", two, {}, ["default", "karras"]),
        "LMS": ("LMSDiscreteScheduler", one, {}, ["default", "karras"]),
        "EulerAncestral": ("EulerAncestralDiscreteScheduler", one, {}, ["default"]),
        "DPMSolverMultistep 2M": ("DPMSolverMultistepScheduler", one, {"solver_order": 2}, list(spacings)),
        "DPMSolverMultistep 3M": ("DPMSolverMultistepScheduler", one, {"solver_order": 3}, list(spacings)),
        "DPMSolverSinglestep 3": ("DPMSolverSinglestepScheduler", one, {"solver_order": 3}, ["default", "karras"]),
        "UniPC bh2": ("UniPCMultistepScheduler", one, {}, list(spacings)),
        "UniPC bh1 p3": ("UniPCMultistepScheduler", one, {"solver_type": "bh1", "solver_order": 3,
                                                          "final_sigmas_type": "sigma_min"}, ["default", "karras"]),
        "DEIS 3": ("DEISMultistepScheduler", one, {"solver_order": 3}, list(spacings)),
        "DPMSolverSDE": ("DPMSolverSDEScheduler", two, {}, ["default", "karras"]),
    }
    if quick:
        schedulers = {k: v for k, v in schedulers.items() if k in ("DDIM", "Heun", "DPMSolverMultistep 2M", "UniPC bh2",
                                                                     "DPMSolverSDE")}
    peers = {}
    for name, (cls, steps, kwargs, names) in schedulers.items():
        for spacing in names:
            extra = {"timestep_spacing": "trailing"} if spacing == "trailing" else spacings.get(spacing, {})
            make = partial(getattr(diffusers, cls), trained_betas=betas, **kwargs, **extra)
            peers[f"diffusers {name} ({spacing})"] = (steps, make)
    return peers


def run_diffusers(problem, spec, nfe: int, seed: int):
    """diffusers' loop; the model is the scaled denoiser D~(x~; sigma~) presented as eps at its sample's level."""
    steps_of, make = spec
    sched = make()
    if type(sched).__name__ == "DPMSolverSDEScheduler":
        sched.config.noise_sampler_seed = seed
        sched.noise_sampler_seed = seed
    sched.set_timesteps(steps_of(nfe))
    den = S.scaled_denoiser(problem["denoiser_of"](problem["n"]), PROCESS)
    ve = type(sched).__name__.removesuffix("Scheduler") in VE_SPACE
    shape = (problem["n"], *problem["shape"])
    x = float(sched.init_noise_sigma) * torch.randn(shape, generator=torch.Generator().manual_seed(seed),
                                                    dtype=torch.float64)
    generator, calls = torch.Generator().manual_seed(seed + 1), 0
    for i, t in enumerate(sched.timesteps):
        if ve:  # x is x~ at the level of this call (DPMSolverSDE's second call: its midpoint)
            second = type(sched).__name__ == "DPMSolverSDEScheduler" and not sched.state_in_first_order
            s = float(sched.mid_point_sigma if second else sched.sigmas[sched.step_index or 0])
            a = 1.0
        elif hasattr(sched, "sigmas"):  # DPM-Solver, UniPC, DEIS: x = alpha x~ at sigmas[i]
            s = float(sched.sigmas[sched.step_index or 0])
            a = 1 / math.sqrt(1 + s**2)
        else:  # DDIM / DDPM: alphabar of its integer step
            ac = float(sched.alphas_cumprod[int(t)])
            a, s = math.sqrt(ac), math.sqrt((1 - ac) / ac)
        with torch.no_grad():
            d = den(x / a, torch.full((shape[0],), s, dtype=torch.float64))
        eps = (x / a - d) / s
        kwargs = {"generator": generator} if "generator" in sched.step.__code__.co_varnames else {}
        x = sched.step(eps.to(x.dtype), t, x, **kwargs).prev_sample.to(torch.float64)
        calls += 1
    return x, calls


def load_kdiffusion():
    """k_diffusion.sampling without its package __init__ (which imports its training stack), or None."""
    if importlib.util.find_spec("k_diffusion") is None:
        return None
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(importlib.util.find_spec("k_diffusion").submodule_search_locations)
        sys.modules["k_diffusion"] = package
    import k_diffusion.sampling
    return k_diffusion.sampling


def kdiffusion_peers(K, quick: bool) -> dict:
    one, two = (lambda nfe: nfe), (lambda nfe: (nfe + 1) // 2)  # noqa: E731
    fns = {"heun": (two, K.sample_heun, {}), "dpmpp_2m": (one, K.sample_dpmpp_2m, {}),
           "dpmpp_3m_sde eta=0": (one, K.sample_dpmpp_3m_sde, {"eta": 0.0}), "lms": (one, K.sample_lms, {}),
           "dpm_2": (two, K.sample_dpm_2, {}), "euler": (one, K.sample_euler, {})}
    if quick:
        fns = {k: v for k, v in fns.items() if k == "dpmpp_2m"}
    return {f"k-diffusion {name} (karras)": spec for name, spec in fns.items()}


def run_kdiffusion(problem, spec, nfe: int, seed: int):
    steps_of, sample, kwargs = spec
    lo, hi = PROCESS.sigma_tilde_range()
    sigmas = S.karras_sigmas(steps_of(nfe), lo, hi)  # = get_sigmas_karras, in float64
    den = S.CountingDenoiser(S.scaled_denoiser(problem["denoiser_of"](problem["n"]), PROCESS))
    x = hi * torch.randn((problem["n"], *problem["shape"]), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    with torch.no_grad():
        return sample(den, x, sigmas, disable=True, **kwargs), den.nfe


# ---- one problem's table -------------------------------------------------------------------------------------------


def evaluate(title: str, problem: dict, nfes, seeds, catalogs, iterations: int, optimized: list[str], quick: bool,
             better_only: bool = False) -> None:
    """The table of one problem (mean over seeds, NFE used in brackets where below) and its goal table (`verdict`)."""
    rows, best = [], {nfe: {"ours": None, "peer": None} for nfe in nfes}

    def record(side, name, nfe, values, used):
        mean = float(np.mean(values))
        if best[nfe][side] is None or mean < best[nfe][side][1]:
            best[nfe][side] = (name, mean, float(np.std(values) / math.sqrt(len(values))))
        return f"{mean:.2f}" + (f" ({used})" if used != nfe else "")

    for side, catalog, runner in catalogs:
        for name, spec in catalog.items():
            row = [("**ours** " if side == "ours" else "") + name]
            for nfe in nfes:
                run = runner(problem, spec, nfe)
                if run is None:
                    row.append("—")
                    continue
                outs = [run(seed) for seed in seeds]
                row.append(record(side, name, nfe, [problem["score"](x, s) for (x, _), s in zip(outs, seeds)],
                                  outs[0][1]))
            rows.append(row)
    for solver in optimized:
        sampler, row = partial(S.pf_ode, solver=SOLVERS[solver]), [f"**ours** {solver} (optimized)"]
        for nfe in nfes:
            grid = optimized_grid(problem, sampler, nfe, iterations, 16 if quick else problem.get("reference_steps", 256))
            outs = [run_ours(problem, sampler, grid, seed) for seed in seeds]
            row.append(record("ours", f"{solver} (optimized)", nfe,
                              [problem["score"](x, s) for (x, _), s in zip(outs, seeds)], outs[0][1]))
        rows.append(row)
    converged = converged_value(problem, seeds)
    rows.append(["the PF-ODE itself: 256 Heun steps from the same prior draws (the converged value)"]
                + [f"{converged:.2f}"] * len(nfes))
    if problem["floor"] is not None:
        rows.append(["exact samples (the floor at this sample size)"] + [f"{problem['floor']:.2f}"] * len(nfes))
    table(f"{title} (mean over {len(seeds)} seeds x {problem['n']} samples)",
          ["sampler (grid)"] + [f"NFE {nfe}" for nfe in nfes], rows)
    table(f"{title}: goal (ours <= peer?)", ["NFE", "our best", "best peer", "excess ours / peer", "goal", "met"],
          [verdict(nfe, best[nfe], converged, better_only) for nfe in nfes])


def converged_value(problem, seeds) -> float:
    """The score of the PF-ODE's own end points (a 256-step Heun solve from each seed's prior draws): what every
    deterministic sampler tends to as its NFE grows, and the zero of the error the goal compares."""
    values = []
    for seed in seeds:
        x = torch.randn((problem["n"], *problem["shape"]), generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
        with torch.no_grad():
            out = S.pf_ode(problem["denoiser_of"](problem["n"]), PROCESS, x, S.karras_times(PROCESS, 256),
                           solver=S.heun)
        values.append(problem["score"](out, seed))
    return float(np.mean(values))


def verdict(nfe: int, best: dict, converged: float, better_only: bool) -> list:
    """One goal row. The error is the excess over the converged value; at 5 and 10 NFE ours <= 0.8x the best peer's
    (`better_only`, the digits: a lower distance), at 20 and 50 no worse (or a tie within 2 s.e.)."""
    (on, om, oe), (pn, pm, pe) = best["ours"], best["peer"]
    excess_ours, excess_peer, noise = om - converged, pm - converged, 2 * math.hypot(oe, pe)
    ratio = excess_ours / excess_peer if excess_peer > 0 else math.inf
    low = nfe in (5, 10)
    if low and better_only:
        goal, met = "lower distance", "yes" if om < pm else f"no ({om:.2f} vs {pm:.2f})"
    elif low:
        goal = "excess <= 0.8x"
        met = "yes" if excess_ours <= 0.8 * excess_peer else (
            "not resolvable (the peer has converged)" if excess_peer <= noise else f"no (ratio {ratio:.2f})")
    else:
        goal, met = "no worse", "yes" if om <= pm else "tie (within 2 s.e.)" if om - pm <= noise else "no"
    return [nfe, f"{on}: {om:.2f}", f"{pn}: {pm:.2f}", f"{ratio:.2f}", goal, met]


def main():
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--ckpt", help="a trained digits checkpoint (default: train one here)")
    extra.add_argument("--extractor", help="digits-cnn weights (default: train them here)")
    extra.add_argument("--problems", default="2d,64d,digits", help="a comma list of 2d, 64d, digits")
    known, sys.argv[1:] = extra.parse_known_args()
    args = arguments(__doc__.splitlines()[0])
    args.ckpt, args.extractor, problems = known.ckpt, known.extractor, known.problems.split(",")
    header("Quality per NFE: ours (every sampler x grid) vs diffusers and k-diffusion, same denoiser", args.quick)
    quick = args.quick
    nfes, seeds = ([5, 10], [0]) if quick else ([5, 6, 8, 10, 15, 20, 50], [0, 1, 2])
    K = load_kdiffusion()

    def runners(solvers, grids, strong_only=False):
        peers = [("peer", diffusers_peers(quick), lambda p, spec, nfe: lambda seed: run_diffusers(p, spec, nfe, seed))]
        if K is not None:
            peers.append(("peer", kdiffusion_peers(K, quick), lambda p, spec, nfe: lambda seed:
                          run_kdiffusion(p, spec, nfe, seed)))
        if strong_only:
            peers = [(side, {k: v for k, v in catalog.items() if k in STRONG_PEERS}, run) for side, catalog, run in peers]
        return [("ours", ours(solvers, grids), lambda p, spec, nfe: (lambda g: None if g is None else (
                    lambda seed: run_ours(p, spec[0], g, seed)))(steps_and_grid(spec[0], spec[1], nfe)))] + peers

    few = ["dpm_solver_pp_2m", "unipc"]
    multistep = ["dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc", "deis", "ipndm"]
    if "2d" in problems:
        evaluate("2-D 8-mode mixture, energy distance x 1e3", oracle_problem(mixture_2d(), 100 if quick else 2000,
                                                                             seeds), nfes, seeds,
                 runners(few if quick else list(SOLVERS), ["karras", "logsnr"] if quick else list(GRIDS)),
                 5 if quick else 150, ["unipc"] if quick else OPTIMIZED, quick)
    if "64d" in problems and not quick:
        for title, data in (("64-D Gaussian, energy distance x 1e3", gaussian_64d()),
                            ("64-D 16-mode mixture, energy distance x 1e3", mixture_64d())):
            evaluate(title, oracle_problem(data, 400, [0]), nfes, [0],
                     runners(multistep, ["karras", "logsnr"], strong_only=True), 40, ["unipc", "ipndm"], quick)
    if "digits" in problems:
        with tempfile.TemporaryDirectory() as work:
            problem, source = digits_problem(args, 50 if quick else 300, [0], Path(work))
            print(f"digits model: {source}\n")
            evaluate("digits, Frechet distance in digits-cnn features", problem, [5, 10] if quick else [5, 10, 20, 50],
                     [0], runners(few if quick else multistep, ["logsnr"] if quick else ["karras", "logsnr"],
                                  strong_only=not quick),
                     3 if quick else 20, ["unipc"] if quick else ["unipc", "deis"], quick, better_only=True)

if __name__ == "__main__":
    main()
