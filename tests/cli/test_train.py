"""The Hydra entry points end to end: every config composes, a run leaves its run directory, resumes and samples EMA."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers import CONF, FAMILIES, FAST, compose_config
from lightning_diffusion.core.distances import energy_distance
from lightning_diffusion.lightning.builder import ConfigError, build
from lightning_diffusion.lightning.checkpoints import load_model, resolve_ckpt_path
from lightning_diffusion.lightning.data import DigitsDataModule
from lightning_diffusion.lightning.metrics.classifier import fit_classifier, label_accuracy
from lightning_diffusion.sample import sample
from lightning_diffusion.train import train

GROUPS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in ("data", "sampler")}
# the Hub ones, and those that need a file of the user's (trained from one in test_zip.py and test_latents.py)
OFFLINE_DATA = [d for d in GROUPS["data"] if d not in ("cifar10", "mnist", "image_folder", "edm_zip", "latents")]


def short(target: str) -> str:
    return target.rsplit(".", 1)[-1]


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("sampler", [None] + GROUPS["sampler"])
def test_every_model_and_sampler_config_builds(model, sampler, tmp_path):
    """The model gets the chosen sampler (or its family's) and the sampler's own grid, with the grid's steps; a pair
    that cannot sample (DDPM's integer grid on a continuous process) is refused when built, naming both choices."""
    overrides = [f"model={model}", "data=moons", "network=mlp"] + ([f"sampler={sampler}"] if sampler else [])
    cfg = compose_config(overrides, tmp_path)
    if short(cfg.grid._target_) == "strided_times" and model != "ddpm":
        with pytest.raises(ConfigError, match=f"model={model}.*sampler={sampler}, grid=strided.*strided_times needs"):
            build(cfg)
        return
    _, module, _ = build(cfg)
    assert module.sampler.func.__name__ == short(cfg.sampler._target_) and module.sample_shape == (2,)
    assert module.grid.func.__name__ == short(cfg.grid._target_)
    assert module.grid.keywords["steps"] == cfg.grid.steps and len(module.grid(module.process)) == cfg.grid.steps + 1


@pytest.mark.parametrize("data", OFFLINE_DATA)
def test_every_offline_data_config_trains_a_step(data, tmp_path):
    network = "mlp" if data not in ("digits", "digits16") else "unet_tiny"
    overrides = FAST + [f"data={data}", f"network={network}", "trainer.max_steps=2"]
    if data == "digits16":
        overrides.append("network.attn_resolutions=[8]")
    metrics = train(compose_config(overrides, tmp_path))
    assert math.isfinite(metrics["train/loss"]) and (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits_run")
    metrics = train(compose_config(FAST + ["trainer.max_steps=6"], run_dir))
    return run_dir, metrics


def test_main_job_leaves_its_run_directory(digits_run):
    run_dir, metrics = digits_run
    for name in ("config.yaml", "checkpoints/last.ckpt", "samples/final.png", "samples/final.npz", "metrics.json",
                 "csv/metrics.csv"):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["final/nfe"] == 100 and saved["final/num_samples"] == 10  # 100 strided ancestral steps, 1 per class
    # the accuracy logged is what a classifier of the real digits says of the samples saved
    final = np.load(run_dir / "samples" / "final.npz")
    images, labels = DigitsDataModule().train_tensor(labels=True)
    expected = label_accuracy(fit_classifier(images, labels), torch.from_numpy(final["samples"]),
                              torch.from_numpy(final["labels"]))
    assert metrics["final/classifier_accuracy"] == saved["final/classifier_accuracy"] == expected
    resolved = OmegaConf.load(run_dir / "config.yaml")
    assert resolved.data_meta.shape == [1, 8, 8] and resolved.data_meta.num_classes == 10


def test_checkpoint_holds_ema_weights_which_are_the_ones_sampled(digits_run):
    run_dir, _ = digits_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    model, _ = load_model(run_dir / "checkpoints" / "last.ckpt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, ema[name])


def test_resume_continues_from_last_checkpoint(digits_run, tmp_path):
    run_dir, _ = digits_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "last.ckpt").write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    cfg = compose_config(FAST + ["trainer.max_steps=8", "callbacks.final_samples=null"], resumed)
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path("last", resumed))
    assert trainer.global_step == 8  # 6 restored + 2 more, not 8 from scratch


def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*does not exist"):
        train(compose_config(FAST + [f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path))


def test_sample_entry_point_writes_grid_and_npz(digits_run, tmp_path):
    run_dir, _ = digits_run
    cfg = compose_config([f"ckpt_path={run_dir}/checkpoints/last.ckpt", "sampler=ddim", "grid.steps=5", "n=12",
                          f"out_dir={tmp_path}"], config_name="sample")
    path = sample(cfg)
    data = np.load(path)
    assert data["samples"].shape == (12, 1, 8, 8) and int(data["nfe"]) == 5
    assert list(data["labels"]) == [i % 10 for i in range(12)]
    assert path.with_suffix(".png").is_file()


def test_guidance_without_labels_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="guidance_scale=2.0 needs labelled data"):
        build(compose_config(["data=moons", "network=mlp", "guidance_scale=2.0"], tmp_path))


@pytest.mark.slow
def test_toy_model_samples_match_the_data(tmp_path):
    """DDPM with an MLP on the Gaussian-mixture data: samples within an energy distance of real ones.

    Two sets of 1000 real samples are about 0.004 apart (the V-statistic's floor); a Gaussian of the data's std is
    0.09 away; the trained model measured 0.006.
    """
    cfg = compose_config(["logger=csv", "data=gaussian_mixture", "network=mlp", "trainer.max_steps=1500",
                          "trainer.val_check_interval=1500", "data.batch_size=256", "model.optimizer.lr=2e-3",
                          "callbacks.sample_grid=null", "callbacks.final_samples=null", "callbacks.checkpoint=null",
                          "callbacks.ema.half_life_steps=100", "trainer.enable_progress_bar=false"], tmp_path)
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    x, nfe = model.generate(1000, generator=torch.Generator().manual_seed(0))
    real = datamodule.sample_real(1000).to(x)
    noise_baseline = energy_distance(torch.randn_like(real) * real.std(), real)
    distance = energy_distance(x, real)
    assert nfe == 100
    assert distance < 0.1 * noise_baseline, (float(distance), float(noise_baseline))


@pytest.mark.parametrize("experiment", ["autoencoder"])  # the paper recipes: tests/cli/test_recipes.py
def test_every_experiment_config_builds(experiment, tmp_path):
    """The experiments that are not paper recipes compose and pass the pre-compute checks."""
    build(compose_config([f"experiment={experiment}", "logger=csv"], tmp_path))
