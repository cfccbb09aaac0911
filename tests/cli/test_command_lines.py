"""What a user types: a config error is its one line (the traceback only on request), every command reports it that
way, and a grid's steps change without naming a sampler."""

import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, compose_config
from lightning_diffusion.lightning.sampling import sampling_choice

# a constructor's complaint, raised as a ConfigError chained to Hydra's InstantiationException (~40 lines before)
BAD = ["-m", "lightning_diffusion.train", "model.label_dropout=1.5", "data=moons", "network=mlp", "logger=csv"]
MESSAGE = "ConfigError: model.label_dropout=1.5: label_dropout must be a probability in [0, 1], got 1.5"


def run(argv: list[str], tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline", **env})


def test_a_config_error_is_one_line_and_exit_status_2(tmp_path):
    out = run(BAD, tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert [line for line in out.stderr.splitlines() if line.startswith(MESSAGE)] and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 4, out.stderr  # the message, the hint, Lightning's "Seed set to"


def test_hydra_full_error_shows_the_traceback(tmp_path, monkeypatch):
    """In this process (the wrapper is the same code): the error propagates, so Hydra prints its whole traceback."""
    from lightning_diffusion.lightning.errors import ConfigError
    from lightning_diffusion.train import hydra_main

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["train.py", *BAD[2:], f"hydra.run.dir={tmp_path}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    with pytest.raises(ConfigError, match=re.escape(MESSAGE.removeprefix("ConfigError: "))):
        hydra_main()


def test_every_hydra_command_reports_through_the_one_wrapper():
    commands = [p for p in (ROOT / "lightning_diffusion").glob("*.py") if "@entry_point(" in p.read_text()]
    assert len(commands) >= 8
    assert not [p.name for p in (ROOT / "lightning_diffusion").rglob("*.py") if "hydra.main(" in p.read_text()
                and p.name != "errors.py"]


@pytest.mark.parametrize("command", ["sample", "evaluate", "sampler_table"])
def test_grid_steps_alone_change_the_runs_own_grid(command):
    """`sample ckpt_path=... grid.steps=20`, no sampler named: the run's sampler on its own grid with 20 steps (it was
    refused: "Key 'grid' is not in struct"); nothing given, the run's steps; a sampler named, its grid's."""
    run_cfg = compose_config(["model=ddpm"])  # ancestral on DDPM's strided grid, 100 steps
    choose = lambda *overrides: sampling_choice(compose_config(["ckpt_path=x", *overrides], config_name=command),
                                                run_cfg)
    sampler, grid = choose("grid.steps=20")
    assert sampler == run_cfg.sampler and grid._target_ == run_cfg.grid._target_ and grid.steps == 20
    assert choose()[1] == run_cfg.grid
    assert choose("sampler=heun")[1].steps == 18 and choose("sampler=heun", "grid.steps=7")[1].steps == 7
    assert choose("grid=karras", "grid.steps=5")[1].steps == 5
