"""Noise-level and class embeddings of c_noise (the parameterization's noise input), labels and augmentation labels.

A class-conditional network holds `num_classes + 1` class embeddings; label `num_classes` (or labels=None) is the null
class used by classifier-free guidance (Ho & Salimans 2022).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of scale * c_noise (Vaswani et al. 2017; DDPM's t embedding, Ho et al. 2020).

    Frequencies max_period^(-k / (half - 1)), k = 0..half-1 (DDPM's `get_timestep_embedding`, EDM's endpoint=True);
    `endpoint=False` divides by half instead and `cos_first` puts the cosines first, as ADM does (Dhariwal & Nichol
    2021, `timestep_embedding`).
    """

    default_scale = 250.0  # c_noise in about -3..3 then spans about the range of DDPM's integer timesteps

    def __init__(self, dim: int, scale: float | None = None, max_period: float = 10_000.0, endpoint: bool = True,
                 cos_first: bool = False):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"PositionalEmbedding dim must be an even integer >= 2, got {dim}")
        self.dim, self.scale = dim, self.default_scale if scale is None else float(scale)
        self.cos_first, self.log_period = cos_first, math.log(max_period)
        self.denominator = max(dim // 2 - 1, 1) if endpoint else dim // 2

    def forward(self, c_noise: Tensor) -> Tensor:
        dtype = torch.promote_types(c_noise.dtype, torch.float32)  # float32 at least; a float64 network's in float64
        k = torch.arange(self.dim // 2, dtype=dtype, device=c_noise.device)
        freqs = torch.exp(-self.log_period * k / self.denominator)
        args = (self.scale * c_noise.to(dtype))[:, None] * freqs[None, :]
        return torch.cat([args.cos(), args.sin()] if self.cos_first else [args.sin(), args.cos()], dim=1)


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
        dtype = torch.promote_types(c_noise.dtype, torch.float32)
        args = 2 * math.pi * c_noise.to(dtype)[:, None] * self.freqs.to(dtype)[None, :]
        return torch.cat([args.sin(), args.cos()], dim=1)


EMBEDDINGS = {"positional": PositionalEmbedding, "fourier": FourierEmbedding}


class ClassEmbedding(nn.Embedding):
    """Class label -> vector; the null label `num_classes` is a learned row, or (learned_null=False) the zero vector.

    A learned null row gives it the parameters of EDM's SongUNet label map, Linear(one-hot) + bias, whose null (label
    dropout's zeroed one-hot) is the bias; a zero null row those of EDM's bias-free DhariwalUNet map (Karras et al.
    2022). Either is the same function of the label as EDM's.
    """

    def __init__(self, num_classes: int, dim: int, learned_null: bool = True):
        super().__init__(num_classes + int(learned_null), dim)
        self.learned_null = learned_null

    def forward(self, labels: Tensor) -> Tensor:
        table = self.weight if self.learned_null else F.pad(self.weight, (0, 0, 0, 1))  # append the zero null row
        return F.embedding(labels, table)


class NoiseLabelEmbedding(nn.Module):
    """c_noise -> sin/Fourier features -> SiLU MLP, + class embedding (Ho et al. 2020; Dhariwal & Nichol 2021).

    `labels_first` adds the class embedding to the features, before the MLP (EDM's SongUNet), instead of to its
    output (ADM). `augment_dim` > 0 adds a bias-free linear map of EDM's augmentation labels (B, augment_dim) to the
    features (Karras et al. 2022, sec. 5, non-leaky augmentation); None stands for zeros. The output is
    pre-activation: each block applies SiLU before its own projection.
    """

    def __init__(self, base_dim: int, emb_dim: int, num_classes: int = 0, embedding: str = "positional",
                 embedding_scale: float | None = None, augment_dim: int = 0, labels_first: bool = False,
                 learned_null: bool = True, **feature_kwargs):
        super().__init__()
        check_embedding_args(embedding, num_classes, augment_dim)
        self.num_classes, self.augment_dim, self.labels_first = num_classes, augment_dim, labels_first
        self.features = EMBEDDINGS[embedding](base_dim, embedding_scale, **feature_kwargs)
        self.augment_proj = nn.Linear(augment_dim, base_dim, bias=False) if augment_dim else None
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # num_classes + 1 rows: the last one is the unconditional (null) class
        label_dim = base_dim if labels_first else emb_dim
        self.label_emb = ClassEmbedding(num_classes, label_dim, learned_null) if num_classes > 0 else None

    def forward(self, c_noise: Tensor, labels: Tensor | None, batch: int, dtype: torch.dtype,
                augment_labels: Tensor | None = None) -> Tensor:
        c_noise = torch.as_tensor(c_noise, device=self.mlp[0].weight.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        if c_noise.shape != (batch,):
            raise ValueError(f"c_noise must have shape ({batch},) or be a scalar, got {tuple(c_noise.shape)}")
        labels = self._labels(labels, batch)
        features = self.features(c_noise).to(dtype)
        if augment_labels is not None or self.augment_proj is not None:
            features = features + self.augment_proj(self._augment_labels(augment_labels, batch, features))
        if labels is not None and self.labels_first:
            features = features + self.label_emb(labels)
        emb = self.mlp(features)
        return emb + self.label_emb(labels) if labels is not None and not self.labels_first else emb

    def _labels(self, labels: Tensor | None, batch: int) -> Tensor | None:
        """The labels to embed: None for an unconditional network, the null class where none were given."""
        if self.label_emb is None:
            if labels is not None:
                raise ValueError("labels were given to an unconditional network (num_classes=0); "
                                 "pass labels=None or build it with num_classes > 0")
            return None
        if labels is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=self.mlp[0].weight.device)
        return labels

    def _augment_labels(self, augment_labels: Tensor | None, batch: int, like: Tensor) -> Tensor:
        """The given augmentation labels, or zeros (no augmentation; the map still takes part, as DDP needs)."""
        if self.augment_proj is None:
            raise ValueError("augment_labels were given to a network without augmentation input (augment_dim=0); "
                             "pass augment_labels=None or build it with augment_dim > 0 (EDM's pipeline: 9)")
        if augment_labels is None:
            return like.new_zeros(batch, self.augment_dim)
        if augment_labels.shape != (batch, self.augment_dim):
            raise ValueError(f"augment_labels must have shape ({batch}, {self.augment_dim}) (batch, augment_dim), "
                             f"got {tuple(augment_labels.shape)}")
        return augment_labels.to(like.dtype)


def check_embedding_args(embedding: str, num_classes: int, augment_dim: int = 0):
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {sorted(EMBEDDINGS)}, got {embedding!r}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
    if augment_dim < 0:
        raise ValueError(f"augment_dim must be >= 0 (0 = no augmentation labels), got {augment_dim}")
