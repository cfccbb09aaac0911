"""Optimised time grids of a trained model: searched once per (checkpoint, sampler, NFE), saved beside the checkpoint
as <run_dir>/grids/<sampler>-nfe<N>.json, and read back as a grid (`grid=optimized grid.name=<sampler>-nfe<N>`) that
refuses to serve another checkpoint, sampler, step count or process.

The search is `core.samplers.optimize.optimize_times`: the model's (guided) denoiser, a few hundred prior draws, a
many-step Heun solve of the same PF-ODE from them as the reference, and the grid moved to land nearest it.
"""

import functools
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..core.processes import Process
from ..core.samplers import CountingDenoiser, count_nfe, heun, karras_times, pf_ode, steps_for_nfe
from ..core.samplers.optimize import optimize_times
from .artifacts import atomic_write, sha256_file
from .checkpoints import find_run_config, load_model
from .metrics.sharding import class_labels
from .progress import progress_bar


def grid_path(ckpt_path, name: str) -> Path:
    """<run_dir>/grids/<name>.json for the run the checkpoint belongs to."""
    return find_run_config(ckpt_path).parent / "grids" / f"{name}.json"


def optimized_times(process: Process, steps: int | None = None, *, name: str, ckpt_path: str,
                    sampler: str | None = None, nfe: int | None = None) -> torch.Tensor:
    """The grid `optimize_grid` saved as <run_dir>/grids/<name>.json, after checking it was made for this checkpoint
    (its SHA-256), this process, and the sampler and NFE named (when given); ValueError otherwise.

    `steps` is the grid contract's and is not used: the saved grid has its own (the sampler configs set grid.steps
    for their own grids).
    """
    path = grid_path(ckpt_path, name)
    if not path.is_file():
        raise FileNotFoundError(f"no optimised grid {path}: make it with `python -m lightning_diffusion.optimize_grid "
                                f"ckpt_path={ckpt_path} sampler=<name> nfe=<N>`")
    record = json.loads(path.read_text())
    digest = sha256_file(ckpt_path)
    if record["checkpoint_sha256"] != digest:
        raise ValueError(f"{path} was optimised for checkpoint {record['checkpoint']} (sha256 "
                         f"{record['checkpoint_sha256'][:12]}), not for {ckpt_path} (sha256 {digest[:12]})")
    if sampler is not None and sampler != record["sampler"]:
        raise ValueError(f"{path} was optimised for sampler={record['sampler']}, not sampler={sampler}")
    if nfe is not None and nfe != record["nfe"]:
        raise ValueError(f"{path} was optimised for nfe={record['nfe']} ({record['steps']} steps), not nfe={nfe}")
    if record["process"] != repr(process):
        raise ValueError(f"{path} was optimised on {record['process']}, not on {process!r}")
    return torch.tensor(record["times"], dtype=torch.float64)


def optimize_checkpoint_grid(ckpt_path: str, sampler_name: str, sampler_cfg: DictConfig, grid_cfg: DictConfig,
                             nfe: int, n: int = 256, seed: int = 0, iterations: int = 100,
                             reference_steps: int = 128, guidance_scale: float | None = None,
                             device: str = "cpu", progress: bool = True) -> tuple[Path, dict]:
    """Search the grid of `sampler_cfg` at the most steps within `nfe` for the checkpoint's model and save it.

    Candidates: the sampler's own grid (`grid_cfg`) and EDM's rho-grid with rho = 3, 5, 7 at those steps. Class-
    conditional models are guided as they sample (labels 0..C-1 cycled, the model's guidance scale by default).
    """
    if nfe < 1 or n < 1 or iterations < 1 or reference_steps < 2:
        raise ValueError(f"need nfe, n, iterations >= 1 and reference_steps >= 2, got nfe={nfe}, n={n}, "
                         f"iterations={iterations}, reference_steps={reference_steps}")
    model, _ = load_model(ckpt_path, device=device)
    sampler, grid = instantiate(sampler_cfg), instantiate(grid_cfg)
    process = model.process
    steps = steps_for_nfe(sampler, grid, process, nfe)
    candidates = [grid(process, steps=steps)] + [karras_times(process, steps, rho=rho) for rho in (3.0, 5.0, 7.0)]
    candidates = [c for c in candidates if len(c) == steps + 1]
    generator = torch.Generator().manual_seed(seed)
    reference_grid = karras_times(process, reference_steps)
    # the bar counts network evaluations: the reference solve, then a sampler run per candidate and per iteration
    total = (count_nfe(functools.partial(pf_ode, solver=heun), lambda p: reference_grid, process)
             + (len(candidates) + iterations) * count_nfe(sampler, lambda p: candidates[0], process))
    with torch.no_grad(), progress_bar(total, f"optimising the {sampler_name} grid for nfe={nfe}", progress,
                                       "NFE") as bar:
        guided = model.guided_denoiser(class_labels(n, model.num_classes, model.device), guidance_scale)
        denoiser = CountingDenoiser(guided, lambda _: bar.update())
        x = process.prior_std() * torch.randn((n, *model.sample_shape), generator=generator,
                                              dtype=torch.float64).to(device)
        reference = pf_ode(denoiser, process, x, reference_grid, solver=heun)
        times, info = optimize_times(sampler, denoiser, process, x, reference, candidates, iterations)
    record = {"sampler": sampler_name, "nfe": nfe, "steps": steps, "times": times.tolist(),
              "nfe_used": count_nfe(sampler, lambda p: times, process), "checkpoint": str(Path(ckpt_path).resolve()),
              "checkpoint_sha256": sha256_file(ckpt_path), "process": repr(process),
              "sampler_config": OmegaConf.to_container(sampler_cfg, resolve=True),
              "start_grid_config": OmegaConf.to_container(grid_cfg, resolve=True), "n": n, "seed": seed,
              "iterations": iterations, "reference": f"heun on karras_times, {reference_steps} steps", **info}
    path = grid_path(ckpt_path, f"{sampler_name}-nfe{nfe}")
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return path, record

