"""Multistep PF-ODE solvers in EDM's scaled space: one denoiser call per step, the history carries the higher orders.

Each is `solver(denoiser_tilde, x~, sigmas, generator=None, **opts) -> x~` (run on a process by `pf_ode`), with
lambda = -log sigma~ and h = lambda_next - lambda. Data-prediction solvers (DPM-Solver++(2M / 3M), UniPC) integrate
x~' = (x~ - D) / sigma~ exactly in its linear part; noise-prediction ones (DEIS, iPNDM, LMS) integrate
eps = (x~ - D) / sigma~ over sigma~. A multistep method of order k starts at order 1 and climbs one order per step
(the "warm-up"); `lower_order_final` lowers the last steps' orders again (diffusers' default below 15 steps). A step to
sigma~ = 0 is D itself for the data-prediction solvers (every order's update lands there as h -> inf).
"""

import math

import numpy as np
from numpy.polynomial import polynomial as P
from torch import Tensor

from .brownian import NoiseDraw
from .common import DenoiserFn, levels
from .grids import check_grid


def check_order(name: str, order: int, orders: tuple[int, ...]) -> None:
    """ValueError naming the order and the ones the solver has."""
    if order not in orders:
        raise ValueError(f"{name} has orders {list(orders)}, got order={order!r}")


def check_history(name: str, order: int, sigmas: list[float]) -> None:
    """ValueError when the grid cannot hold the order's history: a step of order k reads k - 1 earlier levels."""
    if len(sigmas) - 1 < order - 1:
        raise ValueError(f"{name} of order {order} reads {order - 1} earlier levels: it needs a grid of at least "
                         f"{order - 1} steps, got {len(sigmas) - 1} (sigmas {sigmas}): take more steps or a lower order")


def log_snr_halves(sigmas: list[float]) -> list[float]:
    """lambda = -log sigma~ of each level (inf at sigma~ = 0): half the logSNR, DPM-Solver's time variable."""
    return [-math.log(s) if s > 0 else math.inf for s in sigmas]


def history_grid(name: str, order: int, sigmas) -> tuple[list[float], list[float]]:
    """The checked grid as floats (`check_grid`, `check_history`) and its lambdas (`log_snr_halves`)."""
    sigmas = check_grid(sigmas, "sigmas").tolist()
    check_history(name, order, sigmas)
    return sigmas, log_snr_halves(sigmas)


def step_orders(n: int, order: int, lower_order_final: bool) -> list[int]:
    """Order of each of n multistep steps: min(order, i + 1) (warm-up), and min(., n - i) with lower_order_final."""
    return [min(order, i + 1, n - i if lower_order_final else order) for i in range(n)]


def lagrange_basis(nodes: list[float]) -> list[np.ndarray]:
    """Coefficients (lowest degree first) of the Lagrange polynomials l_j(u) over `nodes` (l_j(nodes[k]) = [j == k])."""
    basis = []
    for j, u_j in enumerate(nodes):
        others = [u for k, u in enumerate(nodes) if k != j]
        basis.append(P.polyfromroots(others) / np.prod([u_j - u for u in others]) if others else np.ones(1))
    return basis


# ---------------------------------------------------------------- DPM-Solver++ multistep (Lu et al. 2022b)


def dpm_solver_pp_multistep(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, order: int = 2,
                            solver_type: str = "midpoint", lower_order_final: bool = False, eta: float = 0.0,
                            s_noise: float = 1.0, noise: NoiseDraw | None = None) -> Tensor:
    """DPM-Solver++(kM), k <= 3, and its SDE form for eta > 0 (Lu et al. 2022b, Alg. 2; k-diffusion's 2M / 3M SDE).

    The update e^{-h_eta} x~ + (1 - e^{-h_eta}) D plus the phi_2 / phi_3 terms of the divided differences of D, with
    h_eta = (1 + eta) h, then noise sigma~_next sqrt(1 - e^{-2 eta h}) s_noise z. `solver_type` picks the 2nd-order
    term: "midpoint" (1 - e^{-h_eta}) / 2 r (diffusers' default) or "heun" phi_2 = (e^{-h_eta} - 1) / h_eta + 1 (k-diffusion's
    SDE samplers). The step to sigma~ = 0 is D.
    """
    check_order("dpm_solver_pp_multistep", order, (1, 2, 3))
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sigmas = check_grid(sigmas, "sigmas").tolist()
    check_history(f"DPM-Solver++({order}M)", order, sigmas)
    orders = step_orders(len(sigmas) - 1, order, lower_order_final)
    ds, hs = [], []  # newest first: D at the last levels, and the steps h that led to them
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = denoiser_tilde(x, levels(x, s))
        ds = [d] + ds[:2]
        if s_next == 0:
            x = d  # every order lands on D as h -> inf
            continue
        h = math.log(s / s_next)
        h_eta = (1 + eta) * h
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * d
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if orders[i] == 2:
            # one divided difference: slope of D in lambda, times h
            d1 = (ds[0] - ds[1]) / (hs[0] / h)
            x = x + (-0.5 * math.expm1(-h_eta) if solver_type == "midpoint" else phi_2) * d1
        elif orders[i] == 3:
            # two divided differences (first and second derivative of D in lambda)
            r0, r1 = hs[0] / h, hs[1] / h
            d1_0, d1_1 = (ds[0] - ds[1]) / r0, (ds[1] - ds[2]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        if eta > 0:
            x = x + noise(s, s_next) * (s_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        hs = [h] + hs[:1]
    return x


def dpm_solver_pp_2m(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, solver_type: str = "midpoint",
                     generator=None) -> Tensor:
    """DPM-Solver++(2M): multistep data prediction in lambda = -log sigma~ (Lu et al. 2022b, Alg. 2).

    First order (DPM-Solver++ 1 = DDIM) on the first step and on a final step to sigma~ = 0, as k-diffusion.
    """
    return dpm_solver_pp_multistep(denoiser_tilde, x, sigmas, order=2, solver_type=solver_type)


def dpm_solver_pp_3m(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, solver_type: str = "heun",
                     lower_order_final: bool = True, generator=None) -> Tensor:
    """DPM-Solver++(3M): third-order multistep data prediction (Lu et al. 2022b, sec. 4; diffusers' solver_order=3).

    Orders 1, 2, 3, 3, ...; `lower_order_final` ends with 2, 1 (diffusers below 15 steps). `solver_type` is that of
    the order-2 steps: "heun" as k-diffusion's 3M (SDE with eta = 0), "midpoint" as diffusers.
    """
    return dpm_solver_pp_multistep(denoiser_tilde, x, sigmas, order=3, solver_type=solver_type,
                                   lower_order_final=lower_order_final)


# ---------------------------------------------------------------- UniPC (Zhao et al. 2023)


def _unipc_weights(rks: list[float], h: float, order: int, variant: str) -> tuple[np.ndarray, float, float]:
    """UniPC's (R, b) system of order p in the data-prediction form: rows r_k^(i-1), b_i = i! phi_{i+1}(-h) / B(h).

    Returns (the solved weights for the p given nodes, B(h), h phi_1); B(h) = -h ("bh1") or e^{-h} - 1 ("bh2")
    (Zhao et al. 2023, Alg. 2 and eq. 11).
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.array([[r ** (i - 1) for r in rks] for i in range(1, len(rks) + 1)])
    if len(rks) == 1:  # the one-node systems: 1/2, as the paper's UniPC-1 / UniP-2
        return np.array([0.5]), b_h, h_phi_1
    return np.linalg.solve(R, np.array(b[:len(rks)])), b_h, h_phi_1


def unipc(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, order: int = 2, variant: str = "bh2",
          lower_order_final: bool = True, corrector: bool = True, generator=None) -> Tensor:
    """UniPC: the UniP-p predictor and the UniC corrector that reuses the next call's D (Zhao et al. 2023, Alg. 2-3).

    Data prediction, order p predictor, p + 1 with the corrector at no extra NFE (the corrector's D is the next
    predictor's input D, not re-evaluated). `variant` is B(h): "bh1" = -h, "bh2" = e^{-h} - 1. `lower_order_final` as
    diffusers (always, not only below 15 steps). The corrector is off after the last step (no call at sigma~ = 0).
    """
    check_order("unipc", order, (1, 2, 3))
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc's variant must be 'bh1' or 'bh2', got {variant!r}")
    sigmas, lam = history_grid("unipc", order, sigmas)
    orders = step_orders(len(sigmas) - 1, order, lower_order_final)
    ds, x_last = [], None  # ds: D at sigmas[i], sigmas[i - 1], ... (newest first)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = denoiser_tilde(x, levels(x, s))
        if corrector and i > 0:
            # UniC: redo the last step from x_last with the new D at its end, at the last predictor's order
            p, h = orders[i - 1], lam[i] - lam[i - 1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)] + [1.0]
            diffs = [(ds[k] - ds[0]) / rks[k - 1] for k in range(1, p)] + [d - ds[0]]
            rhos, b_h, h_phi_1 = _unipc_weights(rks, h, p, variant)
            x = (sigmas[i] / sigmas[i - 1]) * x_last - h_phi_1 * ds[0] - b_h * sum(w * v for w, v in zip(rhos, diffs))
        ds = [d] + ds[:order]
        x_last = x
        if s_next == 0:
            x = d
            continue
        # UniP-p: the exponential-integrator step plus the divided differences of the history
        p, h = orders[i], lam[i + 1] - lam[i]
        x_next = (s_next / s) * x - math.expm1(-h) * d
        if p > 1:
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
            diffs = [(ds[k] - ds[0]) / rks[k - 1] for k in range(1, p)]
            rhos, b_h, _ = _unipc_weights(rks, h, p - 1, variant)
            x_next = x_next - b_h * sum(w * v for w, v in zip(rhos, diffs))
        x = x_next
    return x


# ---------------------------------------------------------------- noise-prediction multistep: iPNDM, LMS, DEIS

IPNDM_COEFFICIENTS = ([1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def ipndm(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, order: int = 4, generator=None) -> Tensor:
    """iPNDM: Adams-Bashforth on dx~/dsigma~ = eps with fixed-step weights and a lower-order warm-up instead of PNDM's
    Runge-Kutta start (Zhang & Chen 2023, "DEIS", sec. 5 / app. B; Liu et al. 2022, "PNDM")."""
    check_order("ipndm", order, (1, 2, 3, 4))
    sigmas = check_grid(sigmas, "sigmas").tolist()
    check_history("ipndm", order, sigmas)
    eps = []  # newest first
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps = [(x - denoiser_tilde(x, levels(x, s))) / s] + eps[:order - 1]
        weights = IPNDM_COEFFICIENTS[min(order, i + 1) - 1]
        x = x + (s_next - s) * sum(w * e for w, e in zip(weights, eps))
    return x


def lms(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, order: int = 4, generator=None) -> Tensor:
    """Linear multistep in sigma~: x~ += sum_j (int_{sigma_i}^{sigma_i+1} l_j) d_{i-j} over the Lagrange basis of the
    last levels (k-diffusion's `sample_lms`, diffusers' LMSDiscreteScheduler; integrals exact, not by quadrature)."""
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"lms needs an integer order >= 1, got order={order!r}")
    sigmas = check_grid(sigmas, "sigmas").tolist()
    check_history("lms", order, sigmas)
    ds = []  # newest first
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        ds = [(x - denoiser_tilde(x, levels(x, s))) / s] + ds[:order - 1]
        nodes = sigmas[i::-1][:len(ds)]  # sigma_i, sigma_{i-1}, ...
        for basis, d in zip(lagrange_basis(nodes), ds):
            antiderivative = P.polyint(basis)
            x = x + float(P.polyval(s_next, antiderivative) - P.polyval(s, antiderivative)) * d
    return x


def _log_sigma_integral(basis: np.ndarray, s: float, s_next: float) -> float:
    """int_s^s_next l(log r) dr exactly: d/dr [r q(log r)] = (q + q')(log r), so q = l - l' + l'' - ...; r q -> 0 at 0."""
    q, term = np.zeros(1), basis
    for k in range(len(basis)):
        q = P.polyadd(q, (-1) ** k * term)
        term = P.polyder(term)

    def F(r: float) -> float:
        return r * float(P.polyval(math.log(r), q)) if r > 0 else 0.0

    return F(s_next) - F(s)


def deis(denoiser_tilde: DenoiserFn, x: Tensor, sigmas: Tensor, order: int = 2, lower_order_final: bool = True,
         generator=None) -> Tensor:
    """DEIS, multistep: eps extrapolated by a polynomial in log sigma~ through the last `order` levels and integrated
    exactly over sigma~ (Zhang & Chen 2023, tAB-DEIS in rho = sigma~, as diffusers' DEISMultistepScheduler).

    Order 1 is DDIM. `lower_order_final` lowers the last two steps' orders (diffusers does below 15 steps).
    """
    check_order("deis", order, (1, 2, 3))
    sigmas = check_grid(sigmas, "sigmas").tolist()
    check_history("deis", order, sigmas)
    orders = step_orders(len(sigmas) - 1, order, lower_order_final)
    eps = []  # newest first
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps = [(x - denoiser_tilde(x, levels(x, s))) / s] + eps[:order - 1]
        nodes = [math.log(v) for v in sigmas[i::-1][:orders[i]]]
        for basis, e in zip(lagrange_basis(nodes), eps):
            x = x + _log_sigma_integral(basis, s, s_next) * e
    return x
