"""Held-out bits/dim with its protocol, sharded over ranks: `evaluate`'s likelihood and the in-training check."""

import math

import torch
from omegaconf import DictConfig

from ..likelihood import ddpm_vlb_bits_per_dim, dequantized_bits_per_dim, pf_ode_log_likelihood
from ..processes import DiscreteDDPM
from .sharding import gather_shards, map_shard


def infer_levels(x: torch.Tensor) -> int:
    """The number of pixel levels L of data on [-1, 1] (x = 2 k / (L - 1) - 1): 256 for 8-bit images, 17 for digits."""
    u = (x.double() + 1) / 2
    for levels in range(2, 257):
        k = u * (levels - 1)
        if torch.allclose(k, k.round(), atol=1e-3):
            return levels
    raise ValueError("the test data are not quantised to <= 256 levels; set likelihood.levels")


def likelihood_metrics(model, x: torch.Tensor, cfg: DictConfig, rank: int, world_size: int, all_gather) -> tuple:
    """Test-set bits/dim: DDPM's discrete VLB (Ho et al. 2020), else the PF-ODE NLL of dequantised data (Song et al. 2021).

    Returns (metrics, protocol). The model is evaluated unconditionally (null label), as the papers report it.
    """
    lk, dim = cfg.likelihood, x[0].numel()
    if isinstance(model.process, DiscreteDDPM):
        # Ho et al. 2020, eq. 5: L_T + sum_t L_{t-1} + L_0, with the 8-bit discretised decoder
        def per_chunk(x0, generator):
            return ddpm_vlb_bits_per_dim(model.denoiser, model.process, x0.to(model.device), generator=generator)

        key, protocol = "bpd_vlb", {"estimator": "DDPM VLB (Ho et al. 2020, eq. 5), 8-bit discretised decoder"}
    else:
        levels = lk.levels or infer_levels(x)
        n_bits = math.log2(levels)

        def per_chunk(x0, generator):
            # x = 2 k / (L - 1) - 1 -> k -> y = 2 (k + u) / L - 1, u ~ U[0, 1): `uniform_dequantize` for any L
            k = ((x0.double() + 1) / 2 * (levels - 1)).round()
            u = torch.rand(k.shape, generator=generator, dtype=torch.float64)
            y = (2 * (k + u) / levels - 1).to(model.device)
            logp = pf_ode_log_likelihood(model.denoiser, model.process, y, n_probes=lk.n_probes, rtol=lk.rtol,
                                         atol=lk.atol, t_min=lk.t_min, generator=generator).logp
            return dequantized_bits_per_dim(-logp, dim, n_bits=n_bits)

        key = "bpd_pf_ode"
        protocol = {"estimator": "PF-ODE, Hutchinson trace, uniform dequantisation (Song et al. 2021, app. D.2)",
                    "levels": levels, "rtol": lk.rtol, "atol": lk.atol, "n_probes": lk.n_probes, "t_min": lk.t_min}
    index, values = map_shard(per_chunk, x, lk.seed, lk.batch_size, rank, world_size)
    values = gather_shards(index, values.double(), all_gather, len(x), lk.batch_size, world_size)
    protocol.update({"split": lk.split, "num_samples": len(x), "seed": lk.seed, "batch_size": lk.batch_size})
    return {key: float(values.mean()), f"{key}_sem": float(values.std() / math.sqrt(len(values)))}, protocol
