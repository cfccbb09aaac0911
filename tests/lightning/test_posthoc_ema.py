"""EDM2's post-hoc EMA in training: the callback's snapshots, their reconstruction against an EMA tracked directly,
the export command, resume, and the configs and sweep that drive it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import FAST, ROOT, compose_config, relative_distance
from lightning_diffusion.core.power_ema import SIGMA_REL_MAX, load_snapshots, reconstruct, sigma_rel_to_gamma
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.lightning.callbacks import PostHocEMA
from lightning_diffusion.lightning.checkpoints import export_posthoc_ema, load_model
from lightning_diffusion.lightning.sweep_runner import build_command, load_sweep
from lightning_diffusion.train import train

TRACKED, TARGET = (0.05, 0.10), 0.08  # the paper's pair, and a length between them to synthesise
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, SIGMA_REL_MAX, 0.5, float("nan")])
def test_a_tracked_length_outside_its_range_is_refused(sigma_rel):
    with pytest.raises(ValueError, match=f"sigma_rel={sigma_rel}"):
        PostHocEMA(sigma_rels=(0.05, sigma_rel))
    with pytest.raises(ValueError, match="snapshot_every must be a positive"):
        PostHocEMA(snapshot_every=0)


# ---- a 2-D toy training run ------------------------------------------------------------------------------------------
STEPS, EVERY = 200, 10
TOY = FAST + ["data=moons", "network=mlp", "network.hidden=64", "network.depth=2", "callbacks=posthoc_ema",
              "callbacks.sample_grid=null", "callbacks.final_samples=null",
              "callbacks.checkpoint.every_n_train_steps=100",
              "trainer.log_every_n_steps=50", "model.optimizer.lr=3e-3", "model.lr_warmup_steps=0",
              f"callbacks.posthoc_ema.snapshot_every={EVERY}",
              f"callbacks.posthoc_ema.sigma_rels=[{TRACKED[0]},{TRACKED[1]},{TARGET}]"]  # the third: ground truth


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("posthoc_toy")
    train(compose_config(TOY + [f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}"], run_dir))
    return run_dir


def split(snapshots, sigma_rel):
    """(snapshots of sigma_rel, the others)."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    mine = [math.isclose(s.gamma, gamma) for s in snapshots]
    return [s for s, m in zip(snapshots, mine) if m], [s for s, m in zip(snapshots, mine) if not m]


def test_toy_run_reconstruction_matches_the_directly_tracked_ema(toy_run):
    truth, basis = split(load_snapshots(toy_run / "posthoc_ema"), TARGET)
    assert [s.t for s in truth] == list(range(EVERY, STEPS + 1, EVERY)) and len(basis) == 2 * len(truth)
    state, info = reconstruct(basis, TARGET, return_info=True)
    direct = truth[-1].state_dict
    assert state.keys() == direct.keys()
    pair = [s.state_dict for s in basis if s.t == STEPS]
    error, spacing = relative_distance(state, direct), relative_distance(pair[0], pair[1])
    # 20 snapshot times fit the profile to 1.9e-3 (info["fit_error"]);
    # measured: error / spacing 1.2e-3, |error| / |w| 3e-5
    assert error < 2e-2 * spacing, (error, spacing, info["fit_error"])
    assert error < 1e-3 * relative_distance(direct, {k: torch.zeros_like(v) for k, v in direct.items()})


def test_reconstruction_command_writes_a_checkpoint_load_model_reads(toy_run, tmp_path):
    cfg = compose_config([f"run_dir={toy_run}", f"sigma_rel={TARGET}", f"metrics_dir={tmp_path}"],
                         config_name="posthoc_ema")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "lightning_diffusion.posthoc_ema", f"run_dir={toy_run}", f"sigma_rel={TARGET}",
            f"hydra.run.dir={tmp_path}"]
    subprocess.run(argv, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert Path(metrics["posthoc_ema/ckpt"]) == Path(cfg.out) and metrics["posthoc_ema/t"] == STEPS
    model, _ = load_model(cfg.out)
    expected = reconstruct(load_snapshots(toy_run / "posthoc_ema"), TARGET)  # all three profiles' snapshots
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    # written elsewhere, the checkpoint takes the run's config along so that it still loads
    out, _ = export_posthoc_ema(toy_run, TARGET, out=tmp_path / "elsewhere" / "ema.ckpt")
    assert (out.parent / "config.yaml").is_file() and load_model(out)[0] is not None


def test_resume_restores_the_tracked_profiles(toy_run, tmp_path):
    """Resume from last.ckpt (step 200) for one step: the average is beta * restored + (1 - beta) * new weights."""
    (tmp_path / "checkpoints").mkdir()
    ckpt = toy_run / "checkpoints" / "last.ckpt"
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(ckpt.read_bytes())
    stale = tmp_path / "posthoc_ema" / "step=000000999-sigma_rel=0.0500.pt"  # left behind by an abandoned run
    stale.parent.mkdir()
    stale.write_bytes(b"")
    cfg = compose_config(TOY + [f"trainer.max_steps={STEPS + 1}", "callbacks.ema=null"], tmp_path)
    datamodule, model, trainer = build(cfg)
    callback = next(c for c in trainer.callbacks if isinstance(c, PostHocEMA))
    saved = torch.load(ckpt, weights_only=False)["callbacks"][callback.state_key]
    assert saved["t"] == STEPS
    # weights_only=False: the checkpoint's hyper-parameters pickle the process object (our own file, trusted)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), weights_only=False)
    assert callback.t == STEPS + 1 and not stale.exists() and (stale.parent / "stale" / stale.name).exists()
    weights = model.state_dict()  # the raw weights after step 201 (no EMA callback to copy its average in)
    for before, after, gamma in zip(saved["averages"], callback.averages, callback.gammas):
        beta = (STEPS / (STEPS + 1)) ** (gamma + 1)
        for name, value in weights.items():
            torch.testing.assert_close(after[name], beta * before[name] + (1 - beta) * value)
    # the final (off-grid) snapshot was written at the end of training
    assert (tmp_path / "posthoc_ema" / f"step={STEPS + 1:09d}-sigma_rel={TARGET:.4f}.pt").is_file()


def test_configs_compose_and_the_sweep_runs_the_command():
    callbacks = compose_config(["callbacks=posthoc_ema", "data=moons", "network=mlp"], Path("/tmp/run")).callbacks
    assert {"ema", "checkpoint", "posthoc_ema"} <= set(callbacks)  # the default callbacks, extended
    assert list(callbacks.posthoc_ema.sigma_rels) == list(TRACKED)
    sweep = load_sweep(ROOT / "sweeps" / "posthoc_ema.yaml")
    argv = build_command(sweep, {"run_dir": "runs/x", "sigma_rel": 0.08})
    assert argv[-4:] == ["-m", "lightning_diffusion.posthoc_ema", "run_dir=runs/x", "sigma_rel=0.08"]
    cfg = compose_config(argv[-2:] + ["metrics_dir=null"], config_name="posthoc_ema")
    assert cfg.out == "runs/x/checkpoints/posthoc_ema-sigma_rel0.08.ckpt"
    # the file it writes goes on a command line unquoted: Hydra's override grammar takes no second "="
    assert compose_config([f"ckpt_path={cfg.out}"], config_name="sample").ckpt_path == cfg.out
    for sigma_rel in sweep["parameters"]["sigma_rel"]["values"]:
        sigma_rel_to_gamma(sigma_rel)  # every swept length is valid
