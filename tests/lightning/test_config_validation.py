"""Bad configs fail before any compute with one clear error naming the value; random overrides never reach torch."""

import math
import random

import pytest
from hydra.errors import ConfigCompositionException

from helpers import compose_config
from lightning_diffusion.lightning.builder import ConfigError, build
from lightning_diffusion.lightning.schema import CPUS, WORKERS_PER_CPU
from lightning_diffusion.train import train

CLEAR = (ConfigError, ConfigCompositionException, FileNotFoundError)


@pytest.mark.parametrize("overrides, message", [
    (["model=nope"], "Could not find 'model/nope'"),
    (["sampler=nope"], "Could not find 'sampler/nope'"),
    (["model.weighting._target_=lightning_diffusion.core.weightings.nope"], "nope"),
    (["model=edm", "model.learned_variance=true"], "learned_variance=True is improved DDPM.s"),
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


@pytest.mark.parametrize("overrides, message", [  # what an outside fuzz found accepted, or failing only mid-run
    (["model.optimizer.lr=true"], r"model.optimizer.lr=True: need a number in \(0, 10\)"),  # trained at lr 1.0
    (["model.optimizer.lr=1e308"], r"model.optimizer.lr=1e\+308: need a number in \(0, 10\)"),
    (["+model.optimizer.betas=[0.9]"], r"model.optimizer.betas=\[0.9\]: torch.optim.Adam's betas takes tuple\[float"),
    (["+model.optimizer.betas=[0.9,1.0]"], r"model.optimizer.betas.1=1.0: need a pair of numbers in \[0, 1\)"),
    (["model.guidance_scale=-inf"], r"model.guidance_scale=-inf: need null \(the model's default\) or a finite number"),
    (["model.label_dropout=true"], r"model.label_dropout=True: .*DiffusionModel's label_dropout takes a finite float"),
    (["sampler=heun", "sampler.solver.S_churn=inf"], r"sampler.solver.S_churn=inf: .*heun's S_churn takes a finite"),
    (["+sampler.nope=1"],  # died at the first validation: "ancestral() got an unexpected keyword argument"
     r"sampler.nope=1: lightning_diffusion.core.samplers.ancestral takes no 'nope'; it takes denoiser, process, x, "
     r"times, generator"),
    (["sampler=heun", "+sampler.solver.nope=3"], r"sampler.solver.nope=3: .*heun takes no 'nope'; it takes .*S_churn"),
    (["+model.weighting.nope=1"], r"model.weighting.nope=1: .*l_simple takes no 'nope'"),
    (["+grid.nope=1"], r"grid.nope=1: .*strided_times takes no 'nope'"),
    (["data.num_workers=1000000"],  # hung before step 0
     rf"data.num_workers=1000000: need an int in \[0, {WORKERS_PER_CPU * CPUS}\] \({WORKERS_PER_CPU} x the {CPUS} CPUs"),
    (["callbacks.sample_grid.n=10000000"],  # killed for memory at the first validation
     r"callbacks.sample_grid.n=10000000: need an int in \[1, 1024\] \(a picture of at most 32 x 32 samples\)"),
    (["callbacks.final_samples.n_per_class=10000000"], r"n_per_class=10000000: need an int in \[1, 5000\]"),
    (["data=moons", "network=mlp", "callbacks.final_samples.n_unconditional=10000000"],
     r"n_unconditional=10000000: need an int in \[1, 50000\]"),
])
def test_values_reach_a_check_before_compute(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build(compose_config(overrides + ["logger=csv"], tmp_path))


@pytest.mark.parametrize("overrides, message", [  # train read them before build checked them
    (["seed=-1"], r"seed=-1: need an int in \[0, 4294967295\]"),
    (["seed=inf"], r"seed=inf: need an int in \[0, 4294967295\]"),
    (["seed=4294967296"], r"seed=4294967296: need an int in \[0, 4294967295\]"),
    (["ckpt_path=-0.5"], r"ckpt_path=-0.5: need 'last', a checkpoint's path, or null"),
])
def test_the_runs_own_keys_are_checked_before_train_reads_them(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(compose_config(overrides + ["logger=csv"], tmp_path))


# The fuzz: random group choices x random keys set to values, each either sensible ("good") or nonsense ("bad").
GROUPS = {"model": ["ddpm", "edm", "flow", "ncsn", "score_sde", "score_sde_ve", "score_sde_subvp"],
          "sampler": [None, "ancestral", "ddim", "heun", "euler", "pc", "annealed_langevin", "dpm_solver_pp_2m"],
          "data": ["digits", "moons", "gaussian_mixture"], "network": ["unet_tiny", "mlp"],
          "callbacks": ["default", "with_likelihood", "posthoc_ema"]}
NAN, INF = float("nan"), float("inf")
VALUES = {  # key: (good values, bad values)
    "model.optimizer.lr": ([1e-4, 2e-3], [0, -1, "abc", NAN, INF, True, 1e308]),
    "model.lr_warmup_steps": ([0, 10], [-10, 1.5, "x"]),
    "model.label_dropout": ([0.0, 0.2], [1.5, -0.1, "x", True]),
    "callbacks.ema.half_life_steps": ([5, 100.0], [0, NAN, -3, "x"]),
    "grid.steps": ([3, 10], [0, -1, 2.5, "x"]),
    "trainer.max_steps": ([1, 3], [INF, -5, "x"]),
    "trainer.val_check_interval": ([1, 2], [0, -1, "x"]),
    "guidance_scale": ([None, 1.0], [NAN, INF, -1, "x"]),
    "seed": ([0, 7], [-1, 1.5, "x", INF, 2**32]),
    "model.guidance_scale": ([1.0], [-INF, NAN, True]),
    "data.num_workers": ([0], [10**6, -1, True]),
    "callbacks.sample_grid.n": ([4], [10**7, 0, True]),
    "model.learned_variance": ([False], [{}, "no", 1e12]),
    "data.batch_size": ([32, 64], [0, -1, 1.5, "x"]),
    "callbacks.checkpoint.every_n_train_steps": ([2, None], [[], -3, "x"]),
}


def override(key: str, value) -> str:
    """key=value as a command line writes it: null, true / false, nan, inf, quoted strings, {} and [] as they are."""
    if value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    elif isinstance(value, float) and not math.isfinite(value):
        text = "nan" if math.isnan(value) else "inf"
    else:
        text = f"'{value}'" if isinstance(value, str) else str(value)
    return f"{key}={text}"


def fuzz_case(rng: random.Random) -> tuple[list[str], list[str]]:
    """(overrides, the keys given nonsense): a random group choice each, and 1-3 keys."""
    overrides = [f"{group}={rng.choice(options)}" for group, options in GROUPS.items()]
    overrides = [o for o in overrides if not o.endswith("=None")]
    bad_keys = []
    for key in rng.sample(sorted(VALUES), rng.randint(1, 3)):
        good, bad = VALUES[key]
        nonsense = rng.random() < 0.35
        overrides.append(override(key, rng.choice(bad if nonsense else good)))
        bad_keys += [key] * nonsense
    return overrides, bad_keys


def test_random_override_sets_work_or_are_refused_naming_the_key(tmp_path):
    """Groups x values: every outcome builds (no nonsense given) or is a ConfigError naming a nonsense key, or, for
    group choices that cannot pair, naming the choices; never another exception, never nonsense accepted."""
    rng = random.Random(0)
    counts = {"tried": 0, "worked": 0, "refused cleanly": 0, "other": 0}
    for i in range(60):
        overrides, bad_keys = fuzz_case(rng)
        counts["tried"] += 1
        try:
            build(compose_config(overrides + ["logger=csv"], tmp_path / str(i)))
        except ConfigError as err:
            named = [k for k in bad_keys if k in str(err)] or (not bad_keys and "=" in str(err))
            assert named, (overrides, str(err))
            counts["refused cleanly"] += 1
            continue
        except Exception as err:  # noqa: BLE001 (the point: nothing else may come out)
            counts["other"] += 1
            pytest.fail(f"{overrides}: {type(err).__name__}: {err}")
        assert not bad_keys, f"nonsense accepted: {overrides}"
        counts["worked"] += 1
    print(counts)
    assert counts["other"] == 0 and counts["worked"] > 5 and counts["refused cleanly"] > 5
