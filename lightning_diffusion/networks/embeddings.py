"""Noise-level and class embeddings of c_noise (the parameterization's noise input) and labels.

A class-conditional network holds `num_classes + 1` class embeddings; label `num_classes` (or labels=None) is the null
class used by classifier-free guidance (Ho & Salimans 2022).
"""

import math

import torch
from torch import Tensor, nn


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of scale * c_noise (Vaswani et al. 2017; DDPM's t embedding, Ho et al. 2020)."""

    default_scale = 250.0  # c_noise in about -3..3 then spans about the range of DDPM's integer timesteps

    def __init__(self, dim: int, scale: float | None = None, max_period: float = 10_000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"PositionalEmbedding dim must be an even integer >= 2, got {dim}")
        self.dim, self.scale = dim, self.default_scale if scale is None else float(scale)
        half = dim // 2
        # frequencies max_period^(-k / (half - 1)), k = 0..half-1, as in DDPM's get_timestep_embedding
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        args = (self.scale * c_noise.float())[:, None] * self.freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of c_noise, fixed Gaussian frequencies (Tancik et al. 2020; NCSN++, Song et al. 2021)."""

    default_scale = 16.0

    def __init__(self, dim: int, scale: float | None = None):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"FourierEmbedding dim must be an even integer >= 2, got {dim}")
        self.dim, self.scale = dim, self.default_scale if scale is None else float(scale)
        # persistent: the frequencies are drawn once and must travel with the checkpoint
        self.register_buffer("freqs", torch.randn(dim // 2) * self.scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        args = 2 * math.pi * c_noise.float()[:, None] * self.freqs.float()[None, :]
        return torch.cat([args.sin(), args.cos()], dim=1)


EMBEDDINGS = {"positional": PositionalEmbedding, "fourier": FourierEmbedding}


class NoiseLabelEmbedding(nn.Module):
    """c_noise -> sin/Fourier features -> SiLU MLP, + class embedding (Ho et al. 2020; Dhariwal & Nichol 2021)."""

    def __init__(self, base_dim: int, emb_dim: int, num_classes: int = 0, embedding: str = "positional",
                 embedding_scale: float | None = None):
        super().__init__()
        check_embedding_args(embedding, num_classes)
        self.num_classes = num_classes
        self.features = EMBEDDINGS[embedding](base_dim, embedding_scale)
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # num_classes + 1 rows: the last one is the unconditional (null) class
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

    def forward(self, c_noise: Tensor, labels: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        c_noise = torch.as_tensor(c_noise, device=self.mlp[0].weight.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        if c_noise.shape != (batch,):
            raise ValueError(f"c_noise must have shape ({batch},) or be a scalar, got {tuple(c_noise.shape)}")
        emb = self.mlp(self.features(c_noise).to(dtype))
        if self.label_emb is None:
            if labels is not None:
                raise ValueError("labels were given to an unconditional network (num_classes=0); "
                                 "pass labels=None or build it with num_classes > 0")
            return emb
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
        return emb + self.label_emb(labels)


def check_embedding_args(embedding: str, num_classes: int):
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {sorted(EMBEDDINGS)}, got {embedding!r}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
