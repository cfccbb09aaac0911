"""The README's main job, as a user runs it: default config, offline, CPU; its guided samples must be digits."""

import json
import subprocess
import sys

import pytest

from helpers import entry_point_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_default_job_trains_a_conditional_ddpm_whose_samples_are_digits(tmp_path):
    env = entry_point_env(WANDB_MODE="")
    env.pop("WANDB_API_KEY", None)  # no key: W&B must go offline by itself, never hang
    done = subprocess.run([sys.executable, "-m", "lightning_diffusion.train", "trainer.enable_progress_bar=false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "runs" / "ddpm-digits").iterdir() if not p.is_symlink()]
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()  # what sweeps/sampler_x_nfe.yaml reads
    assert not (run_dir / "train.log").exists(), "no empty Hydra job log"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final/classifier_accuracy"] >= 0.8, metrics
    for name in ("config.yaml", "checkpoints/last.ckpt", "samples/final.png", "effective_weighting.png"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B should have logged offline"
