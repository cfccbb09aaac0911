"""Two-sample distances on cases with known values."""

import math

import pytest
import torch

from lightning_diffusion.core.distances import energy_distance, mmd_rbf, sliced_wasserstein


def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_energy_distance_exact_small_cases():
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    assert float(energy_distance(a, b)) == pytest.approx(2 * 5.0)  # two point masses: 2 |a - b|
    x = torch.randn(50, 3)
    assert float(energy_distance(x, x)) == pytest.approx(0.0, abs=1e-12)
    y = torch.randn(70, 3) + 0.5
    assert float(energy_distance(x, y)) == pytest.approx(float(energy_distance(y, x)), rel=1e-12)
    assert float(energy_distance(2 * x, 2 * y)) == pytest.approx(2 * float(energy_distance(x, y)), rel=1e-10)
    # V-statistic by hand: {0, 1} vs {2}: 2 * (2 + 1) / 2 - (0 + 1 + 1 + 0) / 4 - 0
    assert float(energy_distance(torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0]]))) == pytest.approx(2.5)


def test_energy_distance_of_shifted_normals_in_1d():
    """E|X - Y| for X - Y ~ N(m, 2): s sqrt(2/pi) exp(-m^2 / 2 s^2) + m (1 - 2 Phi(-m / s)); E|X - X'| = 2 / sqrt(pi)."""
    m, s = 1.0, math.sqrt(2)
    cross = s * math.sqrt(2 / math.pi) * math.exp(-(m**2) / (2 * s**2)) + m * (1 - 2 * normal_cdf(-m / s))
    exact = 2 * cross - 2 * (2 / math.sqrt(math.pi))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 1, generator=g, dtype=torch.float64)
    y = torch.randn(3000, 1, generator=g, dtype=torch.float64) + m
    assert float(energy_distance(x, y)) == pytest.approx(exact, rel=0.1)
    assert float(energy_distance(x, y)) > 5 * float(energy_distance(x, torch.randn(3000, 1, generator=g)))


def test_mmd_rbf_of_shifted_gaussians():
    """x ~ N(0, s^2 I), y ~ N(m, s^2 I): MMD^2 = sum_h 2 c_h (1 - exp(-|m|^2 / (2 (h^2 + 2 s^2)))).

    c_h = (h^2 / (h^2 + 2 s^2))^(D/2) (Gaussian integrals of the RBF kernel).
    """
    D, s, m, hs = 2, 1.0, torch.tensor([1.0, 0.5], dtype=torch.float64), (0.5, 1.0, 2.0)
    exact = sum(2 * (h**2 / (h**2 + 2 * s**2)) ** (D / 2) * (1 - math.exp(-float(m @ m) / (2 * (h**2 + 2 * s**2))))
                for h in hs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, D, generator=g, dtype=torch.float64)
    y = torch.randn(2000, D, generator=g, dtype=torch.float64) + m
    assert float(mmd_rbf(x, y, hs)) == pytest.approx(exact, rel=0.1)
    assert float(mmd_rbf(x, x, hs)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="bandwidths"):
        mmd_rbf(x, y, (1.0, -1.0))


def test_sliced_wasserstein_of_a_translation():
    """y = x + m: every 1-D projection is shifted by theta^T m, so SW_2^2 = mean (theta^T m)^2 -> |m|^2 / D."""
    D, m = 4, torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(500, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sw = sliced_wasserstein(x, x + m, n_projections=64, generator=torch.Generator().manual_seed(1))
    theta = torch.randn(D, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theta = theta / theta.norm(dim=0)
    assert float(sw) == pytest.approx(float(((m @ theta) ** 2).mean().sqrt()), rel=1e-10)
    many = sliced_wasserstein(x, x + m, n_projections=4000, generator=torch.Generator().manual_seed(2))
    assert float(many) == pytest.approx(float(m.norm()) / math.sqrt(D), rel=0.03)
    # a permutation of the same cloud is at distance 0; unequal sizes go through quantiles
    assert float(sliced_wasserstein(x, x[torch.randperm(500)], 16)) == pytest.approx(0.0, abs=1e-12)
    unequal = sliced_wasserstein(x, x[:250] + m, n_projections=4000, generator=torch.Generator().manual_seed(2))
    assert float(unequal) == pytest.approx(float(m.norm()) / math.sqrt(D), rel=0.1)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(5, 2\) and \(5, 3\)"):
        energy_distance(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 2), n_projections=0)
