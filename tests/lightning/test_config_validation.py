"""Bad configs fail before any compute with one clear error naming the value; random overrides never reach torch."""

import random

import pytest
from hydra.errors import ConfigCompositionException

from helpers import compose_config
from lightning_diffusion.lightning.builder import ConfigError, build

CLEAR = (ConfigError, ConfigCompositionException, FileNotFoundError)


@pytest.mark.parametrize("overrides, message", [
    (["model=nope"], "Could not find 'model/nope'"),
    (["sampler=nope"], "Could not find 'sampler/nope'"),
    (["model.weighting._target_=lightning_diffusion.core.weightings.nope"], "nope"),
    (["model=edm", "+model.learned_variance=true"], "learned_variance=True is improved DDPM's"),
    (["data=moons", "network=mlp", "guidance_scale=3.0"], "guidance_scale=3.0 needs labelled data"),
    (["data=digits16"], r"attn_resolutions \[4\] are never reached"),
    (["network.channel_mult=[1,2,2,2,2]"], "image_size=8 must be divisible by"),
    (["model.process.T=0"], "T must be >= 1"),
    (["model=edm", "model.process.sigma_min=-1.0"], "sigma_min"),
    (["model.label_dropout=1.5"], r"label_dropout must be a probability in \[0, 1\], got 1.5"),
    (["model=edm", "model.noise_levels.P_std=0"], "P_std"),
    (["model=ddpm", "model.weighting._target_=lightning_diffusion.core.weightings.min_snr", "+model.weighting.gamma=-1"],
     "gamma"),
    (["trainer.devices=3", "trainer.strategy=ddp"], r"data.batch_size=128 is the global batch.*multiple of 3"),
    (["experiment=autoencoder", "debug=fast"], "callbacks.sample_grid .* has no _target_"),
])
def test_bad_config_gives_one_clear_error(overrides, message, tmp_path):
    with pytest.raises(CLEAR, match=message):
        build(compose_config(overrides, tmp_path))


KEYS = ["model.process.T", "model.label_dropout", "model.optimizer.lr", "network.channels", "network.channel_mult",
        "network.dropout", "data.batch_size", "data.val_fraction", "data.image_size", "model.process.schedule._target_",
        "guidance_scale", "model.nonfinite", "callbacks.ema.half_life_steps", "callbacks.ema.ramp"]
VALUES = ["-1", "0", "1", "0.5", "1.5", "1e9", "abc", "null", "[]", "[1,2,3]", "''"]


def test_random_overrides_give_a_run_config_or_a_clear_error(tmp_path):
    """A fuzz of single overrides: build() returns, or raises a clear error, never a deep torch traceback."""
    rng = random.Random(0)
    outcomes = {"ok": 0, "clear": 0}
    for i in range(40):
        override = f"{rng.choice(KEYS)}={rng.choice(VALUES)}"
        try:
            build(compose_config([override, "logger=csv"], tmp_path / str(i)))
            outcomes["ok"] += 1
        except CLEAR:
            outcomes["clear"] += 1
    assert outcomes["clear"] > 0 and sum(outcomes.values()) == 40
