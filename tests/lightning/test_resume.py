"""Exact resume at every kind of stop, epoch ends included, and signals acted on within a bound anywhere in the run.

The digits at batch 64 make 26 steps an epoch; the run trains 30. Each interrupted run is resumed with the same
command, and must end bit-identical (EMA and raw weights, Adam, loops) to the uninterrupted one, with its CSV history
whole. The stops: SIGKILL just after the periodic save on an epoch's last step, SIGTERM on an epoch's last step,
SIGUSR1 inside the validation that runs at an epoch's end, and SIGUSR1 mid-epoch inside a validation made slow on
purpose (that one must stop within the bound the README states: one validation batch, here 1 s, plus a save).
"""

import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from helpers import TESTS, entry_point_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS, EPOCH = 30, 26  # 1617 training digits / 64 = 26 batches an epoch (25.3, the last one short)
ARGS = [sys.executable, "-m", "lightning_diffusion.train", "data=digits", "data.batch_size=64", "network.channels=16",
        "logger=csv", "trainer.enable_progress_bar=false", "trainer.deterministic=true", "trainer.limit_val_batches=2",
        f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", "callbacks.sample_grid=null",
        "callbacks.final_samples=null", "callbacks.ema.half_life_steps=5", "grid.steps=10"]


def run(run_dir, *extra, check=True):
    env = entry_point_env(OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    done = subprocess.run(ARGS + [f"hydra.run.dir={run_dir}", *extra], env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return (ckpt["global_step"], ckpt["epoch"], ckpt["state_dict"], ckpt["current_model_state"],
            ckpt["optimizer_states"][0]["state"])


def assert_same(a, b):
    assert a[:2] == b[:2], (a[:2], b[:2])  # step and epoch
    for x, y in zip(a[2:], b[2:]):
        flat_x, flat_y = torch.utils._pytree.tree_leaves(x), torch.utils._pytree.tree_leaves(y)
        assert len(flat_x) == len(flat_y) and all(torch.equal(u, v) for u, v in zip(flat_x, flat_y))


def history(run_dir) -> list[int]:
    log = pd.read_csv(run_dir / "csv" / "metrics.csv")
    return sorted(log.dropna(subset=["train/loss"])["step"].astype(int).tolist())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    run(run_dir, f"trainer.val_check_interval={EPOCH}", f"callbacks.checkpoint.every_n_train_steps={EPOCH}")
    return run_dir


STOPS = {  # name -> (overrides of the interrupted run, the exit code it must end with)
    "SIGTERM on the epoch's last step": (["+callbacks.stop._target_=helpers.SignalAt", f"+callbacks.stop.step={EPOCH}",
                                          "+callbacks.stop.signum=15"], 128 + signal.SIGTERM),
    "SIGUSR1 in the validation at the epoch's end": (["+callbacks.stop._target_=helpers.SignalAt",
                                                      f"+callbacks.stop.step={EPOCH}", "+callbacks.stop.signum=10",
                                                      "+callbacks.stop.where=val"], 128 + signal.SIGUSR1),
}


@pytest.mark.parametrize("stop", STOPS)
def test_a_signal_at_an_epoch_end_resumes_bit_identical(stop, straight, tmp_path):
    overrides, code = STOPS[stop]
    common = [f"trainer.val_check_interval={EPOCH}", f"callbacks.checkpoint.every_n_train_steps={EPOCH}"]
    stopped = run(tmp_path, *common, *overrides, check=False)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert state(tmp_path)[0] == EPOCH  # last.ckpt holds the last completed step
    run(tmp_path, *common)
    assert_same(state(tmp_path), state(straight))
    assert history(tmp_path) == history(straight) == list(range(STEPS))  # every step logged once, across the resume


def test_sigkill_after_the_save_on_an_epochs_last_step_resumes_bit_identical(straight, tmp_path):
    """The save due on the epoch's last step is written at the epoch's end (a save inside that batch resumed into a
    miscounted epoch: steps 26.. counted as epoch 2 and shuffled as it)."""
    common = [f"trainer.val_check_interval={EPOCH}", f"callbacks.checkpoint.every_n_train_steps={EPOCH}"]
    env = entry_point_env(OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    proc = subprocess.Popen(ARGS + [f"hydra.run.dir={tmp_path}", *common], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last, deadline = tmp_path / "checkpoints" / "last.ckpt", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if last.exists() and state(tmp_path)[0] >= EPOCH:
            proc.kill()  # SIGKILL: no handler, no last words
            break
        time.sleep(0.05)
    proc.wait()
    assert state(tmp_path)[0] == EPOCH, "killed too late: the run went past the epoch"
    run(tmp_path, *common)
    assert_same(state(tmp_path), state(straight))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_in_a_slow_validation_stops_within_a_batch(signum, tmp_path):
    """Validation at step 20 takes 20 x 1 s: the signal is acted on after the batch it arrives in (a save and an exit
    within ~3 s here), with last.ckpt at step 20; the resumed run trains to its end."""
    env = entry_point_env(OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    extra = ["trainer.val_check_interval=20", "trainer.limit_val_batches=20", "data.val_fraction=0.9",
             "callbacks.checkpoint.every_n_train_steps=100", "+callbacks.slow._target_=helpers.SlowValidation"]
    proc = subprocess.Popen(ARGS + [f"hydra.run.dir={tmp_path}", *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "validating").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "validation never started"
        time.sleep(0.05)
    time.sleep(1.5)  # well inside the 20 s validation
    sent = time.monotonic()
    proc.send_signal(signum)
    code = proc.wait(timeout=60)
    waited = time.monotonic() - sent
    assert code == 128 + signum, proc.stderr.read()[-3000:]
    assert waited < 10, f"stopped {waited:.1f} s after the signal"  # measured ~2-3 s: the batch in flight + a save
    assert state(tmp_path)[0] == 20
    run(tmp_path, "trainer.val_check_interval=20", "trainer.limit_val_batches=2", "data.val_fraction=0.9",
        "callbacks.checkpoint.every_n_train_steps=100")
    assert state(tmp_path)[0] == STEPS


def catches(pid: int, *signums: int) -> bool:
    """Whether the process has handlers for all of `signums` (Linux: the SigCgt mask of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return all(mask >> (s - 1) & 1 for s in signums)


def test_a_signal_while_the_process_starts_stops_it_at_the_first_stop_point(tmp_path):
    """SIGUSR1 as soon as the entry point records signals (before torch is imported, long before fit): not the
    default action's death, but a stop at the first stop point (the sanity check's first validation batch), with
    last.ckpt written at step 0 and exit code 128 + 10; the same command then trains to the end."""
    env = entry_point_env(OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    proc = subprocess.Popen(ARGS + [f"hydra.run.dir={tmp_path}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not catches(proc.pid, signal.SIGTERM, signal.SIGUSR1):
        assert proc.poll() is None and time.monotonic() < deadline, "the entry point never recorded signals"
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    code, err = proc.wait(timeout=300), proc.stderr.read()
    assert code == 128 + signal.SIGUSR1 and "stopped by a signal at step 0" in err, err[-3000:]
    assert state(tmp_path)[0] == 0
    run(tmp_path)
    assert state(tmp_path)[0] == STEPS
