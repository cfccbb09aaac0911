"""Hydra + Lightning DDP on two CPU processes (gloo): one run directory, one config, one W&B run; the global batch."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import TESTS, entry_point_env

# two processes each: one xdist worker runs these and the SLURM tests (tests/cli/test_slurm.py), one after another
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("two_processes")]


def test_two_process_ddp_run_shares_one_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    env = entry_point_env(WANDB_MODE="offline")
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # a run dir of one's own: no `latest` beside it
    assert "world_size=2" in done.stdout + done.stderr or "MEMBER: 2/2" in done.stdout + done.stderr


def fit(tmp_path, name, devices):
    run_dir = tmp_path / name
    env = entry_point_env(PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1")
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


def rank_process(parent: int, rank: int) -> int | None:
    """The pid of the child of `parent` that Lightning's launcher started as LOCAL_RANK=`rank`, if running yet."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = proc.joinpath("environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"LOCAL_RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_a_signal_to_one_rank_stops_both_at_one_step_and_the_run_resumes(tmp_path):
    """SIGUSR1 to rank 1 only, at an arbitrary point of its step: the ranks agree on the step after it, save one
    last.ckpt together and exit 128 + 10; resumed on two ranks past the epoch's end, it ends bit-identical to an
    uninterrupted run (weights, EMA, Adam state). (Lightning's own handlers
    save and barrier inside the signal handler: here, that pairs with rank 0's gradient all-reduce and hangs.)"""
    run_dir = tmp_path / "run"
    env = entry_point_env(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "lightning_diffusion.train", "data=moons", "network=mlp", "logger=csv",
               "trainer.devices=2", "trainer.strategy=ddp", "trainer.limit_val_batches=0",
               "trainer.enable_progress_bar=false", "callbacks.sample_grid=null", "callbacks.final_samples=null",
               "callbacks.checkpoint.every_n_train_steps=20", "trainer.deterministic=true", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(command + ["trainer.max_steps=100000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 240
        while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        rank1 = rank_process(proc.pid, 1)
        assert rank1 is not None and proc.poll() is None, "no second rank running"
        time.sleep(1.0)
        os.kill(rank1, signal.SIGUSR1)
        output = proc.communicate(timeout=120)[0]
    finally:  # both ranks, also when the test fails (rank 1 is the launcher's child)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = re.findall(r"stopped by a signal at step (\d+)", output)
    assert proc.returncode == 128 + signal.SIGUSR1 and stopped, output[-3000:]
    step = torch.load(last, weights_only=False)["global_step"]
    assert step == int(stopped[0]) >= 20
    end = step + 40  # past the end of the epoch (36 steps)
    resumed = subprocess.run(command + [f"trainer.max_steps={end}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stdout + resumed.stderr
    straight = tmp_path / "straight"
    done = subprocess.run(command[:-1] + [f"trainer.max_steps={end}", f"hydra.run.dir={straight}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # exact resume on two ranks: each rank's random stream is in the checkpoint, not re-derived from rank 0's
    ours, theirs = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False) for d in (run_dir, straight))
    assert ours["global_step"] == theirs["global_step"] == end
    for key in ("state_dict", "current_model_state"):
        for name, value in theirs[key].items():
            assert torch.equal(ours[key][name], value), (key, name)
    for index, state in theirs["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(ours["optimizer_states"][0]["state"][index][name], value), (index, name)


def test_a_nonfinite_loss_on_one_rank_is_skipped_on_both(tmp_path):
    """model.nonfinite=skip under DDP: rank 1's loss is NaN in one step; both ranks skip that step together (a rank
    that skipped alone would leave the other waiting in the gradient all-reduce) and the run finishes finite."""
    run_dir = tmp_path / "run"
    env = entry_point_env(PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "lightning_diffusion.train", "data=moons", "network=mlp", "logger=csv",
               "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=8", "trainer.limit_val_batches=0",
               "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "callbacks.sample_grid=null",
               "callbacks.final_samples=null", "model.nonfinite=skip",
               "+callbacks.poison._target_=helpers.PoisonRankOne", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = pd.read_csv(run_dir / "csv" / "metrics.csv")["train/skipped_nonfinite_steps"].dropna()
    assert skipped.max() == 1, skipped
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_validation_whose_ranks_miss_different_logsnr_bins_does_not_hang(tmp_path):
    """The command that hung in validation (each rank's batch missed other logsnr bins, so the ranks logged other
    synced metrics and their collectives no longer paired, in the sanity check): it finishes; with one validation
    after the sanity check added (val_check_interval=15; the sanity check's metrics are never logged), its
    validation losses per bin are in the log."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "lightning_diffusion.train", "trainer=ddp", "logger=csv", "trainer.max_steps=30",
               "data.batch_size=512", "trainer.val_check_interval=1000", "callbacks.final_samples.n_per_class=2",
               "callbacks.final_samples.n_unconditional=16", "trainer.enable_progress_bar=false",
               "trainer.val_check_interval=15", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=tmp_path, env=entry_point_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 30
    log = pd.read_csv(run_dir / "csv" / "metrics.csv")
    assert any(c.startswith("val/loss_logsnr[") and log[c].notna().any() for c in log.columns)
