"""The families proved on real training: each learns the 8x8 digits, each runs with every compatible core sampler.

* `model=<name>` alone selects a family (process, parameterization, weighting, noise-level draw, default sampler).
* Slow: each family trains on the digits in CPU minutes, and a classifier trained on real digits labels its guided
  class-conditional samples as the class asked for at least 80% of the time.
* Slow: the interchangeability matrix. Each family, trained briefly on the 2-D Gaussian mixture, is sampled with
  every sampler config in conf/sampler; the samples lie within an energy distance of real ones that an untrained
  model does not reach, and the pairs that cannot work are refused with a ValueError before any network evaluation.
"""

import time

import pytest
import torch
from hydra.utils import instantiate

from helpers import CONF, FAMILIES, compose_config
from lightning_diffusion.core import noise_levels, parameterizations, processes, weightings
from lightning_diffusion.core.distances import energy_distance
from lightning_diffusion.lightning.builder import build
from lightning_diffusion.train import train

SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))

# Only what a run on the CPU needs: no W&B, no progress bar, no grids or checkpoints in between.
QUIET = ["logger=csv", "trainer.enable_progress_bar=false", "callbacks.sample_grid=null", "callbacks.checkpoint=null",
         "trainer.limit_val_batches=1"]


# ---------------------------------------------------------------- model=<name> alone selects the family

SELECTED = {  # family -> (process, parameterization, weighting, noise-level draw, default sampler)
    "ddpm": (processes.DiscreteDDPM, parameterizations.EpsPrediction, weightings.l_simple,
             noise_levels.uniform_discrete, "ancestral"),
    "ncsn": (processes.VESDE, parameterizations.ScorePrediction, weightings.ncsn_sigma2, noise_levels.ladder,
             "annealed_langevin"),
    "score_sde": (processes.VPSDE, parameterizations.EpsPrediction, weightings.ncsn_sigma2, noise_levels.uniform_time,
                  "predictor_corrector"),
    "score_sde_ve": (processes.VESDE, parameterizations.ScorePrediction, weightings.ncsn_sigma2,
                     noise_levels.uniform_time, "predictor_corrector"),
    "score_sde_subvp": (processes.SubVPSDE, parameterizations.EpsPrediction, weightings.ncsn_sigma2,
                        noise_levels.uniform_time, "predictor_corrector"),
    "edm": (processes.EDMProcess, parameterizations.EDMPreconditioning, weightings.edm, noise_levels.log_normal,
            "pf_ode"),
    "flow": (processes.RectifiedFlow, parameterizations.FlowVelocity, weightings.velocity_mse,
             noise_levels.uniform_time, "ddim"),
}


def test_every_family_is_listed_here():
    assert sorted(SELECTED) == FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_model_name_alone_selects_the_family(family, tmp_path):
    process, parameterization, weighting, draw, sampler = SELECTED[family]
    _, model, _ = build(compose_config([f"model={family}", "logger=csv"], tmp_path))
    assert type(model.process) is process  # exact class: a sub-VP is not a VP here
    assert type(model.denoiser.parameterization) is parameterization
    assert model.weighting.func is weighting and model.noise_levels.func is draw
    assert model.sampler.func.__name__ == sampler
    assert model.num_classes == 10 and model.guidance_scale == 2.0  # the default data: class-conditional digits


# ---------------------------------------------------------------- each family learns the digits

# Per family: the fewest steps and the cheapest final sampler that pass reliably (measured; see the issue note).
# A step of unet_tiny at batch 128 costs 0.44 s of one core, so steps are most of this test's CPU. Measured on one
# thread (issue 23, seed 0, 400 steps): edm, flow, score_sde, ncsn, sub-VP 1.000, VE 0.997 (160-320 s of CPU against
# ~460-500 s at 1000 steps); edm after 20 steps 0.097, chance, so a model that has not learned fails the 0.8 below.
DIGITS = {
    "ncsn": ["trainer.max_steps=400", "grid.steps=19", "sampler.n_steps_each=20"],  # its training ladder: 20 levels
                                                                                    # x 20 Langevin steps (5: 0.22)
    "score_sde": ["trainer.max_steps=400", "grid.steps=100"],
    "score_sde_ve": ["trainer.max_steps=400", "grid.steps=50"],
    "score_sde_subvp": ["trainer.max_steps=400", "grid.steps=50"],
    "edm": ["trainer.max_steps=400"],
    "flow": ["trainer.max_steps=400"],
}


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("family", sorted(DIGITS))
def test_family_learns_the_digits(family, tmp_path):
    """Guided samples (w = 2, 30 per class) are labelled as asked by an SVC trained on the real digits >= 80%."""
    overrides = QUIET + [f"model={family}", "data=digits", "network=unet_tiny", "callbacks.final_samples.n_per_class=30"]
    steps = int(next(o for o in DIGITS[family] if o.startswith("trainer.max_steps=")).split("=")[1])
    metrics = train(compose_config(overrides + DIGITS[family] + [f"trainer.val_check_interval={steps}"], tmp_path))
    assert metrics["final/num_samples"] == 300
    assert metrics["final/classifier_accuracy"] >= 0.8, metrics


# ---------------------------------------------------------------- every family x every sampler on 2-D data

# Fewer steps for the samplers whose configs spend 500-1000 NFE (the matrix tests correctness, not the last digit).
CHEAP = {"pc": ["grid.steps=100"], "euler_maruyama": ["grid.steps=200"],
         "annealed_langevin": ["sampler.n_steps_each=40"]}

# Pairs that cannot work, and the ValueError that must refuse them before the first network evaluation.
REFUSED = {
    # ancestral.yaml's grid is DDPM's strided integer times: only a discrete-time process has them
    **{(f, "ancestral"): "strided_times needs an integer T" for f in FAMILIES if f != "ddpm"},
}
TOY = QUIET + ["data=gaussian_mixture", "network=mlp", "data.batch_size=256", "model.optimizer.lr=2e-3",
               "trainer.max_steps=1000", "trainer.val_check_interval=1000", "callbacks.ema.half_life_steps=100",
               "callbacks.final_samples=null"]
N = 500
# EDM's time is sigma, so uniform_times is uniform in sigma: 50 DDIM steps leave one step below sigma = 1.6 and the
# samples blur (0.21; PC 0.036, EM 0.028). Its own grid, Karras' rho = 7 (Karras et al. 2022, eq. 5), gives 0.0075,
# 0.0027, 0.0038 (measured). Reported: the sampler configs carry the grid, but the right grid depends on the process.
# (Annealed Langevin keeps its grid: on Karras' it would end at sigma = 0, which it refuses.)
KARRAS_GRID = ("edm",)
# Energy distance to 500 real samples. Measured: true mixture samples 0.0066 (the V-statistic's floor at N = 500), passing
# pairs 0.003-0.026, a Gaussian with the data's mean and std 0.095, untrained models 0.25 (flow) to 108.
THRESHOLD = 0.04


class NetworkCalls:
    """Counts forward calls of a network (the NFE as the network sees it) with a forward pre-hook, while in `with`."""

    def __init__(self, network: torch.nn.Module):
        self.network, self.count = network, 0

    def __enter__(self):
        self.handle = self.network.register_forward_pre_hook(lambda module, args: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    """family -> (trained model, 500 real samples), trained once per module and only when first asked for."""
    cache = {}

    def get(family):
        if family not in cache:
            torch.manual_seed(0)
            cfg = compose_config(TOY + [f"model={family}"], tmp_path_factory.mktemp(family))
            datamodule, model, trainer = build(cfg)
            trainer.fit(model, datamodule=datamodule)
            cache[family] = (model.eval(), datamodule.sample_real(N).double())
        return cache[family]

    return get


def sampling(family: str, sampler: str) -> dict:
    """The sampler and grid partials of `sampler=<name>` for the family, as model.generate's keywords."""
    karras = ["grid=karras"] if family in KARRAS_GRID and sampler in ("ddim", "pc", "euler_maruyama") else []
    cfg = compose_config(["data=gaussian_mixture", "network=mlp", f"model={family}", f"sampler={sampler}"] + karras
                         + CHEAP.get(sampler, []))
    return {"sampler": instantiate(cfg.sampler), "grid": instantiate(cfg.grid)}


@pytest.mark.slow
@pytest.mark.parametrize("family,sampler", [pytest.param(f, s, marks=pytest.mark.xdist_group(f"toy_{f}"))
                                            for f in FAMILIES for s in SAMPLERS])  # one xdist worker trains each family
def test_every_family_with_every_sampler(family, sampler, toy_models, one_thread):
    model, real = toy_models(family)
    chosen = sampling(family, sampler)
    refused = REFUSED.get((family, sampler))
    if refused:
        with NetworkCalls(model.denoiser.network) as calls, pytest.raises(ValueError, match=refused):
            model.generate(N, generator=torch.Generator().manual_seed(0), **chosen)
        assert calls.count == 0  # refused before the first network evaluation
        return
    start = time.perf_counter()
    with NetworkCalls(model.denoiser.network) as calls:
        x, nfe = model.generate(N, generator=torch.Generator().manual_seed(0), **chosen)
    distance = float(energy_distance(x, real))
    print(f"{family} x {sampler}: energy distance {distance:.4f}, NFE {nfe}, {time.perf_counter() - start:.1f} s")
    assert nfe == calls.count > 0
    assert torch.isfinite(x).all() and distance < THRESHOLD, distance


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_model_misses_the_threshold(family, tmp_path, one_thread):
    """The threshold means something: the same family untrained (DDIM, 50 steps) is far from the data."""
    torch.manual_seed(0)
    datamodule, model, _ = build(compose_config(TOY + [f"model={family}"], tmp_path))
    with torch.no_grad():
        x, _ = model.eval().generate(N, generator=torch.Generator().manual_seed(0), **sampling(family, "ddim"))
    distance = float(energy_distance(x, datamodule.sample_real(N).double()))
    print(f"untrained {family}: energy distance {distance:.4f}")
    assert not distance < 4 * THRESHOLD, distance  # NaN or inf also count as missing
