"""Optimised grids of a trained model: searched by one command, saved beside the checkpoint, picked up by name, and
refused for another checkpoint, sampler, step count or process before any network call."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from helpers import FAST, ROOT, compose_config, entry_point_env
from lightning_diffusion.core import samplers as S
from lightning_diffusion.core.processes import VPSDE, ddpm, linear_betas
from lightning_diffusion.core.samplers.optimize import LogSigmaGrid
from lightning_diffusion.lightning.checkpoints import load_model
from lightning_diffusion.lightning.optimized_grids import grid_path, optimize_checkpoint_grid, optimized_times
from lightning_diffusion.sample import sample
from lightning_diffusion.train import train


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """A class-conditional DDPM on the moons, trained for a few steps (a model, not a good one)."""
    run_dir = tmp_path_factory.mktemp("toy_run")
    train(compose_config(FAST + ["data=moons", "network=mlp", "trainer.max_steps=4", "callbacks.final_samples=null",
                             "callbacks.sample_grid=null"], run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def search(ckpt, sampler="unipc", nfe=5, **kwargs):
    cfg = compose_config([f"sampler={sampler}"])
    return optimize_checkpoint_grid(str(ckpt), sampler, cfg.sampler, cfg.grid, nfe, n=32, iterations=12,
                                    reference_steps=16, **kwargs)


@pytest.fixture(scope="module")
def searched(toy_checkpoint):
    return search(toy_checkpoint)


def test_search_lowers_the_error_and_writes_the_grid_beside_the_checkpoint(toy_checkpoint, searched):
    path, record = searched
    assert path == toy_checkpoint.parent.parent / "grids" / "unipc-nfe5.json" and path.is_file()
    saved = json.loads(path.read_text())
    assert saved["steps"] == 5 and saved["nfe_used"] == 5 and len(saved["times"]) == 6
    assert saved["error"] <= saved["start_error"] and saved["evaluations"] <= 12 + 2
    assert saved["error"] < 0.9 * saved["start_error"], saved  # the search moved the grid somewhere better
    model, _ = load_model(toy_checkpoint)
    times = optimized_times(model.process, name="unipc-nfe5", ckpt_path=str(toy_checkpoint), sampler="unipc")
    assert times.tolist() == saved["times"] and (times[1:] < times[:-1]).all() and times[-1] == 0


def test_the_grid_is_refused_for_another_checkpoint_sampler_nfe_or_process(toy_checkpoint, searched):
    model, _ = load_model(toy_checkpoint)
    grid = {"name": "unipc-nfe5", "ckpt_path": str(toy_checkpoint)}
    other = toy_checkpoint.parent / "other.ckpt"
    state = torch.load(toy_checkpoint, weights_only=False)
    state["global_step"] += 1
    torch.save(state, other)
    with pytest.raises(ValueError, match=r"optimised for checkpoint .*last\.ckpt .* not for .*other\.ckpt"):
        optimized_times(model.process, **{**grid, "ckpt_path": str(other)})
    with pytest.raises(ValueError, match="optimised for sampler=unipc, not sampler=heun"):
        optimized_times(model.process, sampler="heun", **grid)
    with pytest.raises(ValueError, match=r"optimised for nfe=5 \(5 steps\), not nfe=10"):
        optimized_times(model.process, nfe=10, **grid)
    with pytest.raises(ValueError, match="optimised on DiscreteDDPM.*not on VPSDE"):
        optimized_times(VPSDE(), **grid)
    with pytest.raises(FileNotFoundError, match="make it with `python -m lightning_diffusion.optimize_grid"):
        optimized_times(model.process, name="heun-nfe7", ckpt_path=str(toy_checkpoint))
    with pytest.raises(ValueError, match="nfe=0"):
        search(toy_checkpoint, nfe=0)


def test_grid_config_samples_with_it_and_refuses_before_any_network_call(toy_checkpoint, searched, tmp_path):
    common = ["sampler=unipc", "grid=optimized", "grid.name=unipc-nfe5", f"ckpt_path={toy_checkpoint}",
              f"out_dir={tmp_path}", "n=8", "progress=false"]
    cfg = compose_config(common + [f"grid.ckpt_path={toy_checkpoint}"], config_name="sample")
    out = sample(cfg)
    assert int(np.load(out)["nfe"]) == 5
    model, _ = load_model(toy_checkpoint)
    calls = S.CountingDenoiser(lambda x, t: pytest.fail("a network call"))
    wrong = compose_config(common[1:] + ["sampler=heun", f"grid.ckpt_path={toy_checkpoint}"], config_name="sample")
    with pytest.raises(ValueError, match="not sampler=heun"):
        S.generate(instantiate(wrong.sampler), instantiate(wrong.grid), calls, model.process, (2, 2))
    assert calls.nfe == 0


@pytest.mark.slow
def test_optimize_grid_entry_point(toy_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(toy_checkpoint.parent.parent, run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    done = subprocess.run([sys.executable, "-m", "lightning_diffusion.optimize_grid", f"ckpt_path={ckpt}",
                           "sampler=dpm_solver_pp_3m", "nfe=6", "n=16", "iterations=6", "reference_steps=8"],
                          capture_output=True, text=True, cwd=ROOT, env=entry_point_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dpm_solver_pp_3m-nfe6.json" in done.stdout
    assert json.loads(grid_path(ckpt, "dpm_solver_pp_3m-nfe6").read_text())["steps"] == 6


def test_every_point_of_the_search_space_is_a_strictly_decreasing_grid():
    """Softmax gaps of -900 would underflow to 0 (two equal levels, which the sampler refuses mid-search): the
    floor keeps every candidate valid, and a grid's coordinates give it back."""
    process = ddpm(linear_betas, T=1000)
    start = S.logsnr_times(process, 10)
    param = LogSigmaGrid(process, start)
    for z in (np.full(param.free + 1, -900.0), np.r_[0.0, -900.0, -900.0, 900.0, np.zeros(param.free - 3)]):
        assert (torch.diff(param.times(z)) < 0).all()
    torch.testing.assert_close(param.times(param.coordinates(start)), start, rtol=0, atol=0.2)
