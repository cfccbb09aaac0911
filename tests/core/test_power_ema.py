"""EDM2's post-hoc EMA math (Karras et al. 2024, Sec. 3, App. C): the power-function EMA against its closed form, and
EMAs of a third length reconstructed from two tracked profiles against the same EMA tracked directly."""

import math

import pytest
import torch

from lightning_diffusion.core.power_ema import (SIGMA_REL_MAX, Snapshot, gamma_to_sigma_rel, load_snapshots,
                                                power_ema_update, power_ema_weights, profile_fit_error,
                                                profile_inner_products, reconstruct, sigma_rel_to_gamma)

TRACKED, TARGET = (0.05, 0.10), 0.08  # the paper's pair, and a length between them to synthesise




# ---- the profiles --------------------------------------------------------------------------------------------------
def test_sigma_rel_and_gamma_are_inverse_and_match_the_paper():
    # EDM2 tracks sigma_rel = 0.05 and 0.10, i.e. gamma = 16.97 and 6.94; the uniform average gamma = 0 has 1/sqrt(12)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(1 / math.sqrt(12))
    for sigma_rel in (0.001, 0.01, 0.05, 0.08, 0.1, 0.2, 0.25, 0.29, 0.3):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    # longer EMA <-> larger sigma_rel <-> smaller gamma, on the branch the inverse picks
    gammas = [sigma_rel_to_gamma(s) for s in (0.02, 0.05, 0.1, 0.2, 0.3)]
    assert gammas == sorted(gammas, reverse=True)


def test_power_function_ema_matches_its_closed_form_on_a_scalar_sequence():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(1000, generator=g, dtype=torch.float64).cumsum(0)  # a random walk
    for sigma_rel in (0.05, 0.1, 0.2):
        gamma = sigma_rel_to_gamma(sigma_rel)
        average = theta[:1].clone()
        for t in range(1, len(theta) + 1):  # beta_t = (1 - 1/t)^(gamma+1); beta_1 = 0 starts at theta_1
            power_ema_update(average, theta[t - 1:t], t, gamma)
        # closed form: weight of step s is (s^(g+1) - (s-1)^(g+1)) / t^(g+1), the profile's mass on (s-1, s]
        w = power_ema_weights(len(theta), gamma)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(average, (w * theta).sum().reshape(1), rtol=1e-12, atol=1e-12)
        # and that profile has relative standard deviation sigma_rel (up to the 1/t of the discretisation)
        s = torch.arange(1, len(theta) + 1, dtype=torch.float64) - 0.5
        std = ((w * s ** 2).sum() - (w * s).sum() ** 2).sqrt() / len(theta)
        assert float(std) == pytest.approx(sigma_rel, rel=1e-3)


def test_an_update_over_skipped_steps_equals_the_single_steps_with_constant_weights():
    gamma = sigma_rel_to_gamma(0.1)
    a, b = torch.tensor([1.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64)
    stepwise = a.clone()
    for t in range(11, 21):
        power_ema_update(stepwise, b, t, gamma)
    jumped = power_ema_update(a.clone(), b, 20, gamma, t_prev=10)
    torch.testing.assert_close(jumped, stepwise, rtol=1e-13, atol=0)


def test_profile_inner_products_match_quadrature():
    gammas, ts = torch.tensor([6.94, 16.97, 9.45]), torch.tensor([300.0, 1000.0, 700.0])

    def quadrature(ga, ta, gb, tb):  # trapezoid over (0, min(t_a, t_b)], where both profiles are smooth
        tau = torch.linspace(0, min(ta, tb), 200_001, dtype=torch.float64)
        p_a, p_b = (ga + 1) * tau ** ga / ta ** (ga + 1), (gb + 1) * tau ** gb / tb ** (gb + 1)
        return float(torch.trapezoid(p_a * p_b, tau))

    pairs = list(zip(gammas.tolist(), ts.tolist()))
    expected = torch.tensor([[quadrature(*a, *b) for b in pairs] for a in pairs], dtype=torch.float64)
    torch.testing.assert_close(profile_inner_products(gammas, ts, gammas, ts), expected, rtol=1e-7, atol=0)


# ---- reconstruction on a synthetic trajectory ----------------------------------------------------------------------
def track(trajectory: torch.Tensor, sigma_rels, every: int) -> list[Snapshot]:
    """Power-function EMAs of a (T, D) trajectory, stored (as float32, like the callback) every `every` steps."""
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    averages = [trajectory[0].clone() for _ in gammas]
    snapshots = []
    for t in range(1, len(trajectory) + 1):
        for average, gamma in zip(averages, gammas):
            power_ema_update(average, trajectory[t - 1], t, gamma)
        if t % every == 0 or t == len(trajectory):
            snapshots += [Snapshot(gamma, t, {"w": a.float().clone()}) for a, gamma in zip(averages, gammas)]
    return snapshots


@pytest.fixture(scope="module")
def synthetic():
    """A 2000-step, 500-parameter trajectory: offset + drift + random walk, tracked with three profiles."""
    g = torch.Generator().manual_seed(1)
    T, D = 2000, 500
    theta = (torch.randn(D, generator=g) + torch.linspace(0, 3, T)[:, None] * torch.randn(D, generator=g)
             + 0.05 * torch.randn(T, D, generator=g).cumsum(0)).double()
    return theta, track(theta, TRACKED, every=50)


@pytest.mark.parametrize("target", [0.06, TARGET, 0.15])
def test_reconstruction_reproduces_a_directly_tracked_ema_of_a_third_length(synthetic, target):
    theta, snapshots = synthetic
    direct = track(theta, (target,), every=len(theta))[-1].state_dict["w"].double()
    state, info = reconstruct(snapshots, target, return_info=True)
    error = float((state["w"].double() - direct).norm())
    # Tolerance 1 (a proof): the discrete EMA is the continuous one of theta(ceil(tau)), so by Cauchy-Schwarz
    # |error| <= ||p_r - sum x_i p_i|| ||theta||_L2(0,T) = fit_error ||p_r|| ||theta||_F, plus the float32
    # rounding of the stored snapshots, sum |x_i| eps_32 ||snapshot_i||
    g = sigma_rel_to_gamma(target)
    p_norm = (g + 1) / math.sqrt((2 * g + 1) * len(theta))
    rounding = sum(abs(x) * 2 ** -24 * float(s.state_dict["w"].double().norm())
                   for x, s in zip(info["coefficients"].tolist(), snapshots))
    assert error <= info["fit_error"] * p_norm * float(theta.norm()) + rounding
    # Tolerance 2 (what a sweep needs): far finer than the gap between the two tracked EMAs (measured 3.7e-5 at 0.08)
    spacing = float((snapshots[-1].state_dict["w"].double() - snapshots[-2].state_dict["w"].double()).norm())
    assert error < 1e-3 * spacing, (error, spacing)
    assert float(info["coefficients"].sum()) == pytest.approx(1.0, abs=1e-3)  # an average of averages


def test_reconstruction_of_a_tracked_length_and_of_an_earlier_step(synthetic):
    theta, snapshots = synthetic
    # a tracked profile comes back as its own snapshot
    state = reconstruct(snapshots, 0.05)
    torch.testing.assert_close(state["w"], snapshots[-2].state_dict["w"], rtol=1e-5, atol=1e-5)
    # the EMA as of step 1000 uses only the snapshots up to step 1000
    direct = track(theta[:1000], (TARGET,), every=1000)[-1].state_dict["w"].double()
    state, info = reconstruct(snapshots, TARGET, t=1000, return_info=True)
    assert max(t for _, t in info["snapshots"]) == 1000 and info["t"] == 1000
    assert float((state["w"].double() - direct).norm()) < 1e-3 * float(direct.norm())


def test_fit_error_grows_outside_the_tracked_range():
    """Profile-fit diagnostics: the synthesised profile matches well between the tracked lengths, less far outside."""
    gammas = [sigma_rel_to_gamma(s) for s in TRACKED for _ in range(40)]
    ts = [50 * (i + 1) for _ in TRACKED for i in range(40)]
    errors = {}
    for target in (0.02, TARGET, 0.25):
        x = reconstruct([Snapshot(g, t, {"w": torch.zeros(1)}) for g, t in zip(gammas, ts)], target,
                        return_info=True)[1]["coefficients"]
        errors[target] = profile_fit_error(gammas, ts, x, sigma_rel_to_gamma(target), 2000)
    assert errors[TARGET] < 1e-3 < errors[0.02] and errors[TARGET] < errors[0.25]


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, SIGMA_REL_MAX, 0.5, float("nan")])
def test_sigma_rel_outside_its_range_is_a_clear_error(sigma_rel):
    with pytest.raises(ValueError, match=f"sigma_rel={sigma_rel}"):
        sigma_rel_to_gamma(sigma_rel)


def test_missing_snapshots_are_a_clear_error(tmp_path, synthetic):
    with pytest.raises(ValueError, match="no snapshots to reconstruct the EMA with sigma_rel=0.08"):
        reconstruct([], 0.08)
    with pytest.raises(ValueError, match=f"no post-hoc EMA snapshots .* in {tmp_path}"):
        load_snapshots(tmp_path)
    with pytest.raises(ValueError, match="no snapshot at or before step t=10"):
        reconstruct(synthetic[1], 0.08, t=10)
