"""Noise sources of the stochastic scaled-space samplers: `noise(x, sigmas, generator) -> draw(sigma, sigma_next)`.

`draw(sigma, sigma_next)` returns the N(0, I) noise of the step sigma -> sigma_next, as k-diffusion's noise samplers do.
`gaussian_noise` draws fresh noise from the generator on every call (a sample then depends on how many steps drew
before). `brownian_noise` reads the increments of one Brownian path W fixed by the generator, normalised,
(W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|: the same path under any grid, so a sample converges as the step
count grows instead of changing with it (Kidger et al. 2021's Brownian interval; k-diffusion's
BrownianTreeNoiseSampler over torchsde).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .common import randn
from .grids import check_grid

NoiseDraw = Callable[[float, float], Tensor]  # draw(sigma, sigma_next) -> N(0, I) shaped like x


def gaussian_noise(x: Tensor, sigmas, generator: torch.Generator | None = None) -> NoiseDraw:
    """Fresh N(0, I) from `generator` on every step (k-diffusion's default_noise_sampler)."""
    return lambda sigma, sigma_next: randn(x, generator)


class BrownianTree:
    """A Brownian motion W on [t0, t1], W(t0) = 0, that any query reads from one fixed path (Levy's construction).

    W(t1) ~ N(0, t1 - t0); each dyadic midpoint m of a node [a, b] is drawn from the bridge,
    W(m) = (W(a) + W(b)) / 2 + sqrt((b - a) / 4) z, with z seeded by (seed, depth, index), so a value never depends on
    the order or the number of queries. A query descends `depth` levels and interpolates linearly in its leaf (of
    width (t1 - t0) 2^-depth); the nodes of the last descent are kept, so neighbouring queries share their prefix.
    """

    def __init__(self, like: Tensor, t0: float, t1: float, seed: int, depth: int = 24):
        if not t0 < t1:
            raise ValueError(f"BrownianTree needs t0 < t1, got t0={t0}, t1={t1}")
        if depth < 1:
            raise ValueError(f"BrownianTree needs depth >= 1, got {depth}")
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.t0, self.t1, self.seed, self.depth = t0, t1, seed, depth
        self.nodes: dict[tuple[int, int], Tensor] = {}

    def _normal(self, depth: int, index: int) -> Tensor:
        # one seed per node, mixed from (seed, depth, index) (splitmix64 constants)
        key = (self.seed * 0x9E3779B97F4A7C15 + depth * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**63 - 1)
        g = torch.Generator().manual_seed(key)
        return torch.randn(self.shape, generator=g, dtype=torch.float64).to(self.device)

    def _node(self, depth: int, index: int, parents: tuple[Tensor, Tensor]) -> Tensor:
        if (depth, index) not in self.nodes:
            width = (self.t1 - self.t0) * 2.0 ** -(depth - 1)  # the parent's width
            self.nodes[(depth, index)] = (parents[0] + parents[1]) / 2 + math.sqrt(width / 4) * self._normal(depth, index)
        return self.nodes[(depth, index)]

    def __call__(self, t: float) -> Tensor:
        """W(t), in float64."""
        if not self.t0 <= t <= self.t1:
            raise ValueError(f"BrownianTree is defined on [{self.t0}, {self.t1}], got t={t}")
        if len(self.nodes) > 4 * self.depth:
            self.nodes = {k: v for k, v in self.nodes.items() if k[0] == 0}  # keep the root only
        left = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        right = self.nodes.setdefault((0, 0), math.sqrt(self.t1 - self.t0) * self._normal(0, 0))
        a, b, index = self.t0, self.t1, 0  # W(a) = left, W(b) = right
        for depth in range(1, self.depth + 1):
            mid = (a + b) / 2
            w_mid = self._node(depth, index, (left, right))
            # descend into the half that holds t; a node's children are indexed 2i and 2i + 1
            if t < mid:
                b, right, index = mid, w_mid, 2 * index
            else:
                a, left, index = mid, w_mid, 2 * index + 1
        return left + (t - a) / (b - a) * (right - left)


def brownian_noise(x: Tensor, sigmas, generator: torch.Generator | None = None, depth: int = 24) -> NoiseDraw:
    """Normalised increments of one Brownian path in log sigma~, seeded by one draw from `generator`.

    The path runs over [log sigma_min, log sigma_max] of the grid's positive levels: log time resolves the small
    levels as finely as the large ones (a leaf is 2^-depth of the range). Increments over disjoint steps are
    independent N(0, I) in any time variable, so the samplers' noise has the right law; the time variable only decides
    how noise is shared between grids.
    """
    sigmas = check_grid(sigmas, "sigmas")
    positive = sigmas[sigmas > 0]
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    lo, hi = math.log(float(positive.min())), math.log(float(positive.max()))
    tree = BrownianTree(x, lo, hi if hi > lo else lo + 1.0, seed, depth)

    def draw(sigma: float, sigma_next: float) -> Tensor:
        a, b = (min(max(math.log(s), tree.t0), tree.t1) for s in (sigma, sigma_next))
        return ((tree(a) - tree(b)) / math.sqrt(abs(a - b))).to(x.dtype)

    return draw
