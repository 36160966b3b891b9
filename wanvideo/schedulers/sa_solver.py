"""SA-Solver (Xue et al. 2023, arXiv:2309.05019) in its ODE form (τ = 0) for flow matching: ``sa_ode_stable``.

Formulation: data prediction ``x0 = x - σ v`` and log-SNR ``λ = log((1 - σ) / σ)``; the exact probability-flow
solution is ``x_t / σ_t = x_s / σ_s + ∫_{λ_s}^{λ_t} e^λ x̂0(λ) dλ``. With the stochasticity τ = 0 the SA-Solver
steps are (:func:`.exp_integrator.lagrange_exp_weights`, coefficients ``σ_t · w_j``):

* SA-Predictor (Adams-Bashforth type, order p): ``x̃_{i+1} = (σ_{i+1}/σ_i) x_i + σ_{i+1} Σ_j w_j x0_{i-j}``, the
  Lagrange polynomial through the last p x0 predictions (nodes λ_i, λ_{i-1}, …) integrated over [λ_i, λ_{i+1}].
* SA-Corrector (Adams-Moulton type, order c): once the model has been evaluated at ``x̃_{i+1}``, the same step
  is redone from ``x_i`` with the polynomial through the new x0_{i+1} and the previous c - 1 predictions.
  As in the paper, the model is not re-evaluated at the corrected point (one evaluation per step).

Choices: predictor and corrector orders 3 by default (the paper's few-step settings are 2-4); orders warm up with
the available history, a point at σ = 1 (λ = -inf) is never an interpolation node, the step onto σ = 0 is first
order (it lands on the x0 prediction) and, with fewer than 15 steps, the last predictor is first order and the one
before at most second order (diffusers' ``lower_order_final``). The grid (:func:`.sigmas.sa_ode_grid`) is the one of
ComfyUI-WanVideoWrapper's ``sa_ode_stable``; its heuristics (adaptive order by σ, velocity smoothing, damped steps)
are not reproduced: this is the published solver.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .exp_integrator import first_order_flow_step, interior, lagrange_exp_weights, log_snr, multistep_order
from .sigmas import FlowGrid, FlowScheduler


class SAODEScheduler(FlowScheduler):
    """SA-Solver with τ = 0: Adams-type predictor of order ``predictor_order`` plus corrector of ``corrector_order``."""

    name = "sa_ode_stable"

    def __init__(self, grid: FlowGrid, predictor_order: int = 3, corrector_order: int = 3):
        super().__init__(grid)
        for label, order in (("predictor", predictor_order), ("corrector", corrector_order)):
            if order not in (1, 2, 3, 4):
                raise ValueError(f"sa_ode_stable: {label} order must be within 1..4, got {order}")
        self.predictor_order = predictor_order
        self.corrector_order = corrector_order
        self._keep = max(predictor_order, corrector_order)
        self._x0: List[torch.Tensor] = []
        self._x0_sigmas: List[float] = []
        self._last_sample: Optional[torch.Tensor] = None

    def _adams_step(self, x: torch.Tensor, sigma_s: float, sigma_t: float, order: int) -> torch.Tensor:
        """``x`` at σ_s → σ_t with the polynomial through the newest ``order`` stored x0 predictions."""
        x0s: Sequence[torch.Tensor] = self._x0[::-1][:order]
        if order == 1:
            return first_order_flow_step(x, x0s[0], sigma_s, sigma_t)
        nodes = [log_snr(s) for s in self._x0_sigmas[::-1][:order]]
        weights = lagrange_exp_weights(log_snr(sigma_s), log_snr(sigma_t), nodes)
        out = (sigma_t / sigma_s) * x
        for weight, x0_j in zip(weights, x0s):
            out = out + (sigma_t * weight) * x0_j
        return out

    def _corrector_order(self) -> int:
        usable = 0
        for sigma in reversed(self._x0_sigmas):
            if not interior(sigma):
                break
            usable += 1
        return min(self.corrector_order, max(usable, 1))

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma_s, sigma_t = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        self._x0 = (self._x0 + [x - sigma_s * model_output])[-self._keep:]
        self._x0_sigmas = (self._x0_sigmas + [sigma_s])[-self._keep:]
        if self._last_sample is not None:
            sigma_prev = float(self.sigmas[step_index - 1])
            x = self._adams_step(self._last_sample, sigma_prev, sigma_s, self._corrector_order())
        self._last_sample = x
        order = multistep_order(self.predictor_order, self._x0_sigmas, step_index, self.num_steps, sigma_t)
        return self._adams_step(x, sigma_s, sigma_t, order)
