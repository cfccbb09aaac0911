"""Step-for-step agreement with diffusers' schedulers on the same betas and the same exact Gaussian denoiser.

The oracle is handed to diffusers as an eps-prediction model. diffusers keeps its schedule in float32
(alphas_cumprod, sigmas), so our DDPM is built from its float32 alphas_cumprod (made exact in float64)
and our solvers get its float32 sigmas; what remains is float32 rounding of the coefficients (and, for
Euler / Heun, of the sample itself): trajectories agree to ~1e-6 relative.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from lightning_diffusion.core import samplers as S
from lightning_diffusion.core.oracles import Gaussian
from lightning_diffusion.core.processes import DiscreteDDPM, cosine_betas, linear_betas


pytestmark = pytest.mark.usefixtures("one_thread")


T = 1000
B = 16


def gaussian() -> Gaussian:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.T / 4 + 0.1 * torch.eye(4, dtype=torch.float64)
    return Gaussian(torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64), cov)


def process_of(scheduler) -> DiscreteDDPM:
    """Our DDPM on diffusers' float32 alphas_cumprod: betas from the ratios, so alphabar_t matches to float64."""
    ac = scheduler.alphas_cumprod.double()
    return DiscreteDDPM(1 - ac / torch.cat([ac.new_ones(1), ac[:-1]]))


def eps_model(g: Gaussian, alpha: float, sigma: float):
    """The oracle as diffusers' eps-prediction model at a known (alpha, sigma)."""
    return lambda x: (x - alpha * g.denoise(x, alpha, sigma)) / sigma


def close(ours, theirs, rtol=1e-5):
    scale = theirs.abs().max().clamp(min=1.0)
    assert float((ours - theirs).abs().max()) < rtol * scale, float((ours - theirs).abs().max() / scale)


@pytest.mark.parametrize("betas", [linear_betas(T), cosine_betas(T)], ids=["linear", "cosine"])
@pytest.mark.parametrize("steps", [T, 50])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_ancestral_matches_ddpm_scheduler(betas, steps, precision):
    """DDPMScheduler, fixed_small variance: per step the same posterior mean and variance, then the same trajectory.

    In float32, diffusers' beta_t = 1 - ac_t / ac_prev cancels: up to 4e-4 relative error for t < 10, so
    the means agree to ~1e-5 and the variances to ~2e-3. With its schedule tensors upcast to float64 the
    same diffusers code agrees with ours to 1e-10.
    """
    sched = DDPMScheduler(num_train_timesteps=T, trained_betas=betas.numpy(), variance_type="fixed_small",
                          clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    rtol, var_rtol = (1e-4, 3e-3) if precision == "float32" else (1e-10, 1e-10)
    if precision == "float64":
        sched.alphas_cumprod, sched.betas, sched.alphas = (v.double() for v in (sched.alphas_cumprod, sched.betas,
                                                                                sched.alphas))
    process, g = process_of(sched), gaussian()
    times = S.strided_times(T, steps)
    assert times[:-1].tolist() == (sched.timesteps + 1).tolist()  # diffusers' t is our t - 1
    x0 = torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gen, ours_gen, x = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2), x0.clone()
    for t, s in zip(times[:-1].tolist(), times[1:].tolist()):
        ac = sched.alphas_cumprod[int(t) - 1].double()
        eps = eps_model(g, float(ac.sqrt()), float((1 - ac).sqrt()))(x)
        theirs = sched.step(eps, int(t) - 1, x, generator=gen).prev_sample
        mean, std = S.ancestral_step(g.denoiser(process), process, x, t, s)
        theirs_mean = theirs
        if s > 0:  # both draw randn of the sample's shape and dtype from the same seed
            var = sched._get_variance(int(t) - 1).double()
            assert float(std[0, 0]) ** 2 == pytest.approx(float(var), rel=var_rtol)
            theirs_mean = theirs - var.sqrt() * torch.randn(x.shape, generator=ours_gen, dtype=x.dtype)
        close(mean, theirs_mean, rtol)
        x = theirs
    ours = S.ancestral(g.denoiser(process), process, x0, times, generator=torch.Generator().manual_seed(2))
    close(ours, x, 10 * rtol)  # the whole trajectory (same seed, same draws): float32 rounding accumulates


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_ddim_scheduler(steps):
    sched = DDIMScheduler(num_train_timesteps=T, trained_betas=cosine_betas(T).numpy(), clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    process, g = process_of(sched), gaussian()
    times = S.strided_times(T, steps)
    assert times[:-1].tolist() == (sched.timesteps + 1).tolist()
    x = torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = x.clone()
    for t, s in zip(times[:-1].tolist(), times[1:].tolist()):
        ac = sched.alphas_cumprod[int(t) - 1].double()
        x = sched.step(eps_model(g, float(ac.sqrt()), float((1 - ac).sqrt()))(x), int(t) - 1, x, eta=0.0).prev_sample
        ours = S.ddim(g.denoiser(process), process, ours, torch.tensor([t, s]))
        close(ours, x)


def scaled_oracle(g: Gaussian):
    """D~(x~; sigma~) of the data: the Wiener filter at alpha = 1, sigma = sigma~."""
    return lambda x, sigma: g.denoise(x, 1.0, sigma).to(x.dtype)


@pytest.mark.parametrize("steps", [10, 25])
def test_euler_matches_euler_discrete_scheduler(steps):
    sched = EulerDiscreteScheduler(num_train_timesteps=T, trained_betas=linear_betas(T).numpy())
    sched.set_timesteps(steps)
    g, sigmas = gaussian(), sched.sigmas.double()
    x = float(sched.init_noise_sigma) * torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours, den = x.clone(), scaled_oracle(g)
    for i, t in enumerate(sched.timesteps):
        s = float(sigmas[i])
        eps = (x - den(x, s)) / s  # diffusers' model sees x / sqrt(1 + s^2) and predicts eps
        x = sched.step(eps, t, x).prev_sample.double()
        ours = S.euler(den, ours, sigmas[i:i + 2])
        close(ours, x)


@pytest.mark.parametrize("steps", [10, 25])
def test_heun_matches_heun_discrete_scheduler(steps):
    """diffusers interleaves sigmas (s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0): 2n - 1 evaluations, as ours.

    Linear betas: diffusers forms dt = sigma_next - sigma in float32, an error of ulp(sigma_0) / 2 times
    |dx~/dsigma~| ~ 1 on the first step. That is ~1e-3 for the cosine schedule's sigma_0 = 2e4 (measured:
    5.7e-3 relative), but ~8e-6 for the linear schedule's sigma_0 = 157.
    """
    sched = HeunDiscreteScheduler(num_train_timesteps=T, trained_betas=linear_betas(T).numpy())
    sched.set_timesteps(steps)
    g = gaussian()
    den = scaled_oracle(g)
    inter = sched.sigmas.double()
    sigmas = torch.cat([inter[:1], inter[1::2]])
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0 and len(sched.timesteps) == 2 * steps - 1
    x = float(sched.init_noise_sigma) * torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours, theirs = x.clone(), []
    for i, t in enumerate(sched.timesteps):
        s = float(inter[i])  # the level diffusers evaluates the model at in call i
        x = sched.step((x - den(x, s)) / s, t, x).prev_sample.double()
        if sched.state_in_first_order or i == len(sched.timesteps) - 1:
            theirs.append(x)  # a full Heun step is done
    counted = S.CountingDenoiser(den)
    for i in range(steps):
        ours = S.heun(counted, ours, sigmas[i:i + 2])
        close(ours, theirs[i])
    assert counted.nfe == len(sched.timesteps)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_pp_2m_matches_dpm_solver_multistep_scheduler(steps):
    """diffusers works in the VP space x = alpha x~, alpha = 1 / sqrt(1 + sigma~^2); midpoint 2M == Lu et al.'s 2M."""
    sched = DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=linear_betas(T).numpy(),
                                        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    sched.set_timesteps(steps)
    process, den = process_of(sched), scaled_oracle(gaussian())
    sigmas = sched.sigmas.double()
    # its sigmas are our sigma~ at its (integer) timesteps
    assert torch.allclose(sigmas[:-1], S.sigmas_of_times(process, sched.timesteps.double() + 1), rtol=1e-5)
    x0 = torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha = (1 + sigmas**2).rsqrt()
    x = x0.clone()
    for i, t in enumerate(sched.timesteps):
        s, a = float(sigmas[i]), float(alpha[i])
        eps = (x - a * den(x / a, s)) / (a * s)
        x = sched.step(eps, t, x).prev_sample.double()
        # ours from the start over the first i + 1 steps (multistep: the history matters)
        ours = float(alpha[i + 1]) * S.dpm_solver_pp_2m(den, x0 / float(alpha[0]), sigmas[: i + 2])
        close(ours, x)
