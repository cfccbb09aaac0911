"""Held-out bits/dim with its protocol, sharded over ranks: `evaluate`'s likelihood and the in-training check."""

import math
from dataclasses import dataclass

import torch

from ...core.likelihood import ddpm_vlb_bits_per_dim, dequantized_bits_per_dim, pf_ode_log_likelihood
from ..progress import progress_bar
from .sharding import gather_shards, map_shard


@dataclass(frozen=True)
class LikelihoodOptions:
    """How test-set bits/dim are estimated (`evaluate`'s `likelihood:` block, the in-training check's arguments)."""

    split: str = "val"
    num_samples: int | None = 1000  # None: the whole split
    batch_size: int = 100
    seed: int = 0
    levels: int | None = None  # pixel levels of the data; None: inferred (256 for 8-bit images, 17 for the digits)
    rtol: float = 1e-5
    atol: float = 1e-5
    n_probes: int = 1
    t_min: float | None = None  # None: the process's own


def infer_levels(x: torch.Tensor) -> int:
    """The number of pixel levels L of data on [-1, 1] (x = 2 k / (L - 1) - 1): 256 for 8-bit images, 17 for digits."""
    u = (x.double() + 1) / 2
    for levels in range(2, 257):
        k = u * (levels - 1)
        if torch.allclose(k, k.round(), atol=1e-3):
            return levels
    raise ValueError("the test data are not quantised to <= 256 levels; set likelihood.levels")


def likelihood_metrics(model, x: torch.Tensor, lk: LikelihoodOptions, rank: int = 0, world_size: int = 1,
                       all_gather=None, progress: bool = True, between_rounds=None) -> tuple[dict, dict]:
    """Test-set bits/dim: DDPM's discrete VLB (Ho et al. 2020), else the PF-ODE NLL of dequantised data (Song et al. 2021).

    Returns (metrics, protocol). The model is evaluated unconditionally (null label), as the papers report it.
    """
    dim = x[0].numel()
    if model.process.discrete:
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
    with progress_bar(len(x), f"bits/dim ({key})", progress, "image") as bar:
        index, values = map_shard(per_chunk, x, lk.seed, lk.batch_size, rank, world_size, bar.update,
                                  between_rounds)
    values = gather_shards(index, values.double(), all_gather, len(x), lk.batch_size, world_size)
    protocol.update({"split": lk.split, "num_samples": len(x), "seed": lk.seed, "batch_size": lk.batch_size})
    return {key: float(values.mean()), f"{key}_sem": float(values.std() / math.sqrt(len(values)))}, protocol
