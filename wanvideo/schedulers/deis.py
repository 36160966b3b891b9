"""DEIS multistep (Zhang & Chen 2022, arXiv:2204.13902) for flow matching, "logρ" polynomial form, as diffusers'
``DEISMultistepScheduler`` (``algorithm_type="deis"``, ``solver_type="logrho"``) runs it with ``use_flow_sigmas``.

Formulation: the flow latent ``x = α x0 + σ ε`` (α = 1 - σ) has the exact probability-flow solution
``x_t / α_t = x_s / α_s + ∫_{ρ_s}^{ρ_t} ε̂(ρ) dρ`` in ``ρ = σ / α``. DEIS extrapolates the noise predictions
``ε̂ = x + (1 - σ) v`` (the model's velocity ``v = ε - x0`` turned into ε) with the Lagrange polynomial through the
last ``order`` points in ``log ρ`` and integrates it exactly (:func:`.exp_integrator.lagrange_exp_weights` with
``u = log ρ``). Order 1 is DDIM, written ``x_t = (σ_t/σ_s) x_s + (α_t - σ_t α_s/σ_s) x0`` so that σ_s = 1 is fine.

Choices (documented deviations):
* This is DEIS's own parameterisation (noise prediction, as in the paper and in diffusers), not a data-prediction
  rewrite: in x0 form with a log-SNR polynomial it would coincide with the SA-Solver predictor of :mod:`.sa_solver`.
* Order 2 by default (diffusers' default), 1-3 allowed; the first steps warm up with the history available. As in
  diffusers' ``lower_order_final``, the last step is first order when the run has fewer than 15 steps and the step
  before it at most second order.
* The grid (:func:`.sigmas.diffusers_flow_grid`) ends at σ = 0 and the step onto 0 is always first order (it lands on
  the x0 prediction exactly). ComfyUI-WanVideoWrapper instead replaces the final 0 by 1e-6, which leaves 1e-6 · ε.
* A point at σ = 1 (custom sigmas starting at 1) has ρ = ∞ and is never used as an interpolation node.
"""
from __future__ import annotations

from typing import List

import torch

from .exp_integrator import first_order_flow_step, lagrange_exp_weights, log_snr, multistep_order
from .sigmas import FlowGrid, FlowScheduler


class DEISScheduler(FlowScheduler):
    """DEIS-logρ multistep of order ``order`` (1-3, default 2) in the noise-prediction form."""

    name = "deis"

    def __init__(self, grid: FlowGrid, order: int = 2):
        super().__init__(grid)
        if order not in (1, 2, 3):
            raise ValueError(f"deis: solver order must be 1, 2 or 3, got {order}")
        self.order = order
        self._eps: List[torch.Tensor] = []
        self._eps_sigmas: List[float] = []

    def _step(self, model_output: torch.Tensor, step_index: int, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma_s, sigma_t = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        eps = x + (1.0 - sigma_s) * model_output
        self._eps = (self._eps + [eps])[-self.order:]
        self._eps_sigmas = (self._eps_sigmas + [sigma_s])[-self.order:]
        order = multistep_order(self.order, self._eps_sigmas, step_index, self.num_steps, sigma_t)
        if order == 1:
            return first_order_flow_step(x, x - sigma_s * model_output, sigma_s, sigma_t)
        nodes = [-log_snr(s) for s in reversed(self._eps_sigmas[-order:])]
        weights = lagrange_exp_weights(-log_snr(sigma_s), -log_snr(sigma_t), nodes)
        alpha_s, alpha_t = 1.0 - sigma_s, 1.0 - sigma_t
        out = (alpha_t / alpha_s) * x
        for weight, eps_j in zip(weights, reversed(self._eps[-order:])):
            out = out + (alpha_t * weight) * eps_j
        return out
