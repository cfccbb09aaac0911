"""2-D toy distributions and exact Gaussian-mixture data, generated in memory from a seed.

Each toy is a function (n, generator) -> (n, 2) float32, scaled to roughly zero mean and unit scale;
TOYS maps the config name to it, and a new toy is one function plus one entry.
"""

import math
from collections.abc import Callable

import torch
from sklearn.datasets import make_moons, make_swiss_roll
from torch import Tensor
from torch.utils.data import TensorDataset

from ...core.oracles import GaussianMixture
from .base import DiffusionDataModule


def _numpy_seed(generator: torch.Generator) -> int:
    return int(torch.randint(2**31 - 1, (), generator=generator))


def moons(n: int, generator: torch.Generator) -> Tensor:
    """Two interleaving half circles (scikit-learn's make_moons, noise 0.05), centred and scaled by 1 / 0.72."""
    x, _ = make_moons(n, noise=0.05, random_state=_numpy_seed(generator))
    return ((torch.from_numpy(x) - torch.tensor([0.5, 0.25])) / 0.72).float()


def swiss_roll(n: int, generator: torch.Generator) -> Tensor:
    """The 2-D Swiss roll (scikit-learn's make_swiss_roll, noise 0.5, axes x and z), centred and scaled by 1 / 6.8."""
    x, _ = make_swiss_roll(n, noise=0.5, random_state=_numpy_seed(generator))
    return ((torch.from_numpy(x[:, [0, 2]]) - torch.tensor([2.0, 0.2])) / 6.8).float()


def eight_gaussians(n: int, generator: torch.Generator) -> Tensor:
    """Eight Gaussians (std 0.1) on a circle of radius sqrt(2), so each coordinate has variance about 1."""
    k = torch.randint(8, (n,), generator=generator)
    angle = 2 * math.pi * k / 8
    centres = math.sqrt(2) * torch.stack([angle.cos(), angle.sin()], dim=1)
    return (centres + 0.1 * torch.randn(n, 2, generator=generator)).float()


def checkerboard(n: int, generator: torch.Generator) -> Tensor:
    """Uniform on the black squares of a 4x4 board on [-2, 2]^2 (FFJORD's toy), scaled to unit variance per axis."""
    x1 = 4 * torch.rand(n, generator=generator) - 2
    # x2 in a unit square [-2, -1) or [0, 1), lifted by one square where floor(x1) is odd
    x2 = torch.rand(n, generator=generator) - 2 * torch.randint(2, (n,), generator=generator) + x1.floor() % 2
    return (torch.stack([x1, x2], dim=1) / (2 / math.sqrt(3))).float()


TOYS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "moons": moons,
    "swiss_roll": swiss_roll,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
}


class ToyDataModule(DiffusionDataModule):
    """num_samples points of a 2-D toy, named in TOYS (or any (n, generator) -> (n, 2) function); unlabeled."""

    def __init__(self, name: str | Callable = "moons", num_samples: int = 10_000, batch_size: int = 256,
                 num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1):
        if not callable(name) and name not in TOYS:
            raise ValueError(f"unknown toy name={name!r}; accepted: {sorted(TOYS)}")
        if not (isinstance(num_samples, int) and num_samples >= 2):
            raise ValueError(f"num_samples={num_samples!r}: need an int >= 2")
        super().__init__(batch_size, num_workers, seed, val_fraction)
        self.generate = name if callable(name) else TOYS[name]
        self.num_samples = num_samples
        self.shape, self.num_classes = (2,), 0

    def load(self) -> TensorDataset:
        x = self.generate(self.num_samples, torch.Generator().manual_seed(self.seed))
        return TensorDataset(x.float(), torch.zeros(len(x), dtype=torch.long))


class GaussianMixtureDataModule(DiffusionDataModule):
    """Samples of an isotropic Gaussian mixture with modes on a circle; `.oracle` is the exact distribution."""

    def __init__(self, num_modes: int = 8, radius: float = 2.0, std: float = 0.1, num_samples: int = 10_000,
                 batch_size: int = 256, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1):
        if not (isinstance(num_modes, int) and num_modes >= 1):
            raise ValueError(f"num_modes={num_modes!r}: need an int >= 1")
        if not (radius >= 0 and std > 0):
            raise ValueError(f"radius={radius!r}, std={std!r}: need radius >= 0 and std > 0")
        if not (isinstance(num_samples, int) and num_samples >= 2):
            raise ValueError(f"num_samples={num_samples!r}: need an int >= 2")
        super().__init__(batch_size, num_workers, seed, val_fraction)
        angle = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
        self.oracle = GaussianMixture.isotropic(radius * torch.stack([angle.cos(), angle.sin()], dim=1), std)
        self.num_samples = num_samples
        self.shape, self.num_classes = (2,), 0

    def load(self) -> TensorDataset:
        x = self.oracle.sample(self.num_samples, torch.Generator().manual_seed(self.seed))
        return TensorDataset(x.float(), torch.zeros(len(x), dtype=torch.long))
