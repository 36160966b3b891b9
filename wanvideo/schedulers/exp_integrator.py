"""Exponential-integrator weights shared by the multistep solvers (:mod:`.deis`, :mod:`.sa_solver`).

Both solvers integrate a Lagrange interpolant of earlier model predictions against ``e^u`` over one step:
``w_j = ∫_a^b e^u ℓ_j(u) du`` with ``ℓ_j`` the Lagrange basis polynomial of node ``j``. For a polynomial ``P`` of
degree d an antiderivative of ``e^u P(u)`` is ``e^u Σ_k (-1)^k P^(k)(u)``, so the weights are exact closed forms. They
are computed in float64 Python/numpy scalars, with ``u`` centred on the first node to keep the numbers moderate; the
solvers turn them into float32 coefficients.

For the flow latent ``x = (1 - σ) x0 + σ ε`` the log-SNR is ``λ = log((1 - σ) / σ)``; it is -inf at σ = 1 and +inf at
σ = 0, so an integral may start at -inf (the integrand vanishes there) but a node must be finite.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
from numpy.polynomial import polynomial as npoly

LOWER_ORDER_FINAL_STEPS = 15


def log_snr(sigma: float) -> float:
    """``λ = log((1 - σ) / σ)`` in float64: -inf at σ = 1, +inf at σ = 0."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _basis(nodes: Sequence[float], j: int) -> np.ndarray:
    """Power-series coefficients (lowest first) of the Lagrange basis polynomial of node ``j``."""
    others = [n for k, n in enumerate(nodes) if k != j]
    if not others:
        return np.ones(1)
    return npoly.polyfromroots(others) / float(np.prod([nodes[j] - n for n in others]))


def _exp_antiderivative(poly: np.ndarray) -> np.ndarray:
    """Coefficients of ``Q = Σ_k (-1)^k P^(k)``, so that ``d/du (e^u Q(u)) = e^u P(u)``."""
    total = np.zeros_like(poly)
    term, sign = poly, 1.0
    while term.size and np.any(term != 0):
        total[:term.size] += sign * term
        term, sign = npoly.polyder(term), -sign
    return total


def lagrange_exp_weights(start: float, end: float, nodes: Sequence[float]) -> List[float]:
    """``[∫_start^end e^u ℓ_j(u) du for j]`` for the Lagrange basis over ``nodes`` (float64).

    ``nodes`` must be finite and distinct; ``start``/``end`` may be -inf (that end contributes 0) but not +inf.
    One node gives the plain integral ``e^end - e^start``.
    """
    if not nodes:
        raise ValueError("lagrange_exp_weights: at least one node is needed")
    if len(nodes) > 1 and not all(math.isfinite(n) for n in nodes):
        raise ValueError(f"lagrange_exp_weights: interpolation nodes must be finite, got {list(nodes)}")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"lagrange_exp_weights: interpolation nodes must be distinct, got {list(nodes)}")
    if start == math.inf or end == math.inf:
        raise ValueError("lagrange_exp_weights: the integral diverges at +inf (a step to sigma 0 must be first order)")
    center = nodes[0] if math.isfinite(nodes[0]) else max(start, end)
    local = [n - center for n in nodes] if len(nodes) > 1 else [0.0]

    def primitive(anti: np.ndarray, bound: float) -> float:
        if bound == -math.inf:
            return 0.0
        return math.exp(bound - center) * float(npoly.polyval(bound - center, anti))

    weights = []
    for j in range(len(nodes)):
        anti = _exp_antiderivative(_basis(local, j))
        weights.append(math.exp(center) * (primitive(anti, end) - primitive(anti, start)))
    return weights


def interior(sigma: float) -> bool:
    """Whether σ lies strictly inside (0, 1), where log-SNR is finite (a usable interpolation node)."""
    return 0.0 < sigma < 1.0


def multistep_order(requested: int, history_sigmas: Sequence[float], step_index: int, num_steps: int,
                    sigma_next: float) -> int:
    """Order of a multistep step: at most ``requested`` and the count of newest history points with finite log-SNR
    (at least 1); a step onto σ = 0 is first order; with fewer than 15 steps the last step is first order and the
    one before at most second order (diffusers' ``lower_order_final``).
    """
    usable = 0
    for sigma in reversed(history_sigmas):
        if not interior(sigma):
            break
        usable += 1
    order = min(requested, max(usable, 1))
    short = num_steps < LOWER_ORDER_FINAL_STEPS
    if step_index == num_steps - 1 and (short or sigma_next <= 0.0):
        return 1
    if step_index == num_steps - 2 and short:
        return min(order, 2)
    return order


def first_order_flow_step(x, x0, sigma_s: float, sigma_t: float):
    """DDIM / first-order exponential step σ_s → σ_t: ``(σ_t/σ_s) x + (α_t - σ_t α_s / σ_s) x0`` (any σ_s > 0)."""
    ratio = sigma_t / sigma_s
    return ratio * x + ((1.0 - sigma_t) - ratio * (1.0 - sigma_s)) * x0
