"""Hydra + Lightning DDP on two CPU processes (gloo): one run directory, one config, one W&B run; the global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow


def test_two_process_ddp_run_shares_one_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    env.pop("SLURM_JOB_ID", None)
    command = [sys.executable, "-m", "lightning_diffusion.train", "data=moons", "network=mlp", "logger=wandb",
               "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=6", "trainer.val_check_interval=3",
               "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "callbacks.sample_grid.n=4",
               "callbacks.final_samples.n_unconditional=8", "callbacks.checkpoint.every_n_train_steps=3",
               f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "metrics.json").is_file()
    # one W&B run, whatever the number of processes, and no stray time-stamped run directories
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert "world_size=2" in done.stdout + done.stderr or "MEMBER: 2/2" in done.stdout + done.stderr


def fit(tmp_path, name, devices):
    run_dir = tmp_path / name
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    command = [sys.executable, "-m", "lightning_diffusion.train", "data=moons", "network=mlp", "logger=csv",
               "trainer.max_steps=300", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
               "trainer.enable_progress_bar=false", "callbacks.sample_grid=null", "callbacks.final_samples=null",
               "+callbacks.save_rank._target_=helpers.SaveRankState", f"hydra.run.dir={run_dir}"]
    if devices > 1:
        command += [f"trainer.devices={devices}", "trainer.strategy=ddp"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = pd.read_csv(run_dir / "csv" / "metrics.csv")[["step", "train/loss"]].dropna()
    return losses.set_index("step")["train/loss"], [torch.load(p, weights_only=False)
                                                     for p in sorted(run_dir.glob("rank*.pt"))]


def test_global_batch_two_processes_match_one(tmp_path):
    """data.batch_size is the global batch: two processes load half each and follow one process's loss curve;
    the EMA weights are the same on both ranks."""
    one, (single,) = fit(tmp_path, "one", 1)
    two, ranks = fit(tmp_path, "two", 2)
    assert single["batch_size"] == 256 and [r["batch_size"] for r in ranks] == [128, 128]
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
    # different noise draws and shards: the curves agree in their running means, not bit for bit
    smooth_one, smooth_two = one.rolling(50).mean().dropna(), two.rolling(50).mean().dropna()
    gap = ((smooth_one - smooth_two).abs() / smooth_one).max()
    print(f"largest relative gap of the 50-step running mean losses: {gap:.3f}")
    assert gap < 0.15, gap
