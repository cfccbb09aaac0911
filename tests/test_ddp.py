"""Hydra + Lightning DDP on two CPU processes (gloo): one run directory, one config, one W&B run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
