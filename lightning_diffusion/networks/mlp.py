"""A residual MLP denoising network F(x, c_noise, labels) for low-dimensional data (2-D toys, flattened digits)."""

import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import NoiseLabelEmbedding, check_embedding_args


class MLPBlock(nn.Module):
    """Pre-norm residual block h + W2 SiLU(W1 SiLU(LN h) + P SiLU(emb)), the embedding added inside."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.emb_proj(F.silu(emb))
        return h + self.fc2(F.silu(z))


class MLP(nn.Module):
    """Residual SiLU MLP for (B, dim) data, the noise-level (and class) embedding added in every block."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, emb_dim: int = 128, num_classes: int = 0,
                 embedding: str = "positional", out_dim: int | None = None, embedding_scale: float | None = None):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if value < 1:
                raise ValueError(f"MLP {name} must be >= 1, got {value}")
        if emb_dim < 2 or emb_dim % 2:
            raise ValueError(f"MLP emb_dim must be an even integer >= 2, got {emb_dim}")
        if out_dim is not None and out_dim < 1:
            raise ValueError(f"MLP out_dim must be None (= dim) or >= 1, got {out_dim}")
        check_embedding_args(embedding, num_classes)
        self.dim, self.out_dim, self.num_classes = dim, out_dim or dim, num_classes
        self.emb = NoiseLabelEmbedding(emb_dim, emb_dim, num_classes, embedding, embedding_scale)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.out_dim)
        # zero-initialised output: F = 0 at the start (Ho et al. 2020's last conv; Dhariwal & Nichol 2021)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = self.emb(c_noise, labels, x.shape[0], x.dtype)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))
