"""Reliability: non-finite steps, signals (stop after the step, last.ckpt), exact resume after SIGKILL, atomic saves."""

import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import wandb
from lightning.pytorch.utilities.exceptions import SIGTERMException

from helpers import FAST, compose_config, entry_point_env
from lightning_diffusion.lightning.builder import ConfigError, build

TOY = FAST + ["data=moons", "network=mlp", "trainer.max_steps=6", "trainer.val_check_interval=6"]


def poison_from(model, call: int):
    """Make the network return NaN from its `call`-th training evaluation on."""
    network, calls = model.denoiser.network, {"n": 0}
    forward = network.forward

    def poisoned(x, c_noise, labels=None):
        calls["n"] += torch.is_grad_enabled()
        out = forward(x, c_noise, labels)
        return out * float("nan") if calls["n"] >= call else out

    network.forward = poisoned


def test_nonfinite_loss_stops_and_keeps_the_good_checkpoint(tmp_path):
    datamodule, model, trainer = build(compose_config(TOY, tmp_path))
    poison_from(model, 4)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 3; the last good checkpoint is .*last.ckpt"):
        trainer.fit(model, datamodule=datamodule)
    good = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert good["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())


def test_nonfinite_loss_can_be_skipped_and_counted(tmp_path):
    datamodule, model, trainer = build(compose_config(TOY + ["model.nonfinite=skip", "callbacks.final_samples=null"],
                                                      tmp_path))
    poison_from(model, 4)
    trainer.fit(model, datamodule=datamodule)
    assert model.skipped_steps >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_nonfinite_policy_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="nonfinite must be 'stop' or 'skip', got 'ignore'"):
        build(compose_config(["data=moons", "network=mlp", "model.nonfinite=ignore"], tmp_path))


def test_last_checkpoint_holds_the_final_step(tmp_path):
    """max_steps 5 with a periodic save every 2 steps: last.ckpt is step 5, not the periodic step 4, and holds the
    raw weights to train on (not the EMA's, which it holds as state_dict)."""
    datamodule, model, trainer = build(compose_config(TOY + ["trainer.max_steps=5", "callbacks.final_samples=null"],
                                                      tmp_path))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    trainer.fit(model, datamodule=datamodule)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5
    raw, ema = last["current_model_state"], last["state_dict"]
    assert not all(torch.equal(raw[k], ema[k]) for k in raw)  # saved before the EMA was copied into the model
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # CheckpointOnSignal's handlers are gone


class SignalAtStep(L.Callback):
    """Sends this process `signum` at the end of step `step` (before CheckpointOnSignal's check when first)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_stops_after_its_step_with_a_checkpoint_and_marks_a_sweep_trial(tmp_path, monkeypatch, signum):
    """The signal at step 3, before any periodic save: last.ckpt is step 3, the exit code 128 + signal, the W&B sweep
    run is marked preempting; resumed, the run goes on writing last.ckpt (not last-v1.ckpt) to its end."""
    marked = []
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep")
    monkeypatch.setattr(wandb, "run", SimpleNamespace(mark_preempting=lambda: marked.append(True)))
    overrides = ["trainer.max_steps=6", "callbacks.final_samples=null", "callbacks.checkpoint.every_n_train_steps=100",
                 "+callbacks.preempt._target_=lightning_diffusion.lightning.callbacks.MarkPreempting"]
    datamodule, model, trainer = build(compose_config(TOY + overrides, tmp_path))
    trainer.callbacks.insert(0, SignalAtStep(3, signum))
    previous = signal.getsignal(signum)
    with pytest.raises(SIGTERMException) as stopped:
        trainer.fit(model, datamodule=datamodule)
    assert stopped.value.code == 128 + signum
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert marked == [True]
    assert signal.getsignal(signum) == previous  # the handlers are given back

    datamodule, model, trainer = build(compose_config(TOY + overrides, tmp_path))
    trainer.fit(model, datamodule=datamodule, ckpt_path=last)
    assert torch.load(last, weights_only=False)["global_step"] == 6
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return ckpt["global_step"], ckpt["state_dict"], ckpt["current_model_state"], ckpt["optimizer_states"][0]["state"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    """Megatron-style: killed at a random step (SIGKILL) and resumed == uninterrupted, weights, EMA and Adam state.

    Batch 32: one epoch is 51 steps; the kill falls mid-epoch (data position restored by StatefulDataLoader, the
    RNG by the checkpoint) and the resumed run crosses into the second epoch, whose shuffle must match too.
    """
    steps, every = 63, 3  # last.ckpt is written every 3 steps, so at step 63
    args = [sys.executable, "-m", "lightning_diffusion.train", "data=digits", "data.batch_size=32",
            "network.channels=16", "logger=csv",
            "trainer.enable_progress_bar=false", "trainer.deterministic=true", "trainer.limit_val_batches=0",
            "trainer.log_every_n_steps=1", f"callbacks.checkpoint.every_n_train_steps={every}",
            "callbacks.final_samples=null", "callbacks.sample_grid=null", "callbacks.ema.half_life_steps=5"]
    env = entry_point_env(OMP_NUM_THREADS="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(args + [f"trainer.max_steps={steps}", f"hydra.run.dir={straight}"], env=env, check=True,
                   capture_output=True, timeout=600)
    kill_after = random.Random(1).randint(10, 45)  # checkpoints seen before the kill (before the epoch ends at 51)
    proc = subprocess.Popen(args + [f"trainer.max_steps={steps}", f"hydra.run.dir={killed}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=False)["global_step"] >= kill_after:
            proc.kill()  # SIGKILL: no handler, no last words
            break
        time.sleep(0.05)
    proc.wait()
    killed_at = torch.load(last, weights_only=False)["global_step"]
    assert killed_at < steps, "the run finished before it could be killed"
    subprocess.run(args + [f"trainer.max_steps={steps}", f"hydra.run.dir={killed}"], env=env, check=True,
                   capture_output=True, timeout=600)
    a, b = final_state(straight), final_state(killed)
    assert a[0] == b[0] == steps
    for x, y in zip(a[1:], b[1:]):  # EMA weights, raw weights, Adam moments: bit for bit
        flat_x, flat_y = torch.utils._pytree.tree_leaves(x), torch.utils._pytree.tree_leaves(y)
        assert all(torch.equal(u, v) for u, v in zip(flat_x, flat_y))


def test_truncated_or_foreign_checkpoint_is_refused(tmp_path):
    from lightning_diffusion.lightning.checkpoints import resolve_ckpt_path

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {}, "global_step": 3, "loops": {}, "optimizer_states": []}, good)
    assert resolve_ckpt_path(str(good), tmp_path) == str(good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated.ckpt cannot be read"):
        resolve_ckpt_path(str(truncated), tmp_path)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.ckpt is not a lightning_diffusion training checkpoint"):
        resolve_ckpt_path(str(foreign), tmp_path)


SAVE_FOREVER = """
import sys, torch
from lightning_diffusion.lightning.checkpoints import AtomicCheckpointIO
path, io = sys.argv[1], AtomicCheckpointIO()  # what the trainer configs give ModelCheckpoint and the SLURM requeue
for version in range(1, 10_000):
    io.save_checkpoint({"version": version, "weights": torch.full((32_000_000,), float(version))}, path)
    print(version, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    """A 128 MB checkpoint rewritten in a loop and SIGKILLed at random moments: the file on disk is always a whole
    checkpoint, the last one finished or the next. The system temp folder is put on another filesystem (/dev/shm),
    as on clusters, where Lightning's own save (staged there, then copied) left a truncated file 1 time in 6."""
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "TMPDIR": "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)}
    for seed in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True,
                                env=env)
        finished = int(proc.stdout.readline())  # one whole save done
        time.sleep(random.Random(seed).uniform(0.05, 0.5))  # now most likely inside a save
        proc.kill()
        proc.wait()
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["version"] >= finished
        assert torch.equal(checkpoint["weights"][[0, -1]], torch.full((2,), float(checkpoint["version"])))
    # at most the temporary file of the killed save is left, hidden, and the next save removes it
    assert all(p.name.startswith(".last.ckpt.") for p in tmp_path.iterdir() if p != path)
