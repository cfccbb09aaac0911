"""Denoiser transforms: x0 clipping (Ho et al. 2020) and Imagen's dynamic thresholding (Saharia et al. 2022) against
their formulas, and samplers run through them against diffusers' DDPMScheduler / DDIMScheduler with clip_sample=True
(and thresholding=True) step for step, on the exact Gaussian denoiser, whose x0 predictions leave [-1, 1]."""

from functools import partial

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from lightning_diffusion.core import samplers as S
from lightning_diffusion.core.denoiser import Denoised
from lightning_diffusion.core.processes import linear_betas
from lightning_diffusion.core.transforms import apply_transforms, clip_x0, dynamic_threshold
from test_samplers_reference import B, T, close, eps_model, gaussian, process_of

pytestmark = pytest.mark.usefixtures("one_thread")


def constant(d: torch.Tensor):
    return lambda x, t: d.clone()


def test_clip_x0_is_the_data_range_and_keeps_the_variance():
    d = torch.linspace(-3, 3, 24, dtype=torch.float64).reshape(2, 3, 4)
    assert torch.equal(clip_x0(constant(d))(d, 0.5), d.clamp(-1, 1))
    assert torch.equal(clip_x0(constant(d), limit=2.0)(d, 0.5), d.clamp(-2, 2))
    v = torch.full_like(d, 0.25)
    out = clip_x0(lambda x, t: Denoised(d, v))(d, 0.5)
    assert torch.equal(out.denoised, d.clamp(-1, 1)) and out.v is v


def test_dynamic_thresholding_is_imagens_formula():
    """Per sample s = max(percentile_p(|x0|), 1); x0 <- clip(x0, -s, s) / s (Saharia et al. 2022, Sec. 2.3)."""
    d = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * torch.tensor(
        [0.3, 1.5, 4.0], dtype=torch.float64)[:, None, None, None]
    out = dynamic_threshold(constant(d), percentile=0.9)(d, 0.5).numpy()
    for i, sample in enumerate(d.numpy()):
        s = max(np.quantile(np.abs(sample), 0.9), 1.0)
        np.testing.assert_allclose(out[i], np.clip(sample, -s, s) / s, rtol=1e-14)
    np.testing.assert_array_equal(out[0], d[0].numpy())  # inside [-1, 1]: s = 1, untouched
    assert np.abs(out).max() <= 1.0


def test_dynamic_thresholding_matches_diffusers_threshold_sample():
    d = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1e9)
    torch.testing.assert_close(dynamic_threshold(constant(d))(d, 0.5), sched._threshold_sample(d.clone()),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [{"limit": 0.0}, {"limit": float("inf")}])
def test_clip_x0_refuses_a_bad_limit(bad):
    with pytest.raises(ValueError, match=f"limit={bad['limit']}"):
        clip_x0(constant(torch.zeros(1)), **bad)


@pytest.mark.parametrize("bad", [{"percentile": 0.0}, {"percentile": 1.5}, {"limit": -1.0}])
def test_dynamic_threshold_refuses_bad_values(bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"{key}={value}"):
        dynamic_threshold(constant(torch.zeros(1)), **bad)


def schedulers(kind: str, steps: int, **options):
    make = DDPMScheduler if kind == "ancestral" else DDIMScheduler
    extra = {"variance_type": "fixed_small"} if kind == "ancestral" else {"set_alpha_to_one": True}
    sched = make(num_train_timesteps=T, trained_betas=linear_betas(T).numpy(), timestep_spacing="trailing",
                 **extra, **options)
    sched.set_timesteps(steps)
    sched.alphas_cumprod, sched.betas, sched.alphas = (v.double() for v in (sched.alphas_cumprod, sched.betas,
                                                                            sched.alphas))
    if kind == "ddim":
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    return sched


TRANSFORMS = {"clip": (partial(clip_x0), {"clip_sample": True, "clip_sample_range": 1.0}),
              "threshold": (partial(dynamic_threshold, percentile=0.75),
                            {"thresholding": True, "dynamic_thresholding_ratio": 0.75, "sample_max_value": 1e9})}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("kind", ["ancestral", "ddim"])
def test_a_sampler_through_the_transform_is_diffusers_with_clip_sample(kind, transform):
    """Our sampler through the transform = diffusers' scheduler clipping its pred_original_sample, step
    for step (DDIM: the eps of the clipped x0, diffusers' use_clipped_model_output=True), from the same noise."""
    steps = 20
    ours_transform, options = TRANSFORMS[transform]
    sched = schedulers(kind, steps, **options)
    process, g = process_of(sched), gaussian()
    times = S.strided_times(T, steps)
    assert times[:-1].tolist() == (sched.timesteps + 1).tolist()
    x = torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert float(g.denoiser(process)(x, times[0]).abs().max()) > 1  # clipping acts
    theirs, gen = x.clone(), torch.Generator().manual_seed(2)
    clipped = apply_transforms(g.denoiser(process), [ours_transform])
    ours = x.clone()
    for t, s in zip(times[:-1].tolist(), times[1:].tolist()):
        ac = sched.alphas_cumprod[int(t) - 1]
        eps = eps_model(g, float(ac.sqrt()), float((1 - ac).sqrt()))(theirs)
        extra = {"generator": gen} if kind == "ancestral" else {"eta": 0.0, "use_clipped_model_output": True}
        image = (B, 1, 2, 2)  # diffusers thresholds per (batch, channel, pixels): our 4-D points as 2 x 2 images
        theirs = sched.step(eps.view(image), int(t) - 1, theirs.view(image), **extra).prev_sample.view(B, 4)
        if kind == "ddim":
            ours = S.ddim(clipped, process, ours, torch.tensor([t, s]))
            close(ours, theirs, 1e-10)
    if kind == "ancestral":  # the whole chain: both draw randn of the sample's shape from the same seed, per step
        close(S.ancestral(clipped, process, x.clone(), times, generator=torch.Generator().manual_seed(2)), theirs,
              1e-8)
        plain = S.ancestral(g.denoiser(process), process, x.clone(), times, generator=torch.Generator().manual_seed(2))
        assert float((plain - theirs).abs().max()) > 1e-3  # without the transform it is another sampler


def test_generate_applies_the_transforms_for_every_sampler():
    """`generate` is the one place: the sampler sees only the transformed D (here a denoiser far outside [-1, 1])."""
    process = process_of(schedulers("ddim", 10))
    seen = []

    def sampler(denoiser, process, x, times, generator=None):
        seen.append(denoiser(x, torch.tensor(times[0])))
        return x

    wide = lambda x, t: torch.full_like(x, 5.0)  # noqa: E731
    S.generate(sampler, lambda p: S.strided_times(T, 10), wide, process, (2, 3), transforms=[partial(clip_x0)])
    assert torch.equal(seen[0], torch.ones(2, 3, dtype=torch.float64))
    S.generate(sampler, lambda p: S.strided_times(T, 10), wide, process, (2, 3))
    assert torch.equal(seen[1], torch.full((2, 3), 5.0, dtype=torch.float64))
