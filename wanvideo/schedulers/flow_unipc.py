"""UniPC multistep solver for flow matching (Zhao et al., arXiv:2302.04867), B(h) = e^h - 1 ("bh2"), data prediction.

The flow latent ``x = (1 - σ) x0 + σ ε`` has ``α = 1 - σ`` and ``λ = log α - log σ``; the model's velocity is turned into
``x0 = x - σ v``. Step ``i``: the UniC corrector refines ``x_i`` with the new x0 (every step after the first), the
UniP predictor of order ``min(order, steps left, history + 1)`` moves it to σ_{i+1}. Scalar coefficients are computed
in float32 0-d tensors on the CPU, as Wan2.1's ``FlowUniPCMultistepScheduler`` does (fixtures §5.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .sigmas import FlowGrid, FlowScheduler


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


def _bh2_system(hh: torch.Tensor, rks: List[torch.Tensor], order: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The B(h) linear system ``R ρ = b`` of UniPC (bh2), float32: R [order, order], b [order]."""
    r = torch.tensor(rks + [1.0])
    h_phi_k = torch.expm1(hh) / hh - 1
    b_h = torch.expm1(hh)
    factorial = 1
    rows, rhs = [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(r, i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.tensor(rhs)


@dataclass(frozen=True)
class _StepCoefficients:
    """σ_t/σ_s0, α_t, h·φ1(h) = B(h) = e^{-h} - 1 (bh2, in x0 form), the ratios r_k and the ρ system R ρ = b."""

    sigma_ratio: torch.Tensor
    alpha_t: torch.Tensor
    h_phi_1: torch.Tensor
    rks: List[torch.Tensor]
    r_mat: torch.Tensor
    b_vec: torch.Tensor


def _weighted_sum(weights: torch.Tensor, terms: Sequence[torch.Tensor]):
    total = 0
    for w, term in zip(weights, terms):
        total = total + w * term
    return total


class FlowUniPCScheduler(FlowScheduler):
    """UniPC-bh2 predictor/corrector in x0 form; ``order`` 1 or 2 (2 as Wan2.1), lower order on the last step.

    Order 2 uses the simplified predictor weight ρ = 1/2 and the solved corrector weights, as the reference.
    """

    name = "unipc"

    def __init__(self, grid: FlowGrid, order: int = 2):
        super().__init__(grid)
        if order not in (1, 2):
            raise ValueError(f"unipc: solver order must be 1 or 2, got {order}")
        self.order = order
        self._x0_history: List[torch.Tensor] = []
        self._last_sample: Optional[torch.Tensor] = None
        self._last_order = 0

    def _coefficients(self, idx_t: int, idx_s0: int, order: int) -> "_StepCoefficients":
        """Scalars of a UniPC step from σ[idx_s0] to σ[idx_t] that uses ``order`` x0 predictions."""
        sigma_t, sigma_s0 = self.sigmas[idx_t], self.sigmas[idx_s0]
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        rks = [(_lambda(self.sigmas[idx_s0 - i]) - lambda_s0) / h for i in range(1, order)]
        r_mat, b_vec = _bh2_system(-h, rks, order)
        return _StepCoefficients(sigma_t / sigma_s0, 1 - sigma_t, torch.expm1(-h), rks, r_mat, b_vec)

    def _differences(self, rks: List[torch.Tensor], m0: torch.Tensor) -> List[torch.Tensor]:
        return [(self._x0_history[-(i + 2)] - m0) / rk for i, rk in enumerate(rks)]

    def _predict(self, x: torch.Tensor, step_index: int, order: int) -> torch.Tensor:
        """UniP: x at σ[step_index] → σ[step_index + 1], using the last ``order`` x0 predictions."""
        c = self._coefficients(step_index + 1, step_index, order)
        m0 = self._x0_history[-1]
        x_t = c.sigma_ratio * x - c.alpha_t * c.h_phi_1 * m0
        if order == 1:
            return x_t
        rhos = torch.tensor([0.5], dtype=x.dtype)
        return x_t - c.alpha_t * c.h_phi_1 * _weighted_sum(rhos, self._differences(c.rks, m0))

    def _correct(self, x0_new: torch.Tensor, x: torch.Tensor, step_index: int, order: int) -> torch.Tensor:
        """UniC: redo the previous step (σ[step_index-1] → σ[step_index]) from the last sample with x0_new."""
        c = self._coefficients(step_index, step_index - 1, order)
        m0 = self._x0_history[-1]
        x_t = c.sigma_ratio * self._last_sample - c.alpha_t * c.h_phi_1 * m0
        if order == 1:
            rhos = torch.tensor([0.5], dtype=x.dtype)
        else:
            rhos = torch.linalg.solve(c.r_mat, c.b_vec).to(x.dtype)
        corr = _weighted_sum(rhos[:-1], self._differences(c.rks, m0))
        return x_t - c.alpha_t * c.h_phi_1 * (corr + rhos[-1] * (x0_new - m0))

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        x0 = x - self.sigmas[step_index] * model_output
        if step_index > 0 and self._last_sample is not None:
            x = self._correct(x0, x, step_index, self._last_order)
        self._x0_history = (self._x0_history + [x0])[-self.order:]
        order = min(self.order, self.num_steps - step_index, len(self._x0_history))
        self._last_order = order
        self._last_sample = x
        return self._predict(x, step_index, order)
