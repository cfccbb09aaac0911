"""The weighted denoising loss, computed from D alone, and improved DDPM's discrete VLB / hybrid loss.

    L = w(t) ||eps_hat - eps||^2 = w(t) snr ||D - x_0||^2     (D - x_0 = -(sigma / alpha)(eps_hat - eps))

Because the loss only sees D, it is the same whatever the network predicts (eps, x_0, v, EDM's F, flow velocity);
the prediction target changes the network's conditioning, not the objective. Every loss here returns
(per-sample loss (B,), logsnr (B,)), the latter for EDM2's `UncertaintyWeighting`; the training losses are means
over the non-batch dimensions (per dimension), while `ddpm_vlb_terms` sums them (nats per sample, for likelihoods).
The training module multiplies in an adaptive draw's reweighting (`noise_levels.AdaptiveDraw`) and takes the mean.
"""

import math

import torch
from torch import Tensor

from .denoiser import split
from .processes import Process, expand_to


def _noised(process: Process, x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """x_t = alpha(t) x_0 + sigma(t) eps, with the coefficients computed in float64; also returns logsnr(t)."""
    t64 = t.to(torch.float64)
    x_t = expand_to(process.alpha(t64), x0) * x0 + expand_to(process.sigma(t64), x0) * noise
    return x_t, process.logsnr(t64)


def _weighted_mse(weighting, t: Tensor, process: Process, D: Tensor, x0: Tensor, logsnr: Tensor) -> Tensor:
    """w(t) snr ||D - x_0||^2, mean over the non-batch dimensions."""
    weight = (weighting(t, process).to(torch.float64) * logsnr.exp()).to(x0.dtype)
    return weight * ((D - x0) ** 2).flatten(1).mean(1)


def _denoise(denoiser, x_t: Tensor, t: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(D, v) of one denoiser call (v = None without learned variances); labels only if there are any."""
    return split(denoiser(x_t, t) if labels is None else denoiser(x_t, t, labels))


def denoising_loss(denoiser, x0: Tensor, t: Tensor, noise: Tensor, weighting, process: Process,
                   labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weighted denoising loss w(t) ||eps_hat - eps||^2 per sample, from D (Kingma & Gao 2023, eq. 2)."""
    t = torch.as_tensor(t, device=x0.device).expand(x0.shape[0])
    x_t, logsnr = _noised(process, x0, t, noise)
    D, _ = _denoise(denoiser, x_t, t, labels)
    return _weighted_mse(weighting, t, process, D, x0, logsnr), logsnr.to(x0.dtype)


def _log_normal_cdf_diff(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails."""
    # mirror the upper tail into the lower one, where log_ndtr is accurate: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    upper = a > 0
    a, b = torch.where(upper, -b, a), torch.where(upper, -a, b)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log(-torch.expm1(log_a - log_b))


def discretized_gaussian_nll(x0: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """-log of N(mean, exp(log_var)) over x_0's 8-bit bin of width 2/255 in [-1, 1], per element (Ho et al. 2020, eq. 13).

    The edge bins extend to -inf at x_0 = -1 and to +inf at x_0 = 1.
    """
    inv_std = torch.exp(-0.5 * log_var)
    plus, minus = inv_std * (x0 - mean + 1 / 255), inv_std * (x0 - mean - 1 / 255)
    log_p = torch.where(x0 < -0.999, torch.special.log_ndtr(plus),
                        torch.where(x0 > 0.999, torch.special.log_ndtr(-minus), _log_normal_cdf_diff(minus, plus)))
    return -log_p


def _vlb_terms(process: Process, x0: Tensor, x_t: Tensor, t: Tensor, D: Tensor, v: Tensor | None) -> Tensor:
    """L_{t-1} per sample in nats summed over dimensions: the KL for t > 1, the decoder NLL at t = 1."""
    t64 = t.to(torch.float64)
    abar, abar_prev = process.alpha(t64) ** 2, process.alpha(t64 - 1) ** 2
    beta = 1 - abar / abar_prev
    # posterior q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, beta~_t) (Ho et al. 2020, eq. 6-7); the model mean puts D
    # for x_0, so the means differ by c0 (x_0 - D) and ct x_t cancels
    c0 = abar_prev.sqrt() * beta / (1 - abar)
    # log beta~_t, clipped at t = 1 (where beta~_1 = 0) to log beta~_2, as for DDPM's fixed small variance
    t2 = t64.clamp(min=2)
    abar2, abar2_prev = process.alpha(t2) ** 2, process.alpha(t2 - 1) ** 2
    post_var2 = (1 - abar2_prev) / (1 - abar2) * (1 - abar2 / abar2_prev)
    min_log = expand_to(torch.where(post_var2 > 0, post_var2.log(), beta.log()), x0)
    max_log = expand_to(beta.log(), x0)
    # model variance: fixed beta~_t, or v' log beta_t + (1 - v') log beta~_t, v' = (v + 1) / 2 (Nichol & Dhariwal eq. 15)
    if v is None:
        model_log = min_log.expand_as(x0)
    else:
        frac = (v + 1) / 2
        model_log = frac * max_log + (1 - frac) * min_log
    # KL(N(mu_q, beta~) || N(mu_p, exp(model_log))) per element, nats
    mean_gap = expand_to(c0, x0) * (x0 - D)
    kl = 0.5 * (-1.0 + model_log - min_log + torch.exp(min_log - model_log) + mean_gap**2 * torch.exp(-model_log))
    # decoder -log p(x_0 | x_1): at t = 1 (abar_0 = 1) the model mean c0 D + ct x_1 is D itself
    nll = discretized_gaussian_nll(x0, D, model_log)
    per_element = torch.where(expand_to(t == 1, x0).bool(), nll, kl)
    return per_element.flatten(1).sum(1)


def _check_discrete_t(t: Tensor, process: Process) -> Tensor:
    if not process.discrete:
        raise ValueError(f"the discrete VLB needs a DiscreteDDPM process with T steps, got {process!r}")
    t = torch.as_tensor(t)
    if t.numel() and ((t != t.round()).any() or t.min() < 1 or t.max() > process.T):
        raise ValueError(f"t must hold integers in 1..T={process.T}, got values in [{float(t.min())}, {float(t.max())}]")
    return t.long()


def ddpm_vlb_terms(denoiser, process: Process, x0: Tensor, t: Tensor, noise: Tensor,
                   labels: Tensor | None = None) -> Tensor:
    """Per-sample VLB term L_{t-1} in nats, summed over dimensions (Ho et al. 2020, eq. 5, 13; Nichol & Dhariwal 2021, eq. 15).

    For t > 1, KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) with the learned variance interpolation when the
    denoiser has one (`Denoiser(learned_variance=True)`) and the posterior variance beta~_t otherwise; for t = 1
    the discretized Gaussian decoder NLL of 8-bit data in [-1, 1]. Summing over t = 1..T and adding the prior
    KL(q(x_T | x_0) || N(0, I)) gives the negative ELBO in nats; divide by dims * ln 2 for bits/dim. The network's v
    maps to the interpolation fraction v' = (v + 1) / 2, so v = -1 is beta~_t and v = 1 is beta_t.
    """
    t = _check_discrete_t(t, process).to(x0.device).expand(x0.shape[0])
    x_t, _ = _noised(process, x0, t, noise)
    D, v = _denoise(denoiser, x_t, t, labels)
    return _vlb_terms(process, x0, x_t, t, D, v).to(x0.dtype)


def hybrid_loss(denoiser, x0: Tensor, t: Tensor, noise: Tensor, weighting, process: Process,
                labels: Tensor | None = None, lambda_vlb: float = 0.001) -> tuple[Tensor, Tensor]:
    """Improved DDPM's L_hybrid = L_simple + lambda L_vlb, with the mean stopped in L_vlb (Nichol & Dhariwal 2021, eq. 16).

    L_vlb = sum_t L_t is estimated by T L_t (t uniform) in bits per dimension, so lambda = 0.001 balances the two as
    in the paper. The stop-gradient makes L_vlb train only the variance; `weighting` applies to the simple term
    (`l_simple` in the paper). Same signature as `denoising_loss`, so the two swap in a config.
    """
    if not lambda_vlb >= 0:
        raise ValueError(f"hybrid_loss needs lambda_vlb >= 0, got lambda_vlb={lambda_vlb}")
    t = _check_discrete_t(t, process).to(x0.device).expand(x0.shape[0])
    x_t, logsnr = _noised(process, x0, t, noise)
    D, v = _denoise(denoiser, x_t, t, labels)
    simple = _weighted_mse(weighting, t, process, D, x0, logsnr)
    vlb = _vlb_terms(process, x0, x_t, t, D.detach(), v).to(x0.dtype)
    vlb_bpd = vlb / (x0[0].numel() * math.log(2))
    return simple + lambda_vlb * process.T * vlb_bpd, logsnr.to(x0.dtype)


def vlb_loss(denoiser, x0: Tensor, t: Tensor, noise: Tensor, weighting, process: Process,
             labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Improved DDPM's L_vlb objective alone, T L_t in bits/dim, training mean and variance (Nichol & Dhariwal 2021, sec. 3.3).

    `weighting` is accepted for a uniform loss signature and ignored: the VLB fixes its own weights. Pair it with
    `LossSecondMomentDraw` for the paper's importance-sampled L_vlb.
    """
    t = _check_discrete_t(t, process).to(x0.device).expand(x0.shape[0])
    x_t, logsnr = _noised(process, x0, t, noise)
    D, v = _denoise(denoiser, x_t, t, labels)
    vlb = _vlb_terms(process, x0, x_t, t, D, v).to(x0.dtype)
    return process.T * vlb / (x0[0].numel() * math.log(2)), logsnr.to(x0.dtype)
